//! `gateway.toml`: what an appliance is (hub or spoke) and where its state lives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use komnet_proto::config::{check_interface_name, HumanDuration};
use serde::Deserialize;

use super::control::hub::OutagePolicy;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/komnet/gateway.toml";

/// A file setting (`policy_public_key`, `bootstrap`) that starts with this names a systemd
/// credential instead of a path: `credential:bootstrap.json` is the file systemd placed in
/// `$CREDENTIALS_DIRECTORY` for `LoadCredential=bootstrap.json:…`. systemd reads the source as
/// root and hands the unprivileged daemon a private, read-only copy, so the bootstrap token can
/// stay a root-only file.
pub const CREDENTIAL_PREFIX: &str = "credential:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayRole {
    /// A data-centre concentrator: admits certified peers, enforces the policy per packet.
    Hub,
    /// A town-hall appliance: tunnels its LAN segments to the hubs, nftables enforce locally.
    Spoke,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub role: GatewayRole,
    /// Keys, certificate, last-known-good policy (created with mode 0700).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The bootstrap file from `komnet token create`; read on first start only.
    pub bootstrap: Option<PathBuf>,
    /// Enrollment service URLs, tried in order; when set they replace the ones in the
    /// bootstrap file and the stored enrollment (e.g. after the service moved).
    #[serde(default)]
    pub enroll_urls: Vec<String>,
    /// The TUN interface the tunnel uses.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// UDP port for WireGuard; 0 picks a free one (fine for spokes, hubs need a fixed one).
    #[serde(default)]
    pub listen_port: u16,
    /// The policy signing key (the `.pub` file of `komnet policy keygen`), pinned. When not
    /// set: `DATA_DIR/policy.pub`, which the first enrollment writes from the key the bootstrap
    /// file carries.
    pub policy_public_key: Option<PathBuf>,
    /// Not enrolled and no bootstrap file: wait for one (polled every 2 s) instead of exiting;
    /// a refused or unreadable one is moved aside to `<bootstrap>.refused` and waited for again.
    #[serde(default)]
    pub wait_for_bootstrap: bool,
    /// Spoke: put the first host address of each of its site's segment prefixes on the first
    /// `lan` interface (the appliance is its town hall's router), following the policy.
    #[serde(default)]
    pub lan_addresses: bool,
    /// Spoke with `lan_addresses`: serve the site's segments by DHCP (and IPv6 router
    /// advertisements): the gateway writes the configuration of the DHCP server (dnsmasq) for
    /// the policy in force to this file, and removes it when the policy serves no segment;
    /// `komnet-dhcp.service` runs dnsmasq with it (a path unit restarts it when the file
    /// changes). Unset: no DHCP.
    #[serde(default)]
    pub dhcp_config: Option<PathBuf>,
    /// How often the policy bundle is polled from the enrollment service.
    #[serde(default = "default_policy_poll")]
    pub policy_poll: HumanDuration,
    /// Spoke: the town-hall LAN interfaces whose segments it forwards.
    #[serde(default)]
    pub lan: Vec<String>,
    /// `/metrics` and `/status` (HTTP, no authentication: keep it on loopback or a
    /// management network).
    #[serde(default = "default_metrics")]
    pub metrics_listen: SocketAddr,
    /// Logs as JSON lines.
    #[serde(default)]
    pub log_json: bool,
    /// Spoke: a hub that sent nothing for this long is given up for the next one.
    #[serde(default = "default_failover_after")]
    pub failover_after: HumanDuration,
    /// Keepalive interval between spoke and hub (both ways), seconds: it is how a spoke notices
    /// a hub that stopped answering.
    #[serde(default = "default_keepalive")]
    pub keepalive: u16,
    /// Hub: a registry outage this long (no snapshot and stream of revocations) raises the
    /// alarm in the log, `komnet status` and `/metrics`, and applies `registry_outage`.
    #[serde(default = "default_registry_outage_alarm")]
    pub registry_outage_alarm: HumanDuration,
    /// Hub: what to do during such an outage: `keep-peers` (the district keeps working;
    /// revocations made meanwhile take effect when the registry is back) or `remove-peers`
    /// (no peer is admitted until the registry is back).
    #[serde(default)]
    pub registry_outage: OutagePolicy,
    /// Hub: most flows the firewall remembers.
    #[serde(default = "default_max_flows")]
    pub max_flows: usize,
    /// Hub on its own machine: keep the prefixes of the peers that use this hub in a kernel
    /// routing table of their own, for the routing daemon to announce by BGP
    /// (docs/operations.md, "Hubs on separate machines").
    #[serde(default)]
    pub bgp: Option<BgpConfig>,
    /// Settings that named a credential (resolved to a file in the credentials directory).
    #[serde(skip)]
    pub credentials: Vec<&'static str>,
}

