//! Benchmark tooling for Meridian.
//!
//! - [`load`]: a closed-loop HTTP load generator for any service exposing the command
//!   endpoint `POST /v1/aggregates/{type}/{id}`, so the same client and measurements can
//!   be pointed at Meridian and at comparison implementations alike.
//! - [`workload`]: what to send (the bank-account command mix and its account setup).
//! - [`stats`]: latency histograms, per-level results, the printed table and JSON.
//! - [`cli`]: argument parsing shared by the binaries.
//! - [`peer`]: what the comparison services share (flags, Meridian's HTTP shape).

pub mod cli;
pub mod load;
pub mod peer;
pub mod stats;
pub mod workload;
