//! Meridian host library.
pub mod api;
pub mod cli;
pub mod cluster;
pub mod executor;
pub mod region;
pub mod runtime;
pub mod store;