/// `[bgp]`: the announcement table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// The kernel routing table (1 to 2^32-1, not 253, 254 or 255: the kernel's own) that
    /// holds exactly the prefixes this hub announces; nothing else may use it. The hub empties
    /// it at start. The routing daemon imports it (BIRD: `kernel table N; learn;`).
    pub table: u32,
    /// A spoke that sent nothing (no data, no keepalive) for this long is withdrawn. Home
    /// offices: 180 s, WireGuard's session lifetime.
    #[serde(default = "default_bgp_hold")]
    pub hold: HumanDuration,
    /// The hub machine's BIRD control socket (Debian: `/run/bird/bird.ctl`): the hub reads its
    /// BGP sessions there every few seconds (`show protocols`, nothing else) and reports one
    /// that is not Established. Absent: not watched.
    #[serde(default)]
    pub bird_socket: Option<PathBuf>,
}

fn default_bgp_hold() -> HumanDuration {
    HumanDuration(super::control::announce::DEFAULT_SPOKE_HOLD)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/komnet")
}
fn default_interface() -> String {
    "komnet0".into()
}
fn default_policy_poll() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9120))
}
fn default_failover_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(3))
}
fn default_keepalive() -> u16 {
    1
}
fn default_registry_outage_alarm() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_max_flows() -> usize {
    262_144
}

