//! Home-office identities for the played peers, issued by the enrollment service through its
//! admin API (the same call as `komnet homeoffice issue --public-key`): the service allocates
//! each device's address from its tenant's pool, signs its certificate and publishes it in the
//! registry, from which every hub admits it. The private keys are made here and never leave.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use komnet_enroll_admin::{AdminCommand, HomeofficeCommand, HomeofficeIssueArgs, SocketArg};
use komnet_proto::identity::{SiteId, TenantId, WgPublicKey};

use crate::peers::PeerLine;

pub(crate) struct IssueArgs {
    pub(crate) socket: PathBuf,
    pub(crate) tenants: Vec<String>,
    pub(crate) count: usize,
    pub(crate) prefix: String,
    pub(crate) concurrency: usize,
    pub(crate) work_dir: PathBuf,
}

/// The first IPv4 address of the `Address =` line of a wg-quick configuration.
pub(crate) fn address_of(config: &str) -> Option<Ipv4Addr> {
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("Address"))?
        .trim_start_matches([' ', '='])
        .split(',')
        .find_map(|a| a.trim().split('/').next()?.parse().ok())
}

async fn issue_one(args: &IssueArgs, i: usize) -> Result<PeerLine> {
    let secret = boringtun::x25519::StaticSecret::random_from_rng(rand::rngs::OsRng);
    let public = boringtun::x25519::PublicKey::from(&secret);
    let tenant = &args.tenants[i % args.tenants.len()];
    let user = format!("{}-{i:05}", args.prefix);
    let dir = args.work_dir.join(&user);
    let cmd = AdminCommand::Homeoffice(HomeofficeCommand::Issue(HomeofficeIssueArgs {
        tenant: TenantId::parse(tenant).map_err(|e| anyhow!("tenant {tenant:?}: {e}"))?,
        user: SiteId::parse(&user).map_err(|e| anyhow!("user {user:?}: {e}"))?,
        public_key: Some(
            WgPublicKey::from_bytes(*public.as_bytes()).map_err(|e| anyhow!("key: {e}"))?,
        ),
        ttl: None,
        out_dir: dir.clone(),
        no_qr: true,
        socket: SocketArg {
            socket: args.socket.clone(),
        },
    }));
    let mut out = Vec::new();
    komnet_enroll_admin::run_to(cmd, &mut out)
        .await
        .with_context(|| format!("issuing {tenant}/{user}"))?;
    let conf = dir.join(format!("{user}.conf"));
    let text =
        std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    let addr =
        address_of(&text).ok_or_else(|| anyhow!("{}: no IPv4 Address line", conf.display()))?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(PeerLine {
        private: secret.to_bytes(),
        public: *public.as_bytes(),
        addr,
    })
}

/// Issues `count` identities, `concurrency` requests at a time, and writes the peers file.
pub(crate) fn issue(args: IssueArgs, out: &Path) -> Result<String> {
    if args.tenants.is_empty() || args.count == 0 || args.concurrency == 0 {
        bail!("issue needs --tenant, a --count and a --concurrency above zero");
    }
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let t0 = Instant::now();
    let args = std::rc::Rc::new(args);
    let lines: Vec<PeerLine> = tokio::task::LocalSet::new().block_on(&rt, async {
        let next = std::rc::Rc::new(std::cell::Cell::new(0usize));
        let mut workers = Vec::new();
        for _ in 0..args.concurrency {
            let (args, next) = (args.clone(), next.clone());
            workers.push(tokio::task::spawn_local(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.get();
                    if i >= args.count {
                        return Ok::<_, anyhow::Error>(mine);
                    }
                    next.set(i + 1);
                    mine.push((i, issue_one(&args, i).await?));
                }
            }));
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.context("an issuing task failed")??);
        }
        all.sort_by_key(|(i, _)| *i);
        Ok::<_, anyhow::Error>(all.into_iter().map(|(_, l)| l).collect())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let text: String = lines.iter().map(|l| l.render() + "\n").collect();
    write_secret(out, &text)?;
    Ok(format!(
        "{{\"issued\":{},\"seconds\":{secs:.3},\"per_second\":{:.1},\"concurrency\":{}}}",
        lines.len(),
        lines.len() as f64 / secs,
        args.concurrency
    ))
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_comes_from_the_wg_quick_address_line() {
        let conf =
            "[Interface]\nPrivateKey = x\nAddress = fd00::5/128, 10.200.0.9/32\nDNS = 1.1.1.1\n";
        assert_eq!(address_of(conf), Some("10.200.0.9".parse().unwrap()));
        assert_eq!(address_of("[Interface]\n"), None);
    }
}
