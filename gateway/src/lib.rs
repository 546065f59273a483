//! komnet-gateway: the WireGuard appliance's packet path and the daemon that stock WireGuard
//! tools drive.
//!
//! - [`core`]: the sans-IO WireGuard core on boringtun's `noise::Tunn` — peers by index,
//!   allowed-IPs routing and source filtering, handshake dispatch, timers from a passed-in
//!   `now`, roaming, per-source handshake limits with cookies, typed drop reasons.
//! - [`uapi`]: the cross-platform UAPI text protocol (`wg`, `wg-quick`), parsed without side
//!   effects and applied atomically.
//! - [`driver`]: the thin I/O layer: TUN with offloads (tun-rs), UDP with GSO/GRO
//!   (quinn-udp), batches carried through the pipeline, one thread per direction plus one for
//!   handshakes (so a flood of them cannot stall data) and one for timers.
//! - [`firewall`]: the hub's stateful enforcement of the compiled segmentation policy (flow
//!   table with idle timeouts and a bound, related ICMP errors), sans-IO.
//! - [`gate`]: the firewall, policy and peer identities as the driver locks them per batch.
//! - [`admission`]: which registry identities a hub admits, with which allowed IPs (from the
//!   policy), turned into peer-table changes; sans-IO.
//! - [`appliance`]: `komnet-gateway run --config`: the hub or spoke appliance: enrollment,
//!   registry, policy bundles, nftables, failover, `/metrics` and `/status`.
//! - [`unreachable`]: ICMP host-unreachable answers for packets no peer can take.
//! - `sys`: syscalls std and socket2 do not cover, through `nix` where it has a safe wrapper;
//!   the only place with `unsafe`.
//!
//! It does not own enrollment (`komnet-enroll`) or the policy language (`komnet-policy`); it
//! enforces the policy that crate compiles.

pub mod admission;
pub mod allowed_ips;
pub mod appliance;
pub mod cookie;
pub mod core;
pub mod daemon;
pub mod driver;
pub mod firewall;
pub mod gate;
pub mod packet;
mod sys;
pub mod uapi;
pub mod unreachable;
