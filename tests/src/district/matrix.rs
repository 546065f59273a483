//! The district's traffic matrix: where traffic comes from (the town halls' staff and guests,
//! the home office) and goes to (the data centre's servers), what the policy says of each flow
//! and what a real TCP connection through the tunnels shows.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use komnet_policy::{decide, Origin, PacketMeta, Role};

use super::District;
use crate::command::{run, wait_until, BackgroundProcess};
use crate::netns::Netns;
use crate::COMMAND_TIMEOUT;

/// Where the district's traffic goes in the data centre.
#[derive(Debug, Clone, Copy)]
pub struct Destination {
    pub label: &'static str,
    pub addr: Ipv4Addr,
    pub port: u16,
}

pub const DESTINATIONS: [Destination; 3] = [
    Destination {
        label: "DMS (Kreis)",
        addr: Ipv4Addr::new(10, 0, 1, 10),
        port: 443,
    },
    Destination {
        label: "Dateiserver Nohfelden",
        addr: Ipv4Addr::new(10, 1, 10, 5),
        port: 445,
    },
    Destination {
        label: "Dateiserver Tholey",
        addr: Ipv4Addr::new(10, 1, 20, 5),
        port: 445,
    },
];

/// One source of traffic in the matrix.
#[derive(Debug, Clone)]
pub struct Source {
    pub label: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    pub origin: Origin,
}

/// The label of the district's document management system, which every town hall's staff may use.
pub const DMS: &str = "DMS (Kreis)";

/// The destination of [`DESTINATIONS`] called `label`.
pub fn destination(label: &str) -> Destination {
    DESTINATIONS
        .iter()
        .copied()
        .find(|d| d.label == label)
        .unwrap_or_else(|| panic!("no destination {label:?} in the district"))
}

impl District {
    /// Every traffic source of the matrix, with the identity the hub classifies it by.
    pub fn sources(&self) -> Vec<Source> {
        let mut out = Vec::new();
        for c in &self.communes {
            let id = self
                .policy
                .peer_identity(c.name, Some("rathaus"), Role::Spoke)
                .map_or(Origin::Address, Origin::Peer);
            out.push(Source {
                label: format!("{} Verwaltung", c.label),
                netns: c.staff.name().to_owned(),
                addr: c.staff_addr(),
                origin: id,
            });
            out.push(Source {
                label: format!("{} Gäste-WLAN", c.label),
                netns: c.guest.name().to_owned(),
                addr: c.guest_addr(),
                origin: id,
            });
        }
        if let Some(ho) = &self.homeoffice {
            let id = self
                .policy
                .peer_identity("nohfelden", None, Role::HomeOffice)
                .map_or(Origin::Address, Origin::Peer);
            out.push(Source {
                label: "Home office Nohfelden (wireguard-go)".into(),
                netns: ho.netns.name().to_owned(),
                addr: ho.addr,
                origin: id,
            });
        }
        out
    }

    /// What the policy says for `source` → `dest` (TCP).
    pub fn expected(&self, source: &Source, dest: &Destination) -> bool {
        decide(
            &self.policy,
            source.origin,
            &PacketMeta {
                src: IpAddr::V4(source.addr),
                dst: IpAddr::V4(dest.addr),
                ip_proto: 6,
                dport: dest.port,
            },
        )
        .allow
    }

    /// Real TCP connections from `source` to each destination: pass or blocked.
    pub fn probe(
        &self,
        source: &Source,
        dests: &[Destination],
        timeout: Duration,
    ) -> Result<Vec<bool>> {
        probe_with(&self.netprobe, source, dests, timeout)
    }

    /// The whole matrix: (source, destination, expected, observed).
    pub fn matrix(&self) -> Result<Vec<(Source, Destination, bool, bool)>> {
        let sources = self.sources();
        let handles: Vec<_> = sources
            .iter()
            .map(|s| {
                let s = s.clone();
                let netprobe = self.netprobe.clone();
                std::thread::spawn(move || -> Result<Vec<bool>> {
                    probe_with(&netprobe, &s, &DESTINATIONS, Duration::from_millis(2000))
                })
            })
            .collect();
        let mut out = Vec::new();
        for (s, h) in sources.into_iter().zip(handles) {
            let observed = h.join().map_err(|_| anyhow!("probe thread panicked"))??;
            for (d, o) in DESTINATIONS.iter().zip(observed) {
                let e = self.expected(&s, d);
                out.push((s.clone(), *d, e, o));
            }
        }
        Ok(out)
    }

