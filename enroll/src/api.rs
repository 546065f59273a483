//! The wire types the service and its clients share live in `komnet-proto`; re-exported here
//! so the service's modules name them where they always did.

pub use komnet_proto::api::*;
