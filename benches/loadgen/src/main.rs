//! komnet-loadgen: plays N WireGuard peers (boringtun) against one hub, each from its own UDP
//! port with a real handshake and real traffic; and issues their home-office identities
//! through the enrollment service, so that a real hub admits them from its registry.
//!
//! ```text
//! komnet-loadgen issue --socket ADMIN.sock --tenant T [--tenant T2 ...] --count N --out PEERS
//!     [--prefix lg] [--concurrency 8] [--work-dir DIR]
//! komnet-loadgen handshake --peers PEERS --hub ADDR:PORT --hub-key BASE64 --source ADDR
//!     [--addresses 1] [--port 20000] [--count N] [--threads 2] [--timeout 60]
//! komnet-loadgen traffic (same as handshake) --to ADDR:PORT [--size 1400] [--duration 10]
//!     [--batch 32]
//! ```
//! Peer i sends from port `--port`+i of address `--source`+(i mod `--addresses`) (addresses
//! other than the namespace's own need a local route, e.g. `ip route add local
//! 10.236.0.0/16 dev lo`: home-office devices come from addresses of their own, and hubs budget
//! handshakes per source address). `handshake` makes every peer initiate at once and
//! retry after REKEY_TIMEOUT like WireGuard; it prints when each percentile of them completed.
//! `traffic` first does that, then every peer sends through its session until the time is up.
//! Every run prints one JSON line. The generator only checks what it needs to go on (its
//! handshakes); what arrived behind the hub is counted there, by the benchmark.

mod engine;
mod issue;
mod peers;
mod sys;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};

use engine::{HandshakeStats, Peer, TrafficStats};

const USAGE: &str = "usage: komnet-loadgen issue --socket ADMIN.sock --tenant T [--tenant ...] --count N --out PEERS [--prefix P] [--concurrency C] [--work-dir DIR]
       komnet-loadgen handshake --peers PEERS --hub ADDR:PORT --hub-key BASE64 --source ADDR [--addresses A] [--port P] [--count N] [--threads T] [--timeout SECS]
       komnet-loadgen traffic   (as handshake) --to ADDR:PORT [--size BYTES] [--duration SECS] [--batch B]";

struct Flags(std::iter::Peekable<std::vec::IntoIter<String>>);

impl Flags {
    fn value(&mut self, name: &str) -> Result<String> {
        self.0
            .next()
            .with_context(|| format!("{name} needs a value\n{USAGE}"))
    }
    fn parse<T: std::str::FromStr>(&mut self, name: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.value(name)?;
        v.parse().map_err(|e| anyhow::anyhow!("{name} {v:?}: {e}"))
    }
}

#[derive(Default)]
struct RunArgs {
    peers: Option<PathBuf>,
    hub: Option<SocketAddr>,
    hub_key: Option<[u8; 32]>,
    source: Option<IpAddr>,
    addresses: Option<usize>,
    port: Option<u16>,
    count: Option<usize>,
    threads: Option<usize>,
    timeout: Option<f64>,
    to: Option<SocketAddr>,
    size: Option<usize>,
    duration: Option<f64>,
    batch: Option<usize>,
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args[0] == "-h" || args[0] == "--help" {
        println!("{USAGE}");
        return Ok(());
    }
    let mode = args.remove(0);
    let mut f = Flags(args.into_iter().peekable());
    match mode.as_str() {
        "issue" => issue_cmd(&mut f),
        "handshake" | "traffic" => {
            let mut a = RunArgs::default();
            while let Some(flag) = f.0.next() {
                match flag.as_str() {
                    "--peers" => a.peers = Some(f.value(&flag)?.into()),
                    "--hub" => a.hub = Some(f.parse(&flag)?),
                    "--hub-key" => {
                        let text = f.value(&flag)?;
                        let bytes = B64.decode(text.trim()).context("--hub-key: not base64")?;
                        a.hub_key = Some(
                            bytes
                                .try_into()
                                .map_err(|_| anyhow::anyhow!("--hub-key: not 32 bytes"))?,
                        );
                    }
                    "--source" => a.source = Some(f.parse(&flag)?),
                    "--addresses" => a.addresses = Some(f.parse(&flag)?),
                    "--port" => a.port = Some(f.parse(&flag)?),
                    "--count" => a.count = Some(f.parse(&flag)?),
                    "--threads" => a.threads = Some(f.parse(&flag)?),
                    "--timeout" => a.timeout = Some(f.parse(&flag)?),
                    "--to" if mode == "traffic" => a.to = Some(f.parse(&flag)?),
                    "--size" if mode == "traffic" => a.size = Some(f.parse(&flag)?),
                    "--duration" if mode == "traffic" => a.duration = Some(f.parse(&flag)?),
                    "--batch" if mode == "traffic" => a.batch = Some(f.parse(&flag)?),
                    other => bail!("{mode}: unknown argument {other:?}\n{USAGE}"),
                }
            }
            run(&mode, a)
        }
        other => bail!("unknown mode {other:?}\n{USAGE}"),
    }
}

