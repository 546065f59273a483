//! The ruleset in the kernel: checked, applied as one transaction, read back and compared,
//! and what its counted drop rules dropped.

use super::*;

impl Ruleset {
    /// Checks with `nft -c`, applies atomically, reads the table back and compares. When nft
    /// refuses, nothing changed and the error carries nft's own message.
    pub fn apply(&self) -> Result<(), NftError> {
        let payload = serde_json::to_string(&self.to_json())
            .map_err(|e| NftError::Exec(format!("cannot encode the ruleset: {e}")))?;
        run_nft(&payload, &["-c"], "the check (nft -c)")?;
        run_nft(&payload, &[], "the atomic apply")?;
        self.verify_installed()
    }

    /// Compares the installed table with this ruleset: the same sets with the same addresses,
    /// the same chains with the same rules in the same order.
    pub fn verify_installed(&self) -> Result<(), NftError> {
        self.verify_installed_counting().map(drop)
    }

    /// [`Ruleset::verify_installed`], and what the installed table's counted drop rules dropped
    /// so far by reason (as [`drop_counters_from_json`]), from the same listing.
    pub fn verify_installed_counting(&self) -> Result<BTreeMap<&'static str, u64>, NftError> {
        let live = helper::get_current_ruleset_with_args(
            helper::DEFAULT_NFT,
            ["list", "table", "inet", TABLE],
        )
        .map_err(|e| NftError::ReadBack(describe_nft_error(&e)))?;
        let mut sets: Vec<(String, Vec<(IpAddr, IpAddr)>)> = Vec::new();
        let mut rules: Vec<(String, String)> = Vec::new();
        let mut drops: BTreeMap<&'static str, u64> = BTreeMap::new();
        for obj in live.objects.iter() {
            let schema::NfObject::ListObject(o) = obj else {
                continue;
            };
            match o {
                schema::NfListObject::Set(s) => {
                    let elems = s
                        .elem
                        .as_deref()
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(interval_of)
                        .collect();
                    sets.push((s.name.to_string(), merge_intervals(elems)));
                }
                schema::NfListObject::Rule(r) => {
                    let comment = r.comment.as_deref().unwrap_or("");
                    if let Some(reason) = drop_reason(comment) {
                        let packets: u64 = r
                            .expr
                            .iter()
                            .filter_map(|e| match e {
                                stmt::Statement::Counter(stmt::Counter::Anonymous(Some(c))) => {
                                    c.packets.map(|p| p as u64)
                                }
                                _ => None,
                            })
                            .sum();
                        *drops.entry(reason).or_default() += packets;
                    }
                    rules.push((r.chain.to_string(), comment.to_owned()));
                }
                _ => {}
            }
        }
        for s in &self.sets {
            let want = merge_intervals(
                s.elements
                    .iter()
                    .map(|n| (n.network(), n.broadcast()))
                    .collect(),
            );
            match sets.iter().find(|(n, _)| *n == s.name) {
                None => return Err(NftError::ReadBack(format!("set {} is missing", s.name))),
                Some((_, got)) if *got != want => {
                    return Err(NftError::ReadBack(format!(
                        "set {} holds {got:?}, expected {want:?}",
                        s.name
                    )))
                }
                Some(_) => {}
            }
        }
        if sets.len() != self.sets.len() {
            return Err(NftError::ReadBack(format!(
                "{} sets installed, {} expected",
                sets.len(),
                self.sets.len()
            )));
        }
        let want: Vec<(String, String)> = self
            .chains
            .iter()
            .flat_map(|c| {
                c.rules
                    .iter()
                    .map(move |r| (c.name.to_owned(), r.comment.clone()))
            })
            .collect();
        let mut got = rules;
        let mut want_sorted = want;
        // nft lists rules chain by chain in its own chain order; compare per chain, in order.
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        if got != want_sorted {
            return Err(NftError::ReadBack(format!(
                "{} rules installed, {} expected, or in another order",
                got.len(),
                want_sorted.len()
            )));
        }
        self.verify_nat()?;
        Ok(drops)
    }

    /// The translation table holds this ruleset's translations, by comment, in order. Not
    /// listed when there are none (apply removes the table then; a leftover would translate
    /// only addresses no policy names any more).
    fn verify_nat(&self) -> Result<(), NftError> {
        if self.nat.is_empty() {
            return Ok(());
        }
        let text = helper::get_current_ruleset_raw(
            helper::DEFAULT_NFT,
            ["list", "table", "inet", NAT_TABLE],
        )
        .map_err(|e| {
            NftError::ReadBack(format!("table {NAT_TABLE}: {}", describe_nft_error(&e)))
        })?;
        let listed: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| NftError::ReadBack(format!("table {NAT_TABLE}: {e}")))?;
        let mut got: Vec<(String, String)> = listed["nftables"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.get("rule"))
                    .map(|r| {
                        (
                            r["chain"].as_str().unwrap_or_default().to_owned(),
                            r["comment"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut want: Vec<(String, String)> = ["prerouting", "postrouting"]
            .iter()
            .flat_map(|c| {
                self.nat
                    .iter()
                    .map(move |n| ((*c).to_owned(), n.comment.clone()))
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        if got != want {
            return Err(NftError::ReadBack(format!(
                "table {NAT_TABLE}: {} translation rules installed, {} expected, or others",
                got.len(),
                want.len()
            )));
        }
        Ok(())
    }
}

fn describe_nft_error(e: &helper::NftablesError) -> String {
    match e {
        helper::NftablesError::NftFailed { stderr, stdout, .. } => {
            let text = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            text.trim().to_owned()
        }
        other => other.to_string(),
    }
}

fn run_nft(payload: &str, args: &[&str], stage: &'static str) -> Result<(), NftError> {
    match helper::apply_ruleset_raw(payload, helper::DEFAULT_NFT, args) {
        Ok(_) => Ok(()),
        Err(e @ helper::NftablesError::NftFailed { .. }) => Err(NftError::Rejected {
            stage,
            message: describe_nft_error(&e),
        }),
        Err(e) => Err(NftError::Exec(e.to_string())),
    }
}

/// The address interval of a set element as nft lists it: a prefix, a range or one address.
fn interval_of(e: &expr::Expression<'_>) -> Option<(IpAddr, IpAddr)> {
    match e {
        expr::Expression::String(s) => {
            let a: IpAddr = s.parse().ok()?;
            Some((a, a))
        }
        expr::Expression::Named(expr::NamedExpression::Prefix(p)) => {
            let expr::Expression::String(a) = p.addr.as_ref() else {
                return None;
            };
            let net = IpNet::new(a.parse().ok()?, u8::try_from(p.len).ok()?).ok()?;
            Some((net.network(), net.broadcast()))
        }
        expr::Expression::Range(r) => match &r.range {
            [expr::Expression::String(a), expr::Expression::String(b)] => {
                Some((a.parse().ok()?, b.parse().ok()?))
            }
            _ => None,
        },
        expr::Expression::Named(expr::NamedExpression::Elem(el)) => interval_of(&el.val),
        _ => None,
    }
}

fn merge_intervals(mut v: Vec<(IpAddr, IpAddr)>) -> Vec<(IpAddr, IpAddr)> {
    v.sort();
    let mut out: Vec<(IpAddr, IpAddr)> = Vec::new();
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if next_addr(last.1).is_some_and(|n| n >= lo) || last.1 >= lo => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn next_addr(a: IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(x) => u32::from(x).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(x) => u128::from(x).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

/// The drop reason a counted rule of the ruleset stands for, by its comment.
fn drop_reason(comment: &str) -> Option<&'static str> {
    if comment.starts_with(SEGMENT_SPOOF) {
        Some(SEGMENT_SPOOF)
    } else if comment.starts_with("guardrail ") {
        Some("policy_guardrail")
    } else if comment == "default deny" {
        Some("policy_default_deny")
    } else if comment == "invalid state" {
        Some("conntrack_invalid")
    } else {
        None
    }
}

/// The packets the counted drop rules of a listed `komnet` table (`nft -j list table inet
/// komnet`) dropped, summed by reason ([`SEGMENT_SPOOF`], `policy_guardrail`,
/// `policy_default_deny`, `conntrack_invalid`).
pub fn drop_counters_from_json(json: &str) -> Result<BTreeMap<&'static str, u64>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft's listing is not JSON: {e}"))?;
    let mut out = BTreeMap::new();
    let objects = doc["nftables"].as_array().map_or(&[][..], Vec::as_slice);
    for rule in objects.iter().filter_map(|o| o.get("rule")) {
        let Some(reason) = rule["comment"].as_str().and_then(drop_reason) else {
            continue;
        };
        let exprs = rule["expr"].as_array().map_or(&[][..], Vec::as_slice);
        let packets: u64 = exprs
            .iter()
            .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
            .sum();
        *out.entry(reason).or_default() += packets;
    }
    Ok(out)
}

/// What the installed `komnet` table dropped so far, by reason (see
/// [`drop_counters_from_json`]); empty when there is no such table. The counts start again
/// from zero whenever the table is replaced: callers that report totals keep their own sums
/// (`komnet-gateway` does).
pub fn read_drop_counters() -> Result<BTreeMap<&'static str, u64>, NftError> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .map_err(|e| NftError::Exec(e.to_string()))?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr);
        if message.contains("No such file or directory") {
            return Ok(BTreeMap::new());
        }
        return Err(NftError::ReadBack(message.trim().to_owned()));
    }
    drop_counters_from_json(&String::from_utf8_lossy(&out.stdout)).map_err(NftError::ReadBack)
}
