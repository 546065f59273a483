//! The ruleset as nft's JSON (`nft -j -f`), through the `nftables` crate where its schema
//! reaches and written by hand for the prefix translations where it does not.

use super::*;

impl NatDef {
    /// The two rules of this translation as nft JSON: `(chain, rule)`. dnat for what arrives
    /// from the tunnel for the unique prefix, snat for what leaves into it from the local one.
    fn json_rules(&self) -> [(&'static str, serde_json::Value); 2] {
        use serde_json::json;
        let p = self.family.proto();
        let prefix =
            |n: &IpNet| json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}});
        let field = |f: &str| json!({"payload": {"protocol": p, "field": f}});
        let rule = |chain: &str,
                    dir: &str,
                    field_name: &str,
                    from: &IpNet,
                    to: &IpNet,
                    nat: &str| {
            json!({
                "family": "inet",
                "table": NAT_TABLE,
                "chain": chain,
                "comment": self.comment,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": dir}}, "right": self.tunnel}},
                    {"match": {"op": "==", "left": field(field_name), "right": prefix(from)}},
                    {nat: {
                        "family": p,
                        "addr": {"map": {"key": field(field_name), "data": {"set": [[prefix(from), prefix(to)]]}}},
                        "flags": "netmap"
                    }}
                ]
            })
        };
        [
            (
                "prerouting",
                rule(
                    "prerouting",
                    "iifname",
                    "daddr",
                    &self.unique,
                    &self.local,
                    "dnat",
                ),
            ),
            (
                "postrouting",
                rule(
                    "postrouting",
                    "oifname",
                    "saddr",
                    &self.local,
                    &self.unique,
                    "snat",
                ),
            ),
        ]
    }
}

