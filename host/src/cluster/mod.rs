//! The regional cluster: membership, partition ownership, fencing and routing.
//!
//! - [`core`]: the decision logic as a sans-IO state machine ([`core::Node`]).
//! - [`driver`]: runs the core against PostgreSQL and routes commands by it: local
//!   execution fenced at the partition's epoch, or forwarding to the owner over HTTP.
//! - [`sim`]: a deterministic simulator that drives the same `Node` through seeded
//!   fault schedules and checks the safety and liveness invariants.
pub mod core;
pub mod driver;
pub mod sim;

pub use driver::{Cluster, ClusterConfig, ClusterStatus, Dispatched, FORWARDED_HEADER, RouteError};
