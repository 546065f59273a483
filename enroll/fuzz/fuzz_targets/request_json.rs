//! Any bytes as the JSON bodies the service and the client read: parsing never panics, and
//! what parses converts into validated values (token, WireGuard key) without panicking.
#![no_main]

use komnet_enroll::api::{self, admin};
use komnet_enroll::identity::WgPublicKey;
use komnet_enroll::token::{Bootstrap, PresentedToken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<api::EnrollRequest>(data) {
        let _ = PresentedToken::parse(&req.token);
        let _ = WgPublicKey::from_base64(&req.wg_public_key);
    }
    if let Ok(req) = serde_json::from_slice::<api::RenewRequest>(data) {
        let _ = WgPublicKey::from_base64(&req.wg_public_key);
    }
    let _ = serde_json::from_slice::<api::RegistryEvent>(data);
    let _ = serde_json::from_slice::<api::EnrollResponse>(data);
    let _ = serde_json::from_slice::<api::ApiError>(data);
    let _ = serde_json::from_slice::<admin::RevokeRequest>(data);
    let _ = serde_json::from_slice::<admin::CreateTokenRequest>(data);
    let _ = serde_json::from_slice::<Bootstrap>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PresentedToken::parse(text);
    }
});
