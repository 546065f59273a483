//! komnet-enroll: the data centre's enrollment service and certificate authority.
//!
//! It owns the CA (`ca`: an ECDSA P-256 root and online issuing CA, rcgen), one-time enrollment
//! tokens and bootstrap files (`token`), CSR checks (`csr`, x509-parser), the proof that a client
//! holds its WireGuard private key (`wgproof`), the persistent store (`store`: one SQLite
//! file, or PostgreSQL shared by replicas, behind a trait), the decisions of enroll / renew / revoke / home office (`service`), the HTTPS API and
//! the admin socket (`server`; its TLS certificate is renewed while it runs: `server_cert`),
//! and the peer registry that hubs follow. The wire types and
//! names are `komnet-proto`'s, the client the gateway calls is `komnet-enroll-client` (whose
//! possession proof the service verifies), the admin commands are `komnet-enroll-admin`'s; they
//! are re-exported here for the service's binary and tests. It does not own the packet path
//! (`gateway`) or the segmentation policy (`policy`); it only hands out the policy version.
#![forbid(unsafe_code)]

pub mod api;
pub mod ca;
pub mod config;
pub mod csr;
pub mod identity;
pub mod server;
pub mod server_cert;
pub mod service;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod token;

pub use komnet_enroll_admin as admin;
pub use komnet_enroll_admin::homeoffice;
pub use komnet_enroll_client as client;
pub use komnet_enroll_client::proof as wgproof;