    /// Revokes `tenant`'s appliance and measures how long until its staff can no longer reach
    /// its file server: the start of the first probe that was blocked, after the revoke command
    /// was issued (every probe before it passed).
    pub fn revoke_and_time(&self, tenant: &str) -> Result<Duration> {
        let c = self.commune(tenant);
        let staff = Source {
            label: String::new(),
            netns: c.staff.name().to_owned(),
            addr: c.staff_addr(),
            origin: Origin::Address,
        };
        let fileserver = DESTINATIONS
            .iter()
            .copied()
            .find(|d| d.label.ends_with(c.label))
            .ok_or_else(|| anyhow!("no file server for {tenant}"))?;
        if !self.probe(&staff, &[fileserver], Duration::from_millis(1500))?[0] {
            bail!("{tenant}'s staff cannot reach its file server before the revocation");
        }
        let t0 = Instant::now();
        self.admin(&[
            "revoke",
            "--tenant",
            tenant,
            "--site",
            "rathaus",
            "--reason",
            "key-compromise",
        ])?;
        loop {
            let started = t0.elapsed();
            if !self.probe(&staff, &[fileserver], Duration::from_millis(300))?[0] {
                return Ok(started);
            }
            if started > Duration::from_secs(20) {
                bail!("{tenant} still reaches its file server 20 s after the revocation");
            }
        }
    }

    /// The staff PC of `commune` as a traffic source.
    pub fn staff(&self, commune: &str) -> Source {
        let ns = self.commune(commune).staff.name().to_owned();
        self.sources()
            .into_iter()
            .find(|s| s.netns == ns)
            .unwrap_or_else(|| panic!("no staff source for {commune}"))
    }

    /// Whether a TCP connection from `addr` in `ns` reaches `dest` (within 1.5 s). For hosts
    /// outside the matrix: a lease, a local numbering, a spoofed address.
    pub fn reaches(&self, ns: &Netns, addr: &str, dest: Destination) -> bool {
        let source = Source {
            label: String::new(),
            netns: ns.name().to_owned(),
            addr: addr
                .parse()
                .unwrap_or_else(|e| panic!("{addr:?} is not an IPv4 address: {e}")),
            origin: Origin::Address,
        };
        self.probe(&source, &[dest], Duration::from_millis(1500))
            .unwrap_or_else(|e| panic!("probe from {addr} in {}: {e:#}", ns.name()))[0]
    }

    /// A TCP server (`netprobe serve tcp:ADDR:PORT`) in `ns`, once it listens; it stops when
    /// the returned process is dropped.
    pub fn serve_tcp(&self, ns: &Netns, addr: &str, port: u16) -> Result<BackgroundProcess> {
        let log = self.path(&format!("serve-{}-{addr}-{port}.log", ns.name()));
        let mut cmd = ns.command(&self.netprobe);
        cmd.args(["serve", &format!("tcp:{addr}:{port}")]);
        let server = BackgroundProcess::spawn(&mut cmd, &log)?;
        wait_until(
            &format!("netprobe serve tcp:{addr}:{port} in {}", ns.name()),
            Duration::from_secs(10),
            || {
                Ok(std::fs::read_to_string(&log)?
                    .contains("ready")
                    .then_some(()))
            },
        )?;
        Ok(server)
    }
}

fn probe_with(
    netprobe: &Path,
    source: &Source,
    dests: &[Destination],
    timeout: Duration,
) -> Result<Vec<bool>> {
    let flows: Vec<String> = dests
        .iter()
        .map(|d| format!("tcp,{},{},{}", source.addr, d.addr, d.port))
        .collect();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &source.netns])
        .arg(netprobe)
        .args(["probe", "--timeout-ms", &timeout.as_millis().to_string()])
        .args(&flows);
    let out = run(&mut cmd, COMMAND_TIMEOUT)?;
    if !out.succeeded() {
        bail!("netprobe in {}: {out:?}", source.netns);
    }
    let verdicts: Vec<bool> = out.stdout.lines().map(|l| l.trim() == "pass").collect();
    if verdicts.len() != dests.len() {
        bail!(
            "netprobe answered {:?} for {} flows",
            out.stdout,
            dests.len()
        );
    }
    Ok(verdicts)
}

/// The matrix as a table: one row per source, one column per destination, each cell
/// `expected/observed` with a mark when they differ.
pub fn render_matrix(rows: &[(Source, Destination, bool, bool)]) -> String {
    let word = |b: bool| if b { "allow" } else { "deny" };
    let seen = |b: bool| if b { "reached" } else { "blocked" };
    let mut sources: Vec<String> = Vec::new();
    for (s, ..) in rows {
        if !sources.contains(&s.label) {
            sources.push(s.label.clone());
        }
    }
    let first = sources
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let col = DESTINATIONS
        .iter()
        .map(|d| format!("{} :{}", d.label, d.port).chars().count())
        .max()
        .unwrap_or(0)
        .max(20);
    let mut out = format!("{:<first$}", "from \\ to");
    for d in DESTINATIONS {
        out.push_str(&format!("  {:<col$}", format!("{} :{}", d.label, d.port)));
    }
    out.push('\n');
    for s in &sources {
        out.push_str(&format!("{s:<first$}"));
        for d in DESTINATIONS {
            let cell = rows
                .iter()
                .find(|(src, dst, ..)| &src.label == s && dst.addr == d.addr)
                .map(|(_, _, e, o)| {
                    let mark = if e == o { "  " } else { "!!" };
                    format!("{} / {} {mark}", word(*e), seen(*o))
                })
                .unwrap_or_default();
            out.push_str(&format!("  {cell:<col$}"));
        }
        out.push('\n');
    }
    out
}
