//! The deterministic cluster simulator (being written).