fn payload<'a>(protocol: &'static str, field: &'static str) -> expr::Expression<'a> {
    expr::Expression::Named(expr::NamedExpression::Payload(expr::Payload::PayloadField(
        expr::PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn meta<'a>(key: expr::MetaKey) -> expr::Expression<'a> {
    expr::Expression::Named(expr::NamedExpression::Meta(expr::Meta { key }))
}

fn matcher<'a>(
    left: expr::Expression<'a>,
    right: expr::Expression<'a>,
    op: stmt::Operator,
) -> stmt::Statement<'a> {
    stmt::Statement::Match(stmt::Match { left, right, op })
}

fn name_expr<'a>(names: &[String]) -> expr::Expression<'a> {
    match names {
        [one] => expr::Expression::String(one.clone().into()),
        many => expr::Expression::Named(expr::NamedExpression::Set(
            many.iter()
                .map(|n| expr::SetItem::Element(expr::Expression::String(n.clone().into())))
                .collect(),
        )),
    }
}

fn net_expr<'a>(net: &IpNet) -> expr::Expression<'a> {
    expr::Expression::Named(expr::NamedExpression::Prefix(expr::Prefix {
        addr: Box::new(expr::Expression::String(net.network().to_string().into())),
        len: u32::from(net.prefix_len()),
    }))
}

impl Ruleset {
    /// The JSON batch: create-if-missing, delete and recreate our table, all in one transaction,
    /// so the kernel switches from the old ruleset to the new one atomically.
    pub fn to_nftables(&self) -> schema::Nftables<'static> {
        let family = types::NfFamily::INet;
        let table = schema::Table {
            family,
            name: TABLE.into(),
            handle: None,
        };
        let mut batch = Batch::new();
        batch.add(schema::NfListObject::Table(table.clone()));
        batch.delete(schema::NfListObject::Table(table.clone()));
        batch.add(schema::NfListObject::Table(table));
        for s in &self.sets {
            batch.add(schema::NfListObject::Set(Box::new(schema::Set {
                family,
                table: TABLE.into(),
                name: s.name.clone().into(),
                handle: None,
                set_type: schema::SetTypeValue::Single(match s.family {
                    Family::V4 => schema::SetType::Ipv4Addr,
                    Family::V6 => schema::SetType::Ipv6Addr,
                }),
                policy: None,
                flags: Some([schema::SetFlag::Interval].into_iter().collect()),
                elem: Some(s.elements.iter().map(net_expr).collect::<Vec<_>>().into()),
                timeout: None,
                gc_interval: None,
                size: None,
                comment: None,
            })));
        }
        for c in &self.chains {
            batch.add(schema::NfListObject::Chain(schema::Chain {
                family,
                table: TABLE.into(),
                name: c.name.into(),
                _type: c.base.map(|_| types::NfChainType::Filter),
                hook: c.base.map(|h| match h {
                    Hook::Forward => types::NfHook::Forward,
                    Hook::Prerouting => types::NfHook::Prerouting,
                }),
                prio: c.base.map(|h| match h {
                    Hook::Forward => 0,
                    Hook::Prerouting => -300,
                }),
                policy: c.base.map(|h| match h {
                    Hook::Forward => types::NfChainPolicy::Drop,
                    Hook::Prerouting => types::NfChainPolicy::Accept,
                }),
                ..Default::default()
            }));
        }
        for c in &self.chains {
            for r in &c.rules {
                let mut expr = Vec::new();
                for m in &r.matches {
                    use stmt::Operator::{EQ, IN};
                    expr.push(match m {
                        Match::Iif(n) => matcher(meta(expr::MetaKey::Iifname), name_expr(n), EQ),
                        Match::Oif(n) => matcher(meta(expr::MetaKey::Oifname), name_expr(n), EQ),
                        Match::CtState(s) => matcher(
                            expr::Expression::Named(expr::NamedExpression::CT(expr::CT {
                                key: "state".into(),
                                family: None,
                                dir: None,
                            })),
                            expr::Expression::List(
                                s.iter()
                                    .map(|x| expr::Expression::String((*x).into()))
                                    .collect(),
                            ),
                            IN,
                        ),
                        Match::Saddr(fam, set) => matcher(
                            payload(fam.proto(), "saddr"),
                            expr::Expression::String(format!("@{set}").into()),
                            EQ,
                        ),
                        Match::Daddr(fam, set) => matcher(
                            payload(fam.proto(), "daddr"),
                            expr::Expression::String(format!("@{set}").into()),
                            EQ,
                        ),
                        Match::SaddrIn(fam, nets) => matcher(
                            payload(fam.proto(), "saddr"),
                            expr::Expression::Named(expr::NamedExpression::Set(
                                nets.iter()
                                    .map(|n| expr::SetItem::Element(net_expr(n)))
                                    .collect(),
                            )),
                            EQ,
                        ),
                        Match::Udp(field, port) => matcher(
                            payload("udp", field),
                            expr::Expression::Number(u32::from(*port)),
                            EQ,
                        ),
                        Match::L4 {
                            family,
                            proto,
                            ports,
                        } => match (proto, ports) {
                            (Proto::Icmp, _) => matcher(
                                meta(expr::MetaKey::L4proto),
                                expr::Expression::String(family.icmp().into()),
                                EQ,
                            ),
                            (p, None) => matcher(
                                meta(expr::MetaKey::L4proto),
                                expr::Expression::String(p.name().into()),
                                EQ,
                            ),
                            (p, Some(ranges)) => matcher(
                                payload(p.name(), "dport"),
                                expr::Expression::Named(expr::NamedExpression::Set(
                                    ranges
                                        .iter()
                                        .map(|&(lo, hi)| {
                                            expr::SetItem::Element(if lo == hi {
                                                expr::Expression::Number(u32::from(lo))
                                            } else {
                                                expr::Expression::Range(Box::new(expr::Range {
                                                    range: [
                                                        expr::Expression::Number(u32::from(lo)),
                                                        expr::Expression::Number(u32::from(hi)),
                                                    ],
                                                }))
                                            })
                                        })
                                        .collect(),
                                )),
                                EQ,
                            ),
                        },
                    });
                }
                if r.counter {
                    expr.push(stmt::Statement::Counter(stmt::Counter::Anonymous(None)));
                }
                expr.push(match r.verdict {
                    Verdict::Accept => stmt::Statement::Accept(None),
                    Verdict::Drop => stmt::Statement::Drop(None),
                    Verdict::Jump(t) => {
                        stmt::Statement::Jump(stmt::JumpTarget { target: t.into() })
                    }
                    Verdict::Return => stmt::Statement::Return(None),
                });
                batch.add(schema::NfListObject::Rule(schema::Rule {
                    family,
                    table: TABLE.into(),
                    chain: c.name.into(),
                    expr: expr.into(),
                    handle: None,
                    index: None,
                    comment: Some(r.comment.clone().into()),
                }));
            }
        }
        batch.to_nftables()
    }

    /// Number of rules over all chains.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// Everything `nft -j -f` is given, as one transaction: the `komnet` table and the
    /// translation table ([`NAT_TABLE`]), which is removed when the site has no translations.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = serde_json::to_value(self.to_nftables()).unwrap_or_default();
        let table = json!({"family": "inet", "name": NAT_TABLE});
        let mut more = vec![
            json!({"add": {"table": table}}),
            json!({"delete": {"table": table}}),
        ];
        if !self.nat.is_empty() {
            more.push(json!({"add": {"table": table}}));
            for (chain, hook, prio) in [
                ("prerouting", "prerouting", -100),
                ("postrouting", "postrouting", 100),
            ] {
                more.push(json!({"add": {"chain": {
                    "family": "inet", "table": NAT_TABLE, "name": chain,
                    "type": "nat", "hook": hook, "prio": prio, "policy": "accept"
                }}}));
            }
            for chain in ["prerouting", "postrouting"] {
                for n in &self.nat {
                    for (c, rule) in n.json_rules() {
                        if c == chain {
                            more.push(json!({"add": {"rule": rule}}));
                        }
                    }
                }
            }
        }
        if let Some(list) = v
            .get_mut("nftables")
            .and_then(serde_json::Value::as_array_mut)
        {
            list.extend(more);
        }
        v
    }
}

/// The JSON batch as `nft -j -f` reads it, indented for people.
pub fn to_json_pretty(ruleset: &Ruleset) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&ruleset.to_json())
}
