//! What a new policy version allows or denies that the old one did not, and whether its
//! version number says it is newer.

use super::*;

/// A flow that one policy version allows and the other does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowChange {
    /// `true`: newly allowed; `false`: newly denied.
    pub now_allowed: bool,
    pub segment: String,
    pub service: String,
    pub ports: Vec<PortRange>,
}

impl fmt::Display for FlowChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} {} -> {} {}",
            if self.now_allowed {
                "+ allow"
            } else {
                "- deny "
            },
            self.segment,
            self.service,
            ports.join(",")
        )
    }
}

/// The flows (segment → service, ports) newly allowed and newly denied from `old` to `new`,
/// and the segments and services whose addresses changed (same names, different packets).
pub fn diff(old: &Policy, new: &Policy) -> (Vec<FlowChange>, Vec<String>) {
    let (a, b) = (flow_table(old), flow_table(new));
    // The same segment or service in the other version, by name: flows are compared by what
    // they are called, not by their place in either file.
    let segment_map = |from: &Policy, to: &Policy| -> Vec<Option<SegmentId>> {
        (0..from.segments.len())
            .map(|i| to.find_segment(&from.segment_name(SegmentId(i as u32)), None))
            .collect()
    };
    let service_map = |from: &Policy, to: &Policy| -> Vec<Option<ServiceId>> {
        (0..from.services.len())
            .map(|i| to.find_service(&from.service_name(ServiceId(i as u32)), None))
            .collect()
    };
    let mut changes = Vec::new();
    for (now_allowed, this, that, p, q) in [(true, &b, &a, new, old), (false, &a, &b, old, new)] {
        let (segs, svcs) = (segment_map(p, q), service_map(p, q));
        let mut found = Vec::new();
        for (&(seg, svc), ports) in this {
            let before = match (segs[seg.index()], svcs[svc.index()]) {
                (Some(s), Some(v)) => that.get(&(s, v)).map_or(&[][..], Vec::as_slice),
                _ => &[][..],
            };
            let changed = subtract(ports, before);
            if !changed.is_empty() {
                found.push(FlowChange {
                    now_allowed,
                    segment: p.segment_name(seg),
                    service: p.service_name(svc),
                    ports: changed,
                });
            }
        }
        found.sort_by(|x, y| (&x.segment, &x.service).cmp(&(&y.segment, &y.service)));
        changes.append(&mut found);
    }
    let mut moved = Vec::new();
    for (i, s) in new.segments.iter().enumerate() {
        let name = new.segment_name(SegmentId(i as u32));
        if let Some(o) = old.find_segment(&name, None) {
            let before = &old.segments[o.index()].prefixes;
            if *before != s.prefixes {
                moved.push(format!(
                    "segment {name}: {} -> {}",
                    join(before),
                    join(&s.prefixes)
                ));
            }
        }
    }
    for (i, s) in new.services.iter().enumerate() {
        let name = new.service_name(ServiceId(i as u32));
        if let Some(o) = old.find_service(&name, None) {
            let before = &old.services[o.index()];
            if before.addresses != s.addresses {
                moved.push(format!(
                    "service {name}: {} -> {}",
                    join(&before.addresses),
                    join(&s.addresses)
                ));
            }
        }
    }
    (changes, moved)
}

/// What `diff` warns about the two versions: the content changed but `[policy] version` did
/// not (gateways refuse a bundle with a version they have and other content), or the version
/// went down (they refuse it: anti-rollback). `None` when the versions are in order.
pub fn version_finding(old: &Policy, new: &Policy) -> Option<String> {
    let contents = |p: &Policy| -> BTreeMap<String, String> {
        p.sources
            .files()
            .map(|(_, f)| {
                // The path inside the policy directory: operator.toml, tenants/NAME.toml.
                let name = f
                    .path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                let in_tenants = f
                    .path
                    .parent()
                    .and_then(|d| d.file_name())
                    .is_some_and(|d| d == "tenants");
                let key = if in_tenants {
                    format!("tenants/{name}")
                } else {
                    name
                };
                (key, f.text.clone())
            })
            .collect()
    };
    if new.version < old.version {
        return Some(format!(
            "the version goes down ({} -> {}): gateways refuse a policy older than the one they run; raise [policy] version in operator.toml above {}",
            old.version, new.version, old.version
        ));
    }
    if new.version == old.version {
        let (a, b) = (contents(old), contents(new));
        if a != b {
            let changed: Vec<&str> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .map(String::as_str)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            return Some(format!(
                "the content changed ({}) but the version did not ({} in both): gateways refuse a bundle with the version they run and other content; raise [policy] version in operator.toml to {}",
                changed.join(", "),
                new.version,
                new.version + 1
            ));
        }
    }
    None
}

fn join(nets: &[IpNet]) -> String {
    let v: Vec<String> = nets.iter().map(ToString::to_string).collect();
    v.join(", ")
}

/// `a` minus `b`, both normalised.
pub(super) fn subtract(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in a {
        let mut pieces = vec![*r];
        for cut in b.iter().filter(|c| c.proto == r.proto) {
            pieces = pieces
                .into_iter()
                .flat_map(|p| {
                    let mut keep = Vec::new();
                    if cut.hi < p.lo || cut.lo > p.hi {
                        keep.push(p);
                        return keep;
                    }
                    if cut.lo > p.lo {
                        keep.push(PortRange {
                            hi: cut.lo - 1,
                            ..p
                        });
                    }
                    if cut.hi < p.hi {
                        keep.push(PortRange {
                            lo: cut.hi + 1,
                            ..p
                        });
                    }
                    keep
                })
                .collect();
        }
        out.extend(pieces);
    }
    out
}
