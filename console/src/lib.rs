//! komnet-console's library: configuration, sign-on (OpenID Connect), sessions, pages.
//! The binary (`main.rs`) only wires them to a listener.
#![forbid(unsafe_code)]

pub mod config;
pub mod oidc;
pub mod pages;
pub mod session;
pub mod web;
