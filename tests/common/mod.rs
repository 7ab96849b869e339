//! Helpers shared by the integration tests. Each test crate uses part of
//! them, hence dead_code.
#![allow(dead_code)]

pub mod client;
pub mod dns;
pub mod gateway;
pub mod pki;
pub mod sink;
#[path = "../../src/store/test_cluster.rs"]
pub mod test_cluster;
