//! Spokes set up like the generic appliance image, for the district fixture: no policy key in
//! their gateway.toml (it comes with the bootstrap file), `wait_for_bootstrap` and
//! `lan_addresses` on, one LAN port `eth1` (as on the image) without addresses: the spoke puts
//! its site's gateway addresses there. Started without a bootstrap file; nothing is enrolled
//! until one is delivered.
//!
//! [`ApplianceSpoke`]: `eth1` is a cable to one host, `guest0`/`guest1` cables to a guest host
//! (the ports st-wendel binds its segments to). [`TrunkAppliance`]: `eth1` is the trunk from a
//! town hall's [`Switch`], with the VLANs a policy binds segments to.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{attach_to_wan, District, Gateway};
use crate::netns::{add_veth_pair, Netns};
use crate::switch::Switch;

/// An image-like spoke whose LAN port `eth1` goes to one host at 10.N.1.10 (see the module).
#[derive(Debug)]
pub struct ApplianceSpoke {
    pub spoke: Gateway,
    /// Where the spoke looks for its bootstrap file (`DATA_DIR/bootstrap.json`).
    pub bootstrap: PathBuf,
    pub gw: Netns,
    pub host: Netns,
    /// On the spoke's ports guest0 and guest1.
    pub guest: Netns,
}

impl ApplianceSpoke {
    /// Puts `file` where the spoke waits for it (see [`deliver_bootstrap`]).
    pub fn deliver_bootstrap(&self, file: &Path) -> Result<()> {
        deliver_bootstrap(&self.bootstrap, file)
    }

    /// The refused file the spoke moved aside, if any.
    pub fn refused_bootstrap(&self) -> PathBuf {
        let mut p = self.bootstrap.clone().into_os_string();
        p.push(".refused");
        PathBuf::from(p)
    }

    /// The addresses on `eth1` (`ip -brief addr`), e.g. `["10.30.1.1/24", ...]`.
    pub fn lan_addresses(&self) -> Result<Vec<String>> {
        self.addresses_on("eth1")
    }

    /// The addresses on the spoke's interface `dev`, link-local ones left out.
    pub fn addresses_on(&self, dev: &str) -> Result<Vec<String>> {
        self.gw.addresses_on(dev)
    }
}

/// An image-like spoke whose LAN port `eth1` is the trunk of a town hall's switch: plug hosts
/// into `switch` ([`Switch::access_port`]) on the VLANs the policy names.
#[derive(Debug)]
pub struct TrunkAppliance {
    pub spoke: Gateway,
    /// Where the spoke looks for its bootstrap file (`DATA_DIR/bootstrap.json`).
    pub bootstrap: PathBuf,
    pub gw: Netns,
    pub switch: Switch,
}

impl TrunkAppliance {
    /// Puts `file` where the spoke waits for it (see [`deliver_bootstrap`]).
    pub fn deliver_bootstrap(&self, file: &Path) -> Result<()> {
        deliver_bootstrap(&self.bootstrap, file)
    }

    /// The addresses on the spoke's interface `dev` (e.g. `eth1.10`), link-local ones left out.
    pub fn addresses_on(&self, dev: &str) -> Result<Vec<String>> {
        self.gw.addresses_on(dev)
    }
}

/// Puts `file` where the spoke waits for it, as the image's first-boot script must: a copy
/// next to the target, then a rename (the spoke never sees half a file).
fn deliver_bootstrap(bootstrap: &Path, file: &Path) -> Result<()> {
    let tmp = bootstrap.with_extension("json.part");
    std::fs::copy(file, &tmp).with_context(|| format!("copying {}", file.display()))?;
    std::fs::rename(&tmp, bootstrap).with_context(|| format!("renaming to {}", bootstrap.display()))
}

