//! What a namespace receives, by source address: an nftables counter per source in its input
//! hook. Shows which address the data centre really sees for a town-hall PC (a local
//! 192.168.178.x must arrive as the town hall's unique address, never as itself).

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Counters in `ns` (table `inet NAME`, removed on drop) for packets from each source.
#[derive(Debug)]
pub struct SeenBySource<'a> {
    ns: &'a Netns,
    table: String,
    sources: Vec<String>,
}

impl<'a> SeenBySource<'a> {
    /// Starts counting in `ns` the packets addressed to it from each of `sources` (an address
    /// or a prefix, IPv4 or IPv6), in table `inet TABLE`.
    pub fn install(ns: &'a Netns, table: &str, sources: &[&str]) -> Result<SeenBySource<'a>> {
        ns.exec(&["nft", "add", "table", "inet", table])?;
        let seen = SeenBySource {
            ns,
            table: table.to_owned(),
            sources: sources.iter().map(|s| (*s).to_owned()).collect(),
        };
        ns.exec(&[
            "nft",
            "add",
            "chain",
            "inet",
            table,
            "input",
            "{ type filter hook input priority -10; policy accept; }",
        ])?;
        for s in sources {
            let family = if s.contains(':') { "ip6" } else { "ip" };
            let comment = format!("\"{s}\"");
            ns.exec(&[
                "nft", "add", "rule", "inet", table, "input", family, "saddr", s, "counter",
                "comment", &comment,
            ])
            .with_context(|| format!("counting packets from {s} in {}", ns.name()))?;
        }
        Ok(seen)
    }

    /// Packets received so far from each source, in the order they were given.
    pub fn packets(&self) -> Result<Vec<u64>> {
        let json = self
            .ns
            .exec(&["nft", "-j", "list", "table", "inet", &self.table])?;
        let v: serde_json::Value =
            serde_json::from_str(&json).context("nft -j list table: not JSON")?;
        let rules: Vec<&serde_json::Value> = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("rule"))
            .collect();
        Ok(self
            .sources
            .iter()
            .map(|s| {
                rules
                    .iter()
                    .filter(|r| r["comment"] == *s)
                    .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
                    .filter_map(|e| e["counter"]["packets"].as_u64())
                    .sum()
            })
            .collect())
    }
}

impl Drop for SeenBySource<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .exec(&["nft", "delete", "table", "inet", &self.table]);
    }
}
