//! Checking what the policy says about DHCP: the district's and a tenant's defaults (DNS
//! servers, lease time) and each segment's own settings (reserved ranges, reservations by MAC),
//! into a segment's [`Dhcp`]. Errors point at the entry (`file:line:col`) like every other check.

use super::*;

/// Lease time when nobody says otherwise: a working day and a half, so a PC switched on every
/// morning keeps its address, and a guest's lease is gone by the next day.
pub(crate) const DEFAULT_LEASE_SECS: u32 = 12 * 3600;
/// dnsmasq refuses shorter leases (and clients renew at half the time).
const MIN_LEASE_SECS: u64 = 120;
const MAX_LEASE_SECS: u64 = 365 * 86_400;

/// `[dhcp]` of the operator file or of a tenant's, checked.
#[derive(Debug, Clone, Default)]
pub(super) struct DhcpDefaults {
    pub(super) dns: Option<(Vec<IpAddr>, Loc)>,
    pub(super) lease: Option<u32>,
}

impl DhcpDefaults {
    /// `self` where it says something, else `under`.
    pub(super) fn over(&self, under: &DhcpDefaults) -> DhcpDefaults {
        DhcpDefaults {
            dns: self.dns.clone().or_else(|| under.dns.clone()),
            lease: self.lease.or(under.lease),
        }
    }
}

impl<'s> Builder<'s> {
    /// Checks a `[dhcp]` table (operator or tenant).
    pub(super) fn dhcp_defaults(
        &mut self,
        file: FileId,
        decl: Option<&syntax::DhcpDefaults>,
    ) -> DhcpDefaults {
        let Some(decl) = decl else {
            return DhcpDefaults::default();
        };
        DhcpDefaults {
            dns: decl.dns.as_ref().map(|list| self.dns_list(file, list)),
            lease: decl.lease.as_ref().and_then(|l| self.lease(file, l)),
        }
    }

    fn dns_list(&mut self, file: FileId, list: &[Spanned<String>]) -> (Vec<IpAddr>, Loc) {
        let mut out = Vec::new();
        for entry in list {
            match entry.get_ref().trim().parse::<IpAddr>() {
                Ok(a) if out.contains(&a) => self.err(
                    file,
                    entry.span(),
                    format!("DNS server {a} is listed twice"),
                ),
                Ok(a) if a.is_unspecified() || a.is_multicast() || a.is_loopback() => self.err(
                    file,
                    entry.span(),
                    format!("{a} cannot be a DNS server for the town hall's hosts"),
                ),
                Ok(a) => out.push(a),
                Err(_) => self.err(
                    file,
                    entry.span(),
                    format!(
                        "DNS server {:?} is not an IP address (like 10.0.0.53 or fd00::53)",
                        entry.get_ref()
                    ),
                ),
            }
        }
        let loc = match (list.first(), list.last()) {
            (Some(a), Some(b)) => Loc::new(file, a.span().start..b.span().end),
            _ => Loc::new(file, 0..0),
        };
        (out, loc)
    }

    fn lease(&mut self, file: FileId, text: &Spanned<String>) -> Option<u32> {
        match komnet_proto::config::HumanDuration::parse(text.get_ref()) {
            Ok(d) if (MIN_LEASE_SECS..=MAX_LEASE_SECS).contains(&d.0.as_secs()) => {
                u32::try_from(d.0.as_secs()).ok()
            }
            Ok(_) => {
                self.err(
                    file,
                    text.span(),
                    "a lease lasts from 2m to 365d (clients renew at half of it)",
                );
                None
            }
            Err(e) => {
                self.err(file, text.span(), format!("lease: {e}"));
                None
            }
        }
    }

