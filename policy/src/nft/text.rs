//! The ruleset in nft's text syntax, for people and `nft -f`.

use super::build::quote_list;
use super::*;

impl fmt::Display for Ruleset {
    /// nft's own text syntax: `nft -f` accepts it as is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {TABLE} {{")?;
        for s in &self.sets {
            let elems: Vec<String> = s.elements.iter().map(ToString::to_string).collect();
            writeln!(f, "\t# {}", s.comment)?;
            writeln!(f, "\tset {} {{", s.name)?;
            writeln!(
                f,
                "\t\ttype {}\n\t\tflags interval",
                match s.family {
                    Family::V4 => "ipv4_addr",
                    Family::V6 => "ipv6_addr",
                }
            )?;
            writeln!(f, "\t\telements = {{ {} }}\n\t}}", elems.join(", "))?;
        }
        for c in &self.chains {
            writeln!(f, "\tchain {} {{", c.name)?;
            match c.base {
                Some(Hook::Forward) => writeln!(
                    f,
                    "\t\ttype filter hook forward priority filter; policy drop;"
                )?,
                Some(Hook::Prerouting) => writeln!(
                    f,
                    "\t\ttype filter hook prerouting priority raw; policy accept;"
                )?,
                None => {}
            }
            for r in &c.rules {
                let mut line = String::new();
                for m in &r.matches {
                    let _ = match m {
                        Match::Iif(n) => write!(line, "iifname {} ", quote_list(n)),
                        Match::Oif(n) => write!(line, "oifname {} ", quote_list(n)),
                        Match::CtState(s) => write!(line, "ct state {} ", s.join(",")),
                        Match::Saddr(fam, set) => write!(line, "{} saddr @{set} ", fam.proto()),
                        Match::Daddr(fam, set) => write!(line, "{} daddr @{set} ", fam.proto()),
                        Match::SaddrIn(fam, nets) => {
                            let items: Vec<String> = nets.iter().map(ToString::to_string).collect();
                            write!(line, "{} saddr {{ {} }} ", fam.proto(), items.join(", "))
                        }
                        Match::Udp(field, port) => write!(line, "udp {field} {port} "),
                        Match::L4 {
                            family,
                            proto,
                            ports,
                        } => match (proto, ports) {
                            (Proto::Icmp, _) => write!(line, "meta l4proto {} ", family.icmp()),
                            (p, None) => write!(line, "meta l4proto {p} "),
                            (p, Some(r)) => {
                                let items: Vec<String> = r
                                    .iter()
                                    .map(|&(lo, hi)| {
                                        if lo == hi {
                                            lo.to_string()
                                        } else {
                                            format!("{lo}-{hi}")
                                        }
                                    })
                                    .collect();
                                write!(line, "{p} dport {{ {} }} ", items.join(", "))
                            }
                        },
                    };
                }
                if r.counter {
                    line.push_str("counter ");
                }
                let _ = match r.verdict {
                    Verdict::Accept => write!(line, "accept"),
                    Verdict::Drop => write!(line, "drop"),
                    Verdict::Jump(t) => write!(line, "jump {t}"),
                    Verdict::Return => write!(line, "return"),
                };
                writeln!(f, "\t\t{line} comment \"{}\"", r.comment.replace('"', "'"))?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")?;
        if self.nat.is_empty() {
            return Ok(());
        }
        writeln!(f, "table inet {NAT_TABLE} {{")?;
        for (chain, hook, priority) in [
            ("prerouting", "prerouting", "dstnat"),
            ("postrouting", "postrouting", "srcnat"),
        ] {
            writeln!(f, "\tchain {chain} {{")?;
            writeln!(
                f,
                "\t\ttype nat hook {hook} priority {priority}; policy accept;"
            )?;
            for n in &self.nat {
                let p = n.family.proto();
                let comment = n.comment.replace('"', "'");
                if chain == "prerouting" {
                    writeln!(
                        f,
                        "\t\tiifname \"{}\" {p} daddr {} dnat {p} prefix to {p} daddr map {{ {} : {} }} comment \"{comment}\"",
                        n.tunnel, n.unique, n.unique, n.local
                    )?;
                } else {
                    writeln!(
                        f,
                        "\t\toifname \"{}\" {p} saddr {} snat {p} prefix to {p} saddr map {{ {} : {} }} comment \"{comment}\"",
                        n.tunnel, n.local, n.local, n.unique
                    )?;
                }
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}
