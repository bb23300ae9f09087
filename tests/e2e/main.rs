//! End-to-end tests: real `meridian` processes against real PostgreSQL.
//!
//! Run with `bash scripts/test.sh` (which builds the WASM plugins first), or
//! `cargo test --release -p meridian-host --test e2e` once `plugins/build.sh` has run.

mod auth;
mod cluster;
mod conformance;
mod dev;
mod groups;
mod harness;
mod languages;
mod nats;
mod nats_interface;
mod regions;
mod sandbox;
mod single_node;
mod status_page;
mod subscriptions;
mod tail;
mod three_regions;
mod unstorable;
mod upgrades;
