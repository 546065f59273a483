//! Checking a segment's `local` prefixes: how the town hall really numbers a LAN that the
//! district knows by a unique prefix (Tholey's staff LAN is 192.168.178.0/24 at the town hall,
//! 10.40.1.0/24 in the district). The site's appliance translates 1:1 at the tunnel, so the
//! pairs must have the same family and length, and a local prefix must not hide anything the
//! district routes (a LAN host could not reach it) nor another local prefix of the same site.

use super::*;

/// A local prefix already accepted at a site: for overlaps between the site's segments.
pub(super) struct LocalClaim {
    pub(super) site: SiteId,
    pub(super) net: IpNet,
    pub(super) segment: String,
    pub(super) loc: Loc,
}

impl<'s> Builder<'s> {
    /// The `(unique, local)` pairs of a segment at `site`: `local[i]` stands for `prefixes[i]`.
    /// Every problem is an error at its entry.
    pub(super) fn local_prefixes(
        &mut self,
        file: FileId,
        site: SiteId,
        segment: &str,
        decl: &syntax::SegmentDecl,
        taken: &mut Vec<LocalClaim>,
    ) -> Vec<(IpNet, IpNet)> {
        let mut out = Vec::new();
        for (i, entry) in decl.local.iter().enumerate() {
            let at = Loc::new(file, entry.span());
            let local = match parse_prefix(entry.get_ref()) {
                Ok(n) => n,
                Err(msg) => {
                    self.err(file, entry.span(), format!("local prefix: {msg}"));
                    continue;
                }
            };
            let Some(unique_text) = decl.prefixes.get(i) else {
                self.err(
                    file,
                    entry.span(),
                    format!(
                        "local prefix {local} stands for nothing: local[{i}] is prefixes[{i}] on the LAN, and segment {segment:?} has {} prefix(es)",
                        decl.prefixes.len()
                    ),
                );
                continue;
            };
            // The unique prefix's own error (if any) is reported where it is written.
            let Ok(unique) = parse_prefix(unique_text.get_ref()) else {
                continue;
            };
            if local.addr().is_ipv4() != unique.addr().is_ipv4() {
                self.err(
                    file,
                    entry.span(),
                    format!(
                        "local prefix {local} stands for {unique} (prefixes[{i}]), which is of the other address family: 1:1 translation maps IPv4 to IPv4 and IPv6 to IPv6"
                    ),
                );
                continue;
            }
            if local.prefix_len() != unique.prefix_len() {
                self.err(
                    file,
                    entry.span(),
                    format!(
                        "local prefix {local} is a /{}, but {unique} (prefixes[{i}]) that it stands for is a /{}: 1:1 translation needs the same length",
                        local.prefix_len(),
                        unique.prefix_len()
                    ),
                );
                continue;
            }
            let hidden: Vec<(IpNet, String, Loc)> = self
                .claimed
                .iter()
                .filter(|c| nets_overlap(&c.net, &local))
                .map(|c| (c.net, c.what.clone(), c.loc.clone()))
                .collect();
            if let Some((net, what, loc)) = hidden.first() {
                let d = Diagnostic::error(
                    at.clone(),
                    format!(
                        "local prefix {local} overlaps {net} of {what}: a host on this LAN could not reach those addresses (they would be on its own LAN); a local prefix lies outside everything the district routes"
                    ),
                )
                .with_related(loc.clone(), format!("{net} is declared here"));
                self.diags.push(d);
                continue;
            }
            if let Some(other) = taken
                .iter()
                .find(|c| c.site == site && nets_overlap(&c.net, &local))
            {
                // Blamed on whichever comes later in the file (segments are visited by name).
                let (later, earlier, later_net, earlier_net, earlier_segment) =
                    if reading_order(&at) >= reading_order(&other.loc) {
                        (
                            at.clone(),
                            other.loc.clone(),
                            local,
                            other.net,
                            other.segment.clone(),
                        )
                    } else {
                        (
                            other.loc.clone(),
                            at.clone(),
                            other.net,
                            local,
                            segment.to_owned(),
                        )
                    };
                let d = Diagnostic::error(
                    later,
                    format!(
                        "local prefix {later_net} overlaps {earlier_net} of segment {earlier_segment:?} at the same site: the appliance could not tell them apart on its LAN"
                    ),
                )
                .with_related(earlier, "declared here");
                self.diags.push(d);
                continue;
            }
            taken.push(LocalClaim {
                site,
                net: local,
                segment: segment.to_owned(),
                loc: at,
            });
            out.push((unique, local));
        }
        out
    }
}
