//! komnet-enroll: the data centre's certificate-issuing enrollment service.
//!
//! It will own the CA (rcgen, x509-parser), one-time enrollment tokens, CSR and WireGuard-key
//! proof of possession, the peer registry that hubs follow, revocation and the audit log. It
//! does not own the packet path (`gateway`) or the segmentation policy (`policy`). Its issue
//! fills this crate; until then it is intentionally empty.
#![forbid(unsafe_code)]
