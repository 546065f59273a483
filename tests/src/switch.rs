//! A town hall's switch in a namespace: access ports that put a host (its `eth0`, untagged)
//! into one VLAN, and the link to the appliance that carries the VLANs.
//!
//! On a kernel with 802.1Q (`CONFIG_VLAN_8021Q`, every Debian kernel, so the appliance's) the
//! switch is a VLAN-aware Linux bridge (`vlan_filtering`) and the link is one trunk (a veth)
//! on which the VLANs travel tagged; the appliance makes its own VLAN interfaces on it.
//! [`Switch::tagged`] says which kind this machine gives. A kernel built without 802.1Q (some
//! minimal VM kernels) can neither tag nor make VLAN interfaces; there the switch has one
//! bridge per VLAN and hands the appliance one veth per VLAN, named as the appliance names its
//! VLAN interface (`TRUNK.ID`), so everything above layer 2 (addresses, routes, nftables'
//! `iifname`, the spoofer sharing the guests' link) is the same.
//!
//! ```text
//!  appliance: TRUNK ══ trunk0 [switch: br0, vlan_filtering] p1 ── eth0 host (VLAN 10)
//!                                                           p2 ── eth0 host (VLAN 100)
//!  (no 802.1Q:  TRUNK.10 ── [v10 bridge] ── host,  TRUNK.100 ── [v100 bridge] ── host)
//! ```

use std::sync::OnceLock;

use anyhow::Result;

use crate::command::host;
use crate::netns::{add_veth_pair, Netns};

/// The VLAN the switch uses for untagged frames on the trunk (the trunk's "native" VLAN).
const NATIVE: u16 = 4000;

/// Whether this kernel makes VLAN interfaces (checked once, in a throwaway namespace).
fn kernel_has_8021q() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let Ok(ns) = Netns::new("8021q-probe") else {
            return false;
        };
        let has = ns.ip(&["link", "add", "probe0", "type", "dummy"]).is_ok()
            && ns
                .ip(&[
                    "link", "add", "link", "probe0", "name", "probe0.7", "type", "vlan", "id", "7",
                ])
                .is_ok();
        if !has {
            // Said once per test binary, so a log shows which layer 2 a run had: the VLAN
            // interfaces' own code runs in the image test (the appliance's kernel has 802.1Q).
            eprintln!(
                "switch: this kernel makes no VLAN interfaces (CONFIG_VLAN_8021Q): the switch \
                 hands the appliance one link per VLAN (TRUNK.ID) instead of tagged frames; \
                 everything above layer 2 is the same, tagged frames are tested by \
                 packaging/test-image.sh"
            );
        }
        has
    })
}

/// The switch; its namespace (and with it every port) goes when it is dropped.
#[derive(Debug)]
pub struct Switch {
    pub ns: Netns,
    appliance: String,
    trunk: String,
    tagged: bool,
    ports: u32,
    vlans: Vec<u16>,
}

impl Switch {
    /// A switch whose link to `appliance` is its interface `trunk` (up, no addresses); without
    /// 802.1Q the appliance gets `trunk.ID` per VLAN instead, as VLANs come into use.
    pub fn new(label: &str, appliance: &Netns, trunk: &str) -> Result<Switch> {
        let ns = Netns::new(label)?;
        let tagged = kernel_has_8021q();
        if tagged {
            ns.ip(&[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "vlan_filtering",
                "1",
                "vlan_default_pvid",
                "0",
            ])?;
            ns.ip(&["link", "set", "br0", "up"])?;
            add_veth_pair(appliance, trunk, &ns, "trunk0", 1500)?;
            ns.ip(&["link", "set", "trunk0", "master", "br0"])?;
        }
        Ok(Switch {
            ns,
            appliance: appliance.name().to_owned(),
            trunk: trunk.to_owned(),
            tagged,
            ports: 0,
            vlans: Vec::new(),
        })
    }

    /// Whether the VLANs travel tagged on one trunk (the kernel has 802.1Q): then the
    /// appliance must make its VLAN interfaces itself. Otherwise the switch made them (as
    /// veths) when the VLAN's first port was plugged in.
    pub fn tagged(&self) -> bool {
        self.tagged
    }

    /// Makes `vlan` (`None`: the trunk's untagged frames) reach the appliance.
    fn carry(&mut self, vlan: Option<u16>) -> Result<()> {
        let vid = vlan.unwrap_or(NATIVE);
        if self.vlans.contains(&vid) {
            return Ok(());
        }
        if self.tagged {
            let vid_text = vid.to_string();
            let mut args = vec!["bridge", "vlan", "add", "dev", "trunk0", "vid", &vid_text];
            if vlan.is_none() {
                args.extend(["pvid", "untagged"]);
            }
            self.ns.exec(&args)?;
        } else {
            let bridge = format!("v{vid}");
            self.ns.ip(&["link", "add", &bridge, "type", "bridge"])?;
            self.ns.ip(&["link", "set", &bridge, "up"])?;
            let name = match vlan {
                Some(id) => komnet_policy::nft::vlan_interface(&self.trunk, id),
                None => self.trunk.clone(),
            };
            let uplink = format!("u{vid}");
            host(
                "ip",
                &[
                    "link",
                    "add",
                    &name,
                    "netns",
                    &self.appliance,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &uplink,
                    "netns",
                    self.ns.name(),
                ],
            )?;
            host("ip", &["-n", &self.appliance, "link", "set", &name, "up"])?;
            self.ns.ip(&["link", "set", &uplink, "master", &bridge])?;
            self.ns.ip(&["link", "set", &uplink, "up"])?;
        }
        self.vlans.push(vid);
        Ok(())
    }

    /// Plugs `host` into a new access port (numbered from 1, see [`Switch::move_port`]): its
    /// `eth0` sends and receives untagged frames of `vlan`, or with `None` the trunk's
    /// untagged (native) frames.
    pub fn access_port(&mut self, host: &Netns, vlan: Option<u16>) -> Result<u32> {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        add_veth_pair(&self.ns, &port, host, "eth0", 1500)?;
        self.join(&port, vlan)?;
        Ok(self.ports)
    }

    fn join(&mut self, port: &str, vlan: Option<u16>) -> Result<()> {
        self.carry(vlan)?;
        let vid = vlan.unwrap_or(NATIVE);
        if self.tagged {
            self.ns.ip(&["link", "set", port, "master", "br0"])?;
            self.ns.exec(&[
                "bridge",
                "vlan",
                "add",
                "dev",
                port,
                "vid",
                &vid.to_string(),
                "pvid",
                "untagged",
            ])?;
        } else {
            self.ns
                .ip(&["link", "set", port, "master", &format!("v{vid}")])?;
        }
        Ok(())
    }

    /// Re-patches access port `port` from VLAN `from` to VLAN `to`.
    pub fn move_port(&mut self, port: u32, from: Option<u16>, to: Option<u16>) -> Result<()> {
        let name = format!("p{port}");
        if self.tagged {
            let old = from.unwrap_or(NATIVE).to_string();
            self.ns
                .exec(&["bridge", "vlan", "del", "dev", &name, "vid", &old])?;
        } else {
            self.ns.ip(&["link", "set", &name, "nomaster"])?;
        }
        self.join(&name, to)
    }
}