fn issue_cmd(f: &mut Flags) -> Result<()> {
    let (mut socket, mut tenants, mut count, mut out) = (None, Vec::new(), None, None);
    let (mut prefix, mut concurrency, mut work_dir) = ("lg".to_owned(), 8usize, None);
    while let Some(flag) = f.0.next() {
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(f.value(&flag)?)),
            "--tenant" => tenants.push(f.value(&flag)?),
            "--count" => count = Some(f.parse::<usize>(&flag)?),
            "--out" => out = Some(PathBuf::from(f.value(&flag)?)),
            "--prefix" => prefix = f.value(&flag)?,
            "--concurrency" => concurrency = f.parse(&flag)?,
            "--work-dir" => work_dir = Some(PathBuf::from(f.value(&flag)?)),
            other => bail!("issue: unknown argument {other:?}\n{USAGE}"),
        }
    }
    let out = out.context("issue needs --out")?;
    let work_dir = work_dir.unwrap_or_else(|| {
        let mut p = out.clone().into_os_string();
        p.push(".work");
        p.into()
    });
    let summary = issue::issue(
        issue::IssueArgs {
            socket: socket.context("issue needs --socket")?,
            tenants,
            count: count.context("issue needs --count")?,
            prefix,
            concurrency,
            work_dir: work_dir.clone(),
        },
        &out,
    )?;
    let _ = std::fs::remove_dir_all(&work_dir);
    println!("{summary}");
    Ok(())
}

fn run(mode: &str, a: RunArgs) -> Result<()> {
    let path = a.peers.context("--peers is required")?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = peers::parse_peers(&text).with_context(|| format!("{}", path.display()))?;
    if let Some(n) = a.count {
        if n > lines.len() {
            bail!(
                "--count {n}: {} has only {} peers",
                path.display(),
                lines.len()
            );
        }
        lines.truncate(n);
    }
    if lines.is_empty() {
        bail!("{}: no peers", path.display());
    }
    let hub = a.hub.context("--hub is required")?;
    let hub_key = PublicKey::from(a.hub_key.context("--hub-key is required")?);
    let source = a.source.context("--source is required")?;
    let port = a.port.unwrap_or(20_000);
    if usize::from(port) + lines.len() > 65_536 {
        bail!("--port {port} + {} peers runs past port 65535", lines.len());
    }
    let threads = a.threads.unwrap_or(2).clamp(1, lines.len());
    let timeout = Duration::from_secs_f64(a.timeout.unwrap_or(60.0).clamp(0.1, 600.0));
    sys::raise_fd_limit().context("raising the open-file limit")?;
    let _clock = engine::Clock::start();
    let mut all = Vec::with_capacity(lines.len());
    let addresses = a.addresses.unwrap_or(1).max(1);
    for (i, l) in lines.iter().enumerate() {
        let src = SocketAddr::new(peers::nth_address(source, i % addresses), port + i as u16);
        let sock =
            sys::peer_socket(src, hub).with_context(|| format!("peer {i}: socket on {src}"))?;
        // Each peer's session index (boringtun shifts it left by 8): unique per peer.
        let tunn = Tunn::new(
            StaticSecret::from(l.private),
            hub_key,
            None,
            None,
            i as u32 + 1,
            None,
        );
        all.push(Peer::new(tunn, sock, l.addr));
    }
    let n = all.len();
    let per = n.div_ceil(threads);
    let mut shards: Vec<Vec<Peer>> = Vec::new();
    let mut it = all.into_iter();
    loop {
        let s: Vec<Peer> = it.by_ref().take(per).collect();
        if s.is_empty() {
            break;
        }
        shards.push(s);
    }
    let start = Instant::now();
    let to = a.to;
    let size = a.size.unwrap_or(1400);
    let batch = a.batch.unwrap_or(32).clamp(1, 1024);
    let duration = Duration::from_secs_f64(a.duration.unwrap_or(10.0).clamp(0.1, 600.0));
    let traffic = mode == "traffic";
    if traffic && to.is_none() {
        bail!("traffic needs --to ADDR:PORT");
    }
    let handles: Vec<_> = shards
        .into_iter()
        .map(|mut shard| {
            std::thread::spawn(move || {
                let hs = engine::handshake(&mut shard, start, timeout);
                let tr = match (traffic, to) {
                    (true, Some(to)) => {
                        Some(engine::traffic(&mut shard, to, size, batch, duration))
                    }
                    _ => None,
                };
                (hs, tr)
            })
        })
        .collect();
    let (mut hs, mut tr) = (HandshakeStats::default(), TrafficStats::default());
    for h in handles {
        let (a, b) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a peer thread panicked"))?;
        hs.merge(a);
        if let Some(b) = b {
            tr.merge(b);
        }
    }
    hs.done_at.sort();
    let ms = |p: u32| {
        peers::percentile(&hs.done_at, p).map_or("null".to_owned(), |d| {
            format!("{:.1}", d.as_secs_f64() * 1000.0)
        })
    };
    let mut json = format!(
        "{{\"mode\":\"{mode}\",\"peers\":{n},\"threads\":{threads},\"handshaken\":{},\"p50_ms\":{},\"p99_ms\":{},\"all_ms\":{},\"initiations\":{},\"cookies\":{},\"errors\":{}",
        hs.done_at.len(),
        ms(50),
        ms(99),
        if hs.done_at.len() == n { ms(100) } else { "null".into() },
        hs.initiations,
        hs.cookies,
        hs.errors + tr.errors,
    );
    if traffic {
        let secs = duration.as_secs_f64();
        json.push_str(&format!(
            ",\"sent_packets\":{},\"sent_inner_bytes\":{},\"sent_gbit_s\":{:.3},\"refused_locally\":{},\"seconds\":{secs:.1},\"size\":{size}",
            tr.packets,
            tr.bytes,
            tr.bytes as f64 * 8.0 / secs / 1e9,
            tr.refused
        ));
    }
    if let Some(e) = hs.first_error.or(tr.first_error) {
        json.push_str(&format!(",\"first_error\":{:?}", e));
    }
    json.push('}');
    println!("{json}");
    if hs.done_at.len() < n {
        std::process::exit(2);
    }
    Ok(())
}
