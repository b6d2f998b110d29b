//! raftkv node: a key-value store that replicates with Raft (openraft), persists in RocksDB and
//! serves the etcd v3 gRPC API.
//!
//! Requests flow one way: client → `api` (edge: `auth`) → `consensus` → state machine (`apply`)
//! → `storage`.

pub mod api;
pub mod apply;
pub mod auth;
pub mod bootstrap;
pub use raftkv_certs as certs;
pub mod config;
pub mod consensus;
pub mod crypto;
pub mod dev;
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod restore;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod tls;
