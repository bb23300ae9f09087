//! The regional cluster: membership, partition ownership, fencing and routing.
//!
//! - [`core`]: the decision logic as a sans-IO state machine ([`core::Node`]).
//! - [`sim`]: a deterministic simulator that drives the same `Node` through seeded
//!   fault schedules and checks the safety and liveness invariants.
pub mod core;
pub mod sim;
