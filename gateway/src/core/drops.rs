//! Why a packet was dropped ([`DropReason`], counted in metrics) and the counters per peer and
//! device.

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal: $doc:literal,)*) => {
        /// Why the core refused a packet. Every refusal is counted per peer (or for the device
        /// when no peer could be attributed) under one of these names.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason { $(#[doc = $doc] $variant,)* }
        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            /// The stable, snake_case name used in logs and metrics.
            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    Malformed => "malformed": "Not a WireGuard message: wrong type, reserved bits or length.",
    NoPrivateKey => "no_private_key": "The device has no private key yet.",
    LowOrderKey => "low_order_key": "The peer's public key is a low-order point: no handshake is ever made with it.",
    InvalidMac => "invalid_mac": "Handshake MAC1 does not match our public key.",
    CookieRequired => "cookie_required": "Handshake without a valid cookie under load: a cookie reply was sent instead.",
    RateLimited => "rate_limited": "Handshake over its source's rate limit.",
    UnknownPeer => "unknown_peer": "Handshake from a static key that is not a configured peer.",
    UnknownIndex => "unknown_index": "Receiver index of no current peer.",
    StaleHandshake => "stale_handshake": "Handshake initiation that waited in the receive queue longer than its sender waits for an answer (STALE_INITIATION): not answered.",
    HandshakeFailed => "handshake_failed": "Handshake that failed to authenticate or was replayed (stale timestamp).",
    NoSession => "no_session": "Data for a session we do not (or no longer) have.",
    Replay => "replay": "Data counter already seen or too old (replay window).",
    DecryptFailed => "decrypt_failed": "Data failed authentication (AEAD tag).",
    InvalidInnerPacket => "invalid_inner_packet": "Decrypted or outgoing payload is not a well-formed IP packet.",
    SpoofedSource => "spoofed_source": "Decrypted packet whose source is not in the sending peer's allowed IPs.",
    NoRoute => "no_route": "Outgoing packet whose destination is in no peer's allowed IPs.",
    NoEndpoint => "no_endpoint": "Outgoing packet for a peer without a known endpoint.",
    RoutingLoop => "routing_loop": "Outgoing packet that is one of our own datagrams to the peer's endpoint: the endpoint is routed through the tunnel itself.",
    BufferTooSmall => "buffer_too_small": "The output buffer cannot hold the result.",
    Expired => "expired": "The peer's keys expired after REJECT_AFTER_TIME * 3 without a new handshake.",
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A counter per drop reason.
#[derive(Debug, Clone, Default)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    pub(super) fn add(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}