impl District {
    /// Starts a spoke configured like the generic appliance image ([`ApplianceSpoke`]) in a
    /// new namespace on the WAN (192.0.2.`wan_host`), with its LAN host at
    /// 10.`lan_octet`.1.10. It waits for a bootstrap file; nothing is enrolled yet.
    pub fn add_appliance_spoke(
        &mut self,
        name: &str,
        lan_octet: u8,
        wan_host: u8,
    ) -> Result<ApplianceSpoke> {
        self.add_appliance_spoke_with(name, lan_octet, wan_host, "")
    }

    /// [`Self::add_appliance_spoke`] with `extra` lines in its gateway.toml.
    pub fn add_appliance_spoke_with(
        &mut self,
        name: &str,
        lan_octet: u8,
        wan_host: u8,
        extra: &str,
    ) -> Result<ApplianceSpoke> {
        let gw = self.appliance_namespace(name, wan_host)?;
        let host = Netns::new(&format!("{name}-host"))?;
        add_veth_pair(&gw, "eth1", &host, "eth0", 1500)?;
        // The guest WLAN's ports (st-wendel binds the guests to guest0; a policy may move them
        // to guest1).
        let guest = Netns::new(&format!("{name}-guest"))?;
        add_veth_pair(&gw, "guest0", &guest, "eth0", 1500)?;
        add_veth_pair(&gw, "guest1", &guest, "eth1", 1500)?;
        host.add_address("eth0", IpAddr::V4(Ipv4Addr::new(10, lan_octet, 1, 10)), 24)?;
        let router = Ipv4Addr::new(10, lan_octet, 1, 1).to_string();
        host.ip(&["route", "add", "default", "via", &router])?;
        let (spoke, bootstrap) = self.start_image_spoke(name, &gw, extra)?;
        Ok(ApplianceSpoke {
            spoke,
            bootstrap,
            gw,
            host,
            guest,
        })
    }

    /// Starts an image-like spoke ([`TrunkAppliance`]) on the WAN (192.0.2.`wan_host`), its
    /// `eth1` the trunk of a switch with no ports yet, `extra` lines in its gateway.toml.
    pub fn add_trunk_appliance(
        &mut self,
        name: &str,
        wan_host: u8,
        extra: &str,
    ) -> Result<TrunkAppliance> {
        let gw = self.appliance_namespace(name, wan_host)?;
        let switch = Switch::new(&format!("{name}-sw"), &gw, "eth1")?;
        let (spoke, bootstrap) = self.start_image_spoke(name, &gw, extra)?;
        Ok(TrunkAppliance {
            spoke,
            bootstrap,
            gw,
            switch,
        })
    }

    /// A new namespace `NAME-gw` on the WAN at 192.0.2.`wan_host`.
    fn appliance_namespace(&mut self, name: &str, wan_host: u8) -> Result<Netns> {
        let gw = Netns::new(&format!("{name}-gw"))?;
        attach_to_wan(
            &self.wan,
            &gw,
            &mut self.wan_ports,
            Ipv4Addr::new(192, 0, 2, wan_host),
        )?;
        Ok(gw)
    }

    /// Starts `komnet-gateway` in `gw` as the image configures it, LAN port `eth1`: the
    /// process and where it waits for its bootstrap file.
    fn start_image_spoke(&self, name: &str, gw: &Netns, extra: &str) -> Result<(Gateway, PathBuf)> {
        let (config, data_dir) = self.gateway_config_with(
            name,
            false,
            &format!("role = \"spoke\"\nlan = [\"eth1\"]\nwait_for_bootstrap = true\nlan_addresses = true\n{extra}"),
        )?;
        std::fs::create_dir_all(&data_dir)?;
        let mut spoke = Gateway {
            name: name.to_owned(),
            netns: gw.name().to_owned(),
            config,
            data_dir: data_dir.clone(),
            metrics: "127.0.0.1:9120".into(),
            log_dir: self.dir.path().to_owned(),
            starts: 0,
            process: None,
        };
        spoke.start()?;
        Ok((spoke, data_dir.join("bootstrap.json")))
    }
}
