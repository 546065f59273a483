//! komnet-enroll: the data centre's enrollment service and certificate authority.
//!
//! It owns the CA (`ca`: an ECDSA P-256 root and online issuing CA, rcgen), one-time enrollment
//! tokens and bootstrap files (`token`), CSR checks (`csr`, x509-parser), the proof that a client
//! holds its WireGuard private key (`wgproof`), the persistent store (`store`, SQLite behind a
//! trait), the decisions of enroll / renew / revoke / home office (`service`), the HTTPS API and
//! the admin socket (`server`), the peer registry that hubs follow, the client library the
//! gateway calls (`client`), and the admin commands (`admin`). It does not own the packet path
//! (`gateway`) or the segmentation policy (`policy`); it only hands out the policy version.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod ca;
pub mod client;
pub mod config;
pub mod csr;
pub mod homeoffice;
pub mod identity;
pub mod server;
pub mod service;
pub mod store;
pub mod token;
pub mod wgproof;