    /// The [`Dhcp`] of a segment: served unless it says `enabled = false`; its own settings
    /// over the tenant's `defaults`. `prefixes` are the segment's checked prefixes; `None` for
    /// the home-office segment, which is never served (it has no LAN).
    pub(super) fn segment_dhcp(
        &mut self,
        file: FileId,
        segment: &str,
        decl: Option<&Spanned<syntax::SegmentDhcpDecl>>,
        prefixes: Option<&[IpNet]>,
        defaults: &DhcpDefaults,
    ) -> Option<Dhcp> {
        let Some(prefixes) = prefixes else {
            if let Some(d) = decl {
                self.err(
                    file,
                    d.span(),
                    "the home-office segment has no LAN at a town hall: nothing to serve by DHCP",
                );
            }
            return None;
        };
        let (own, at) = match decl {
            Some(d) => (Some(d.get_ref()), Some(Loc::new(file, d.span()))),
            None => (None, None),
        };
        if let Some(enabled) = own.and_then(|d| d.enabled.as_ref()) {
            if !*enabled.get_ref() {
                let d = own.expect("enabled came from it");
                if d.dns.is_some()
                    || d.lease.is_some()
                    || !d.reserved.is_empty()
                    || !d.hosts.is_empty()
                {
                    self.diags.push(Diagnostic::warning(
                        Loc::new(file, enabled.span()),
                        format!("DHCP is off on segment {segment:?}: its other dhcp settings have no effect"),
                    ));
                }
                return None;
            }
        }
        let mine = match own {
            Some(d) => DhcpDefaults {
                dns: d.dns.as_ref().map(|list| self.dns_list(file, list)),
                lease: d.lease.as_ref().and_then(|l| self.lease(file, l)),
            },
            None => DhcpDefaults::default(),
        };
        let settings = mine.over(defaults);
        let v4: Vec<ipnet::Ipv4Net> = prefixes
            .iter()
            .filter_map(|p| match p {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .collect();
        let mut reserved = Vec::new();
        let mut hosts: Vec<DhcpHost> = Vec::new();
        if let Some(d) = own {
            for r in &d.reserved {
                match parse_range(r.get_ref()) {
                    Ok((a, b)) => {
                        if !v4.iter().any(|n| n.contains(&a) && n.contains(&b)) {
                            self.err(
                                file,
                                r.span(),
                                format!(
                                    "reserved range {}-{} is not inside one IPv4 prefix of segment {segment:?} ({})",
                                    a,
                                    b,
                                    shown(prefixes)
                                ),
                            );
                        }
                        reserved.push((a, b));
                    }
                    Err(msg) => self.err(file, r.span(), msg),
                }
            }
            let mut seen_mac: Vec<([u8; 6], Loc)> = Vec::new();
            let mut seen_addr: Vec<(Ipv4Addr, Loc)> = Vec::new();
            for h in &d.hosts {
                let h_loc = Loc::new(file, h.span());
                let h = h.get_ref();
                let mac = match parse_mac(h.mac.get_ref()) {
                    Ok(m) => Some(m),
                    Err(msg) => {
                        self.err(file, h.mac.span(), msg);
                        None
                    }
                };
                let address = match h.address.get_ref().trim().parse::<Ipv4Addr>() {
                    Ok(a) => match v4.iter().find(|n| n.contains(&a)) {
                        None => {
                            self.err(
                                file,
                                h.address.span(),
                                format!(
                                    "{a} is outside segment {segment:?} ({}): a reservation hands out one of its own addresses",
                                    shown(prefixes)
                                ),
                            );
                            None
                        }
                        Some(n)
                            if leasable(n).is_none_or(|(first, last)| a < first || a > last) =>
                        {
                            let what = if a == n.network() {
                                "the network address"
                            } else if a == n.broadcast() {
                                "the broadcast address"
                            } else {
                                "the appliance's own address there (the prefix's first host)"
                            };
                            self.err(
                                file,
                                h.address.span(),
                                format!("{a} is {what} of {n}: no host can have it"),
                            );
                            None
                        }
                        Some(_) => Some(a),
                    },
                    Err(_) => {
                        self.err(
                            file,
                            h.address.span(),
                            format!(
                                "{:?} is not an IPv4 address: reservations are for DHCPv4",
                                h.address.get_ref()
                            ),
                        );
                        None
                    }
                };
                let name = match &h.name {
                    Some(n) if is_host_name(n.get_ref()) => Some(n.get_ref().clone()),
                    Some(n) => {
                        self.err(
                            file,
                            n.span(),
                            format!(
                                "host name {:?} is not valid: letters, digits and '-', not at either end, at most 63",
                                n.get_ref()
                            ),
                        );
                        None
                    }
                    None => None,
                };
                if let Some(m) = mac {
                    if let Some((_, prev)) = seen_mac.iter().find(|(x, _)| *x == m) {
                        self.diags.push(
                            Diagnostic::error(
                                Loc::new(file, h.mac.span()),
                                "this MAC address has a reservation already: one address per host",
                            )
                            .with_related(prev.clone(), "the other reservation"),
                        );
                    }
                    seen_mac.push((m, h_loc.clone()));
                }
                if let Some(a) = address {
                    if let Some((_, prev)) = seen_addr.iter().find(|(x, _)| *x == a) {
                        self.diags.push(
                            Diagnostic::error(
                                Loc::new(file, h.address.span()),
                                format!("{a} is reserved for another host already"),
                            )
                            .with_related(prev.clone(), "the other reservation"),
                        );
                    }
                    seen_addr.push((a, h_loc));
                }
                if let (Some(mac), Some(address)) = (mac, address) {
                    hosts.push(DhcpHost { mac, address, name });
                }
            }
        }
        let dhcp = Dhcp {
            dns: settings
                .dns
                .as_ref()
                .map(|(d, _)| d.clone())
                .unwrap_or_default(),
            dns_loc: settings.dns.map(|(_, l)| l),
            lease_secs: settings.lease.unwrap_or(DEFAULT_LEASE_SECS),
            reserved,
            hosts,
        };
        // Written out but nothing to serve: say so rather than serve nothing quietly.
        if let Some(at) = at {
            let probe = Segment {
                tenant: TenantId(0),
                name: String::new(),
                kind: String::new(),
                site: None,
                prefixes: prefixes.to_vec(),
                binding: None,
                local: Vec::new(),
                dhcp: Some(dhcp.clone()),
                description: None,
                loc: at.clone(),
            };
            if probe.dhcp_pools().is_empty()
                && probe.ra_prefixes().is_empty()
                && dhcp.hosts.is_empty()
            {
                self.diags.push(Diagnostic::error(
                    at,
                    format!(
                        "segment {segment:?} has nothing to hand out: DHCP leases from IPv4 prefixes of /30 or larger (minus the appliance's address and the reserved ranges), router advertisements need an IPv6 /64; write enabled = false to say it is not served"
                    ),
                ));
            }
        }
        Some(dhcp)
    }
}

fn shown(prefixes: &[IpNet]) -> String {
    prefixes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `10.30.1.7` or `10.30.1.2-10.30.1.49`.
fn parse_range(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let bad = || {
        format!(
            "reserved {text:?} is not an IPv4 address or range (like 10.30.1.7 or 10.30.1.2-10.30.1.49)"
        )
    };
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text.trim(), text.trim()),
    };
    let a: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let b: Ipv4Addr = b.parse().map_err(|_| bad())?;
    if a > b {
        return Err(format!("reserved range {a}-{b} ends before it starts"));
    }
    Ok((a, b))
}

/// `52:54:00:12:34:56` (or with `-`), any case.
fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.trim().split([':', '-']).collect();
    let mut mac = [0u8; 6];
    let ok = parts.len() == 6
        && parts
            .iter()
            .zip(mac.iter_mut())
            .all(|(p, b)| p.len() == 2 && u8::from_str_radix(p, 16).map(|v| *b = v).is_ok());
    if !ok {
        return Err(format!(
            "MAC address {text:?} is not six hex bytes (like 52:54:00:12:34:56)"
        ));
    }
    if mac[0] & 1 == 1 {
        return Err(format!(
            "{text} is a multicast address, not a network card's"
        ));
    }
    Ok(mac)
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// A DNS server as one list names it: where the list was written, and the server.
type DnsListEntry = (Option<Loc>, IpAddr);

impl Policy {
    /// Warnings about DHCP that need the whole policy: a DNS server the segment's hosts are
    /// given but may not reach (no rule allows udp/53 or tcp/53 to it, and it is not in the
    /// segment itself): they would not resolve names.
    pub(super) fn dhcp_warnings(&self) -> Vec<Diagnostic> {
        // (where the list was written, server) -> the segments that cannot reach it: one
        // warning per server and list, however many segments the operator's default covers.
        let mut unreachable: Vec<(DnsListEntry, Vec<String>)> = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let Some(dhcp) = &seg.dhcp else { continue };
            let Some(site) = seg.site else { continue };
            if seg.dhcp_pools().is_empty() && seg.ra_prefixes().is_empty() {
                continue;
            }
            for dns in &dhcp.dns {
                if seg
                    .prefixes
                    .iter()
                    .chain(seg.local.iter().map(|(_, l)| l))
                    .any(|p| p.contains(dns))
                {
                    continue;
                }
                let Some(from) = seg
                    .prefixes
                    .iter()
                    .find(|p| p.addr().is_ipv4() == dns.is_ipv4())
                else {
                    continue;
                };
                let binding = seg.binding.clone().unwrap_or(Binding::Lan);
                let reaches = [17u8, 6].iter().any(|proto| {
                    crate::decide_arrival(
                        self,
                        site,
                        &binding,
                        &crate::PacketMeta {
                            src: from.network(),
                            dst: *dns,
                            ip_proto: *proto,
                            dport: 53,
                        },
                    )
                    .allow
                });
                if !reaches {
                    let key = (dhcp.dns_loc.clone(), *dns);
                    let name = self.segment_name(SegmentId(i as u32));
                    match unreachable.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, names)) => names.push(name),
                        None => unreachable.push((key, vec![name])),
                    }
                }
            }
        }
        unreachable
            .into_iter()
            .map(|((loc, dns), names)| {
                let who = match names.as_slice() {
                    [one] => format!("segment {one} is"),
                    _ => format!("segments {} are", names.join(", ")),
                };
                let msg = format!(
                    "{who} handed DNS server {dns} by DHCP, but no rule lets them reach {dns} on udp/53 or tcp/53: their hosts will not resolve names (add a rule, or give them another dns list)"
                );
                match loc {
                    Some(loc) => Diagnostic::warning(loc, msg),
                    None => Diagnostic::global(msg),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_macs_and_host_names_are_read_strictly() {
        assert_eq!(
            parse_range("10.30.1.2-10.30.1.49").unwrap(),
            ("10.30.1.2".parse().unwrap(), "10.30.1.49".parse().unwrap())
        );
        assert_eq!(
            parse_range(" 10.30.1.7 ").unwrap(),
            ("10.30.1.7".parse().unwrap(), "10.30.1.7".parse().unwrap())
        );
        assert!(parse_range("10.30.1.49-10.30.1.2")
            .unwrap_err()
            .contains("ends before it starts"));
        assert!(parse_range("fd00::1-fd00::9").is_err());
        assert_eq!(
            parse_mac("52:54:00:AB:cd:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        assert_eq!(parse_mac("52-54-00-ab-cd-0f").unwrap()[5], 0x0f);
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0g",
            "5254.00ab.cd0f",
            "52:54:00:ab:cd:f",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(is_host_name("drucker-eg2"));
        assert!(!is_host_name("-drucker") && !is_host_name("drucker.eg") && !is_host_name(""));
    }
}