/// The same error as the enrollment service's configuration: file, then what is wrong.
pub use komnet_proto::config::ConfigError;

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text`; `credential:` settings resolve against `$CREDENTIALS_DIRECTORY`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::parse_with_credentials(path, text, dir.as_deref())
    }

    /// Like [`GatewayConfig::parse`] with the credentials directory given.
    pub fn parse_with_credentials(
        path: &Path,
        text: &str,
        credentials_dir: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let mut config: GatewayConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut problems = Vec::new();
        if let Some(key) = config.policy_public_key.as_mut() {
            if let Some(p) =
                resolve_credential("policy_public_key", key, credentials_dir, &mut problems)
            {
                config.credentials.push(p);
            }
        }
        if let Some(bootstrap) = config.bootstrap.as_mut() {
            if let Some(p) =
                resolve_credential("bootstrap", bootstrap, credentials_dir, &mut problems)
            {
                config.credentials.push(p);
            }
        }
        if let Err(mut more) = config.check() {
            problems.append(&mut more);
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        Ok(config)
    }

    /// Whether `bootstrap` names a systemd credential (an empty one means: no file was there).
    pub fn bootstrap_is_credential(&self) -> bool {
        self.credentials.contains(&"bootstrap")
    }

    /// Whether `policy_public_key` names a systemd credential.
    pub fn policy_key_is_credential(&self) -> bool {
        self.credentials.contains(&"policy_public_key")
    }

    /// Every problem at once.
    fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = check_interface_name(&self.interface) {
            problems.push(format!("interface: {e}"));
        }
        for lan in &self.lan {
            if let Err(e) = check_interface_name(lan) {
                problems.push(format!("lan: {e}"));
            }
            if *lan == self.interface {
                problems.push(format!("lan: {lan:?} is the tunnel interface"));
            }
        }
        for url in &self.enroll_urls {
            if !url.starts_with("https://") {
                problems.push(format!("enroll_urls: {url:?} must start with https://"));
            }
        }
        let hub = self.role == GatewayRole::Hub;
        if !hub && self.lan.is_empty() {
            problems.push("lan: a spoke needs at least one LAN interface".into());
        }
        if hub && !self.lan.is_empty() {
            problems
                .push("lan: only spokes have LAN interfaces; a hub routes with the host".into());
        }
        if hub && self.lan_addresses {
            problems.push(
                "lan_addresses: only spokes put addresses on a LAN interface; a hub has none"
                    .into(),
            );
        }
        let bootstrap_credential = self.bootstrap_is_credential()
            || self
                .bootstrap
                .as_deref()
                .and_then(Path::to_str)
                .is_some_and(|b| b.starts_with(CREDENTIAL_PREFIX));
        if self.wait_for_bootstrap && bootstrap_credential {
            problems.push(format!(
                "wait_for_bootstrap: the bootstrap file cannot be a systemd credential \
                 ({CREDENTIAL_PREFIX}NAME): systemd copies it once when the unit starts, so a file \
                 put in place later is never seen and a refused one cannot be moved aside; give \
                 its path (e.g. bootstrap = \"/var/lib/komnet/bootstrap.json\", owned by the \
                 daemon's user) or leave bootstrap out for DATA_DIR/bootstrap.json"
            ));
        }
        if let Some(path) = &self.dhcp_config {
            if hub {
                problems
                    .push("dhcp_config: only spokes serve a LAN by DHCP; a hub has none".into());
            } else if !self.lan_addresses {
                problems.push(
                    "dhcp_config: needs lan_addresses = true (the DHCP server hands out the segments' gateway addresses as their router, so they must be on the LAN)".into(),
                );
            }
            if !path.is_absolute() || path.file_name().is_none() {
                problems.push(format!(
                    "dhcp_config: {} must be an absolute path to a file (e.g. /run/komnet/dnsmasq.conf)",
                    path.display()
                ));
            }
        }
        if hub && self.listen_port == 0 {
            problems.push(
                "listen_port: a hub needs a fixed port (the one in the enrollment service's hub_endpoints)"
                    .into(),
            );
        }
        if self.policy_poll.0 < Duration::from_secs(1) {
            problems.push("policy_poll: at least 1s".into());
        }
        if self.registry_outage_alarm.0 < Duration::from_secs(1) {
            problems.push("registry_outage_alarm: at least 1s".into());
        }
        if self.failover_after.0 < Duration::from_secs(1) {
            problems.push("failover_after: at least 1s".into());
        }
        if self.keepalive == 0 {
            problems.push("keepalive: at least 1 (seconds)".into());
        }
        if self.max_flows < 1024 {
            problems.push("max_flows: at least 1024".into());
        }
        if let Some(bgp) = &self.bgp {
            if !hub {
                problems.push(
                    "bgp: only hubs announce routes; a spoke's are the hubs' business".into(),
                );
            }
            if matches!(bgp.table, 0 | 253..=255) {
                problems.push(format!(
                    "bgp.table: {} is {}; give a table of its own (e.g. 200)",
                    bgp.table,
                    match bgp.table {
                        0 => "no table",
                        253 => "the kernel's default table",
                        254 => "the main table",
                        _ => "the local table",
                    }
                ));
            }
            if bgp.hold.0 < Duration::from_secs(1) {
                problems.push("bgp.hold: at least 1s".into());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Where the bootstrap file is looked for.
    pub fn bootstrap_path(&self) -> PathBuf {
        self.bootstrap
            .clone()
            .unwrap_or_else(|| self.data_dir.join("bootstrap.json"))
    }
}

/// Turns `credential:NAME` in `value` into the credential's file; returns `Some(key)` when it
/// did. Problems (a bad name, no credentials directory) are added to `problems`.
fn resolve_credential(
    key: &'static str,
    value: &mut PathBuf,
    credentials_dir: Option<&Path>,
    problems: &mut Vec<String>,
) -> Option<&'static str> {
    let name = value.to_str()?.strip_prefix(CREDENTIAL_PREFIX)?.to_owned();
    // The same rule systemd applies to credential IDs: one file name.
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
        problems.push(format!(
            "{key}: {CREDENTIAL_PREFIX}{name:?} is not a credential name (one file name, as in LoadCredential=NAME:PATH)"
        ));
        return None;
    }
    match credentials_dir {
        Some(dir) => {
            *value = dir.join(&name);
            Some(key)
        }
        None => {
            problems.push(format!(
                "{key}: {CREDENTIAL_PREFIX}{name} names a systemd credential, but $CREDENTIALS_DIRECTORY is not set \
                 (it is under komnet-gateway.service with LoadCredential={name}:…; run by hand, give the file's path)"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spoke_config_parses_with_defaults() {
        let c = GatewayConfig::parse(
            Path::new("gateway.toml"),
            "role = \"spoke\"\npolicy_public_key = \"/etc/komnet/policy.pub\"\nlan = [\"eth1\"]\n",
        )
        .unwrap();
        assert_eq!(c.role, GatewayRole::Spoke);
        assert_eq!(c.interface, "komnet0");
        assert_eq!(
            c.bootstrap_path(),
            Path::new("/var/lib/komnet/bootstrap.json")
        );
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9120");
    }

    /// What the generic appliance image ships: no key (it comes with the bootstrap file), a
    /// bootstrap file waited for, the LAN's gateway addresses from the policy.
    #[test]
    fn the_appliance_settings_parse_and_default_to_off() {
        let c = GatewayConfig::parse(
            Path::new("gateway.toml"),
            "role = \"spoke\"\nlan = [\"eth1\"]\n",
        )
        .unwrap();
        assert_eq!(c.policy_public_key, None);
        assert!(!c.wait_for_bootstrap);
        assert!(!c.lan_addresses);
        let c = GatewayConfig::parse(
            Path::new("gateway.toml"),
            "role = \"spoke\"\nlan = [\"eth1\"]\nwait_for_bootstrap = true\nlan_addresses = true\n\
             bootstrap = \"/var/lib/komnet/bootstrap.json\"\n",
        )
        .unwrap();
        assert!(c.wait_for_bootstrap);
        assert!(c.lan_addresses);
        assert_eq!(c.policy_public_key, None);
        assert!(!c.bootstrap_is_credential());
    }

    #[test]
    fn appliance_settings_that_cannot_work_are_named_with_the_file() {
        let e = GatewayConfig::parse(
            Path::new("/etc/komnet/gateway.toml"),
            "role = \"hub\"\nlisten_port = 51820\nlan_addresses = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/etc/komnet/gateway.toml: "), "{e}");
        assert!(
            e.contains("lan_addresses: only spokes put addresses on a LAN interface"),
            "{e}"
        );
        // A credential is copied once at the unit's start: waiting for it would wait forever.
        let dir = Path::new("/run/credentials/komnet-gateway.service");
        for credentials in [Some(dir), None] {
            let e = GatewayConfig::parse_with_credentials(
                Path::new("/etc/komnet/gateway.toml"),
                "role = \"spoke\"\nlan = [\"eth1\"]\nwait_for_bootstrap = true\n\
                 bootstrap = \"credential:bootstrap.json\"\n",
                credentials,
            )
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("/etc/komnet/gateway.toml: "), "{e}");
            assert!(
                e.contains("wait_for_bootstrap: the bootstrap file cannot be a systemd credential"),
                "{e}"
            );
        }
        let e = GatewayConfig::parse(
            Path::new("g.toml"),
            "role = \"spoke\"\nlan = [\"eth1\"]\nwait_for_bootstrap = \"yes\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("g.toml: ") && e.contains("wait_for_bootstrap"),
            "{e}"
        );
    }

    #[test]
    fn every_problem_is_named_with_the_file() {
        let e = GatewayConfig::parse(
            Path::new("/etc/komnet/gateway.toml"),
            "role = \"hub\"\npolicy_public_key = \"k\"\nlan = [\"eth 1\"]\ninterface = \"a-very-long-interface\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/etc/komnet/gateway.toml: "), "{e}");
        assert!(
            e.contains("interface: interface name \"a-very-long-interface\" must be 1 to 15"),
            "{e}"
        );
        assert!(e.contains("lan: interface name \"eth 1\" contains"), "{e}");
        assert!(e.contains("only spokes have LAN"), "{e}");
        assert!(e.contains("listen_port"), "{e}");
        let e = GatewayConfig::parse(
            Path::new("g.toml"),
            "role = \"spoke\"\npolicy_public_key = \"k\"\nlan = [\"eth1\"]\nenroll_urls = [\"http://x\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("enroll_urls: \"http://x\" must start with https://"),
            "{e}"
        );
        let e = GatewayConfig::parse(Path::new("g.toml"), "role = \"router\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("router"), "{e}");
        let e = GatewayConfig::parse(Path::new("g.toml"), "role = \"hub\"\nlisten_prot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_prot"), "{e}");
    }

    #[test]
    fn the_bgp_table_is_a_hubs_own_and_its_hold_defaults_to_three_seconds() {
        let c = GatewayConfig::parse(
            Path::new("gateway.toml"),
            "role = \"hub\"\nlisten_port = 51820\n[bgp]\ntable = 200\n",
        )
        .unwrap();
        let bgp = c.bgp.expect("[bgp]");
        assert_eq!(bgp.table, 200);
        assert_eq!(bgp.hold.0, Duration::from_secs(3));
        for (text, needle) in [
            (
                "role = \"hub\"\nlisten_port = 51820\n[bgp]\ntable = 254\n",
                "bgp.table: 254 is the main table",
            ),
            (
                "role = \"hub\"\nlisten_port = 51820\n[bgp]\ntable = 200\nhold = \"0s\"\n",
                "bgp.hold: at least 1s",
            ),
            (
                "role = \"spoke\"\nlan = [\"eth1\"]\n[bgp]\ntable = 200\n",
                "bgp: only hubs announce routes",
            ),
            (
                "role = \"hub\"\nlisten_port = 51820\n[bgp]\ntable = 200\nasn = 65001\n",
                "asn",
            ),
        ] {
            let e = GatewayConfig::parse(Path::new("gateway.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("gateway.toml: ") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn credential_settings_resolve_in_the_credentials_directory() {
        let text = "role = \"spoke\"\nlan = [\"eth1\"]\npolicy_public_key = \"credential:policy.pub\"\nbootstrap = \"credential:bootstrap.json\"\n";
        let dir = Path::new("/run/credentials/komnet-gateway.service");
        let c =
            GatewayConfig::parse_with_credentials(Path::new("g.toml"), text, Some(dir)).unwrap();
        assert_eq!(c.policy_public_key, Some(dir.join("policy.pub")));
        assert!(c.policy_key_is_credential());
        assert_eq!(c.bootstrap_path(), dir.join("bootstrap.json"));
        assert!(c.bootstrap_is_credential());
        // Plain paths stay paths.
        let c = GatewayConfig::parse_with_credentials(
            Path::new("g.toml"),
            "role = \"spoke\"\nlan = [\"eth1\"]\npolicy_public_key = \"/etc/komnet/policy.pub\"\n",
            Some(dir),
        )
        .unwrap();
        assert_eq!(
            c.policy_public_key.as_deref(),
            Some(Path::new("/etc/komnet/policy.pub"))
        );
        assert!(!c.bootstrap_is_credential());
        assert!(!c.policy_key_is_credential());
    }

    #[test]
    fn dhcp_needs_a_spoke_that_is_its_lans_router_and_an_absolute_path() {
        let ok = GatewayConfig::parse(
            Path::new("gateway.toml"),
            "role = \"spoke\"\nlan = [\"eth1\"]\nlan_addresses = true\ndhcp_config = \"/run/komnet/dnsmasq.conf\"\n",
        )
        .unwrap();
        assert_eq!(
            ok.dhcp_config.as_deref(),
            Some(Path::new("/run/komnet/dnsmasq.conf"))
        );
        for (text, needle) in [
            (
                "role = \"spoke\"\nlan = [\"eth1\"]\ndhcp_config = \"/run/komnet/dnsmasq.conf\"\n",
                "dhcp_config: needs lan_addresses = true",
            ),
            (
                "role = \"spoke\"\nlan = [\"eth1\"]\nlan_addresses = true\ndhcp_config = \"dnsmasq.conf\"\n",
                "dhcp_config: dnsmasq.conf must be an absolute path",
            ),
            (
                "role = \"hub\"\nlisten_port = 51820\ndhcp_config = \"/run/komnet/dnsmasq.conf\"\n",
                "dhcp_config: only spokes serve a LAN by DHCP",
            ),
        ] {
            let e = GatewayConfig::parse(Path::new("gateway.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn a_credential_outside_systemd_or_with_a_bad_name_is_explained() {
        let text = "role = \"spoke\"\nlan = [\"eth1\"]\npolicy_public_key = \"credential:policy.pub\"\nbootstrap = \"credential:../etc/shadow\"\n";
        let e = GatewayConfig::parse_with_credentials(Path::new("g.toml"), text, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policy_public_key: credential:policy.pub names a systemd credential, but $CREDENTIALS_DIRECTORY is not set"),
            "{e}"
        );
        assert!(
            e.contains("bootstrap: credential:\"../etc/shadow\" is not a credential name"),
            "{e}"
        );
    }

    /// The example the Debian package installs: every key it shows parses, with the value it
    /// shows (its defaults must not drift from the code's), and as shipped (all commented) it
    /// is refused for want of a role.
    #[test]
    fn the_packaged_example_matches_the_code() {
        let shipped = include_str!("../../../packaging/etc/gateway.toml");
        let e = GatewayConfig::parse_with_credentials(Path::new("gateway.toml"), shipped, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `role`"), "{e}");
        let uncommented: String = shipped
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        // The example's role is a spoke's; its hub-only [bgp] section is read as a hub's.
        let (uncommented, bgp_section) = uncommented
            .split_once("[bgp]\n")
            .expect("the example shows [bgp]");
        let dir = Path::new("/run/credentials/komnet-gateway.service");
        let c = GatewayConfig::parse_with_credentials(
            Path::new("gateway.toml"),
            uncommented,
            Some(dir),
        )
        .unwrap();
        let hub = GatewayConfig::parse(
            Path::new("gateway.toml"),
            &format!("role = \"hub\"\nlisten_port = 51820\n[bgp]\n{bgp_section}"),
        )
        .unwrap();
        let defaults = GatewayConfig::parse_with_credentials(
            Path::new("gateway.toml"),
            "role = \"spoke\"\npolicy_public_key = \"k\"\nlan = [\"eth1\"]\n",
            None,
        )
        .unwrap();
        assert_eq!(c.data_dir, defaults.data_dir);
        assert_eq!(c.interface, defaults.interface);
        assert_eq!(c.listen_port, defaults.listen_port);
        assert_eq!(c.policy_poll, defaults.policy_poll);
        assert_eq!(c.metrics_listen, defaults.metrics_listen);
        assert_eq!(c.log_json, defaults.log_json);
        assert_eq!(c.failover_after, defaults.failover_after);
        assert_eq!(c.keepalive, defaults.keepalive);
        assert_eq!(c.max_flows, defaults.max_flows);
        let bgp = hub.bgp.as_ref().expect("[bgp]");
        assert_eq!(bgp.table, 200);
        assert_eq!(bgp.hold, default_bgp_hold());
        assert_eq!(c.wait_for_bootstrap, defaults.wait_for_bootstrap);
        assert_eq!(c.lan_addresses, defaults.lan_addresses);
        assert_eq!(c.policy_public_key, Some(dir.join("policy.pub")));
        assert_eq!(c.bootstrap_path(), dir.join("bootstrap.json"));
    }
}
