//! A generated, realistic district policy for benchmarks and scale tests: many communes with
//! the usual segments, shared data-centre services, and as many rules as asked for.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::{PacketMeta, Proto};
use crate::model::Policy;

/// The size of a generated policy.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub communes: u32,
    /// Segments at each commune's town hall (the home-office segment comes on top); at most 32.
    pub site_segments: u32,
    /// Services of each commune in the data centre (its file server first); the second one is
    /// exported to every tenant, and other communes' rules use it.
    pub services_per_commune: u32,
    pub shared_services: u32,
    /// Total rules over all communes (spread evenly).
    pub rules: u32,
}

impl Shape {
    /// 400 communes × 6 segments, 50 shared services, 10,000 rules.
    pub const DISTRICT: Shape = Shape {
        communes: 400,
        site_segments: 5,
        services_per_commune: 1,
        shared_services: 50,
        rules: 10_000,
    };

    /// The district of issue 19: 100 tenants, 2,000 segments (19 at each town hall and the
    /// home office), 1,010 services (10 per commune, 10 shared), 50,000 rules.
    pub const LARGE_DISTRICT: Shape = Shape {
        communes: 100,
        site_segments: 19,
        services_per_commune: 10,
        shared_services: 10,
        rules: 50_000,
    };

    /// /24s per commune's town hall: 16 (a /20), or 32 (a /19) for more than 16 segments.
    fn block(self) -> u32 {
        if self.site_segments <= 16 {
            16
        } else {
            32
        }
    }

    /// The shape [`generate`] has always made for [`Shape::DISTRICT`]: its rules are drawn as
    /// they always were, so that figures measured on it stay comparable.
    fn is_classic(self) -> bool {
        self.site_segments == 5 && self.services_per_commune == 1
    }
}

/// A tiny deterministic generator: the same shape gives the same policy on every run.
#[derive(Debug)]
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n.max(1)
    }
}

const SITE_SEGMENTS: [(&str, &str); 5] = [
    ("verwaltung", "staff"),
    ("buergerbuero", "citizen-office"),
    ("voip", "voip"),
    ("gebaeude", "iot"),
    ("gaeste", "guest"),
];

const SHARED_PORTS: [&str; 6] = [
    "tcp/443", "tcp/8443", "tcp/25", "tcp/993", "udp/514", "tcp/3389",
];

fn commune(i: u32) -> String {
    format!("gemeinde-{i:03}")
}

fn site_v4(shape: Shape, i: u32, seg: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + ((i * shape.block() + seg) << 8))
}

/// The name and kind of town-hall segment `n`: the five usual ones, then offices of the
/// administration (one guest network per town hall is enough).
fn site_segment(n: u32) -> (String, &'static str) {
    match SITE_SEGMENTS.get(n as usize) {
        Some((name, kind)) => ((*name).to_owned(), kind),
        None => {
            let kinds = ["staff", "citizen-office", "voip", "iot"];
            (format!("amt-{n:02}"), kinds[n as usize % kinds.len()])
        }
    }
}

fn site_v6(i: u32, seg: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, i as u16, 0, seg as u16, 0, 0, 0, 0)
}

fn shared_v4(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, k as u8, 10)
}

fn shared_v6(k: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd03, 0, 0, k as u16, 0, 0, 0, 0x10)
}

fn dc_v4(i: u32, host: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 1 + (i / 256) as u8, (i % 256) as u8, host as u8)
}

/// Commune service `k`: the file server, then the commune's specialised applications.
fn commune_service(k: u32) -> String {
    match k {
        0 => "fileserver".to_owned(),
        k => format!("fachverfahren-{k:02}"),
    }
}

/// Generates the operator file and one fragment per commune, as (file name, text).
pub fn generate(shape: Shape) -> (String, Vec<(String, String)>) {
    let mut op = String::new();
    let _ = writeln!(
        op,
        "[policy]\nname = \"synthetic district\"\nversion = 1\nkinds = [\"staff\", \"citizen-office\", \"voip\", \"iot\", \"guest\", \"homeoffice\"]\n"
    );
    for i in 0..shape.communes {
        let c = commune(i);
        let _ = writeln!(
            op,
            "[tenants.{c}]\ndatacenter = [\"{}/24\", \"fd02:{:x}::/64\"]\nhomeoffice = [\"172.{}.{}.0/24\", \"fd01:{:x}::/64\"]\n[tenants.{c}.sites.rathaus]\nprefixes = [\"{}/{}\", \"fd00:{:x}::/48\"]\n",
            Ipv4Addr::new(10, 1 + (i / 256) as u8, (i % 256) as u8, 0),
            i,
            16 + i / 256,
            i % 256,
            i,
            site_v4(shape, i, 0),
            24 - shape.block().trailing_zeros(),
            i
        );
    }
    // The operator's own data centre, where the shared services live.
    op.push_str("[tenants.rz]\ndatacenter = [\"10.250.0.0/16\", \"fd03::/48\"]\n\n");
    for k in 0..shape.shared_services {
        let _ = writeln!(
            op,
            "[services.shared-{k:02}]\naddresses = [\"{}\", \"{}\"]\nports = [\"{}\", \"icmp\"]\nexport = [\"*\"]\n",
            shared_v4(k),
            shared_v6(k),
            SHARED_PORTS[k as usize % SHARED_PORTS.len()]
        );
    }
    op.push_str(
        "[[guardrail]]\nname = \"guest-isolation\"\nfrom_kinds = [\"guest\"]\nto = [\"*\"]\n\n\
         [[guardrail]]\nname = \"iot-not-dms\"\nfrom_kinds = [\"iot\"]\nto = [\"shared-00\"]\n",
    );

    let mut rng = Lcg(0x6b6f_6d6e_6574);
    let per_commune = shape.rules / shape.communes.max(1);
    let mut extra = shape.rules % shape.communes.max(1);
    let mut tenants = Vec::new();
    for i in 0..shape.communes {
        let c = commune(i);
        let mut t = format!("tenant = \"{c}\"\n\n");
        let mut segments = Vec::new();
        for n in 0..shape.site_segments {
            let (seg, kind) = site_segment(n);
            let _ = writeln!(
                t,
                "[segments.{seg}]\nkind = \"{kind}\"\nsite = \"rathaus\"\nprefixes = [\"{}/24\", \"{}/64\"]\nvlan = {}\n",
                site_v4(shape, i, n),
                site_v6(i, n),
                10 * (n + 1)
            );
            segments.push((seg, kind));
        }
        t.push_str("[segments.homeoffice]\nkind = \"homeoffice\"\n\n");
        t.push_str(
            "[groups]\nmitarbeiter = [\"verwaltung\", \"buergerbuero\", \"homeoffice\"]\n\n",
        );
        for k in 0..shape.services_per_commune {
            let ports = if k == 0 {
                "\"tcp/445\", \"tcp/8000-8099\"".to_owned()
            } else {
                format!("\"{}\"", SHARED_PORTS[k as usize % SHARED_PORTS.len()])
            };
            let export = if k == 1 { "\nexport = [\"*\"]" } else { "" };
            let _ = writeln!(
                t,
                "[services.{}]\naddresses = [\"{}\", \"fd02:{:x}::{:x}\"]\nports = [{ports}]{export}\n",
                commune_service(k),
                dc_v4(i, 5 + k),
                i,
                5 + k
            );
        }
        let mut n = per_commune;
        if extra > 0 {
            n += 1;
            extra -= 1;
        }
        for r in 0..n {
            let (from, to, description) = if shape.is_classic() {
                let (from, to) = classic_rule(shape, &mut rng, r);
                (vec![from], vec![to], None)
            } else {
                let (from, to, description) = rule(shape, &mut rng, r, i, &segments);
                (from, to, Some(description))
            };
            let ports = if to == ["fileserver"] {
                let lo = 8000 + rng.below(90);
                format!("\nports = [\"tcp/{lo}-{}\"]", lo + rng.below(10))
            } else {
                String::new()
            };
            let description = description
                .map(|d| format!("\ndescription = \"{d}\""))
                .unwrap_or_default();
            let list = |names: &[String]| {
                let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
                quoted.join(", ")
            };
            let _ = writeln!(
                t,
                "[[rule]]\nname = \"r{r}\"{description}\nfrom = [{}]\nto = [{}]{ports}\n",
                list(&from),
                list(&to)
            );
        }
        t.push_str("[[expect]]\nfrom = \"gaeste\"\nto = \"shared-01\"\nverdict = \"deny\"\n");
        tenants.push((format!("{c}.toml"), t));
    }
    (op, tenants)
}

/// A rule of [`Shape::DISTRICT`], drawn as it always was. Sources: never the guest segment (its
/// guardrail would shadow the rule), and iot never towards shared-00.
fn classic_rule(shape: Shape, rng: &mut Lcg, r: u32) -> (String, String) {
    let from = match rng.below(5) {
        0 => "mitarbeiter",
        1 => "verwaltung",
        2 => "buergerbuero",
        3 => "voip",
        _ => "gebaeude",
    };
    let to = if r == 0 || rng.below(4) == 0 {
        "fileserver".to_owned()
    } else {
        let k = if from == "gebaeude" || from == "mitarbeiter" {
            1 + rng.below(shape.shared_services.max(2) - 1)
        } else {
            rng.below(shape.shared_services.max(1))
        };
        format!("shared-{k:02}")
    };
    (from.to_owned(), to)
}

/// A rule of a larger shape, as admins write them: from one or two of the town hall's segments
/// (never the guest network) or the staff group, to one to three services — the commune's own, a
/// shared one, another commune's exported application — with a description. IoT segments and
/// the staff group never towards shared-00 (a guardrail denies IoT that).
fn rule(
    shape: Shape,
    rng: &mut Lcg,
    r: u32,
    commune_index: u32,
    segments: &[(String, &str)],
) -> (Vec<String>, Vec<String>, String) {
    let mut from = Vec::new();
    let mut restricted = false;
    for _ in 0..1 + rng.below(2) {
        let pick = rng.below(segments.len() as u32 + 1);
        let (name, kind) = match segments.get(pick as usize) {
            Some((name, kind)) if *kind != "guest" => (name.clone(), *kind),
            _ => ("mitarbeiter".to_owned(), "staff"),
        };
        restricted |= kind == "iot" || name == "mitarbeiter";
        if !from.contains(&name) {
            from.push(name);
        }
    }
    let mut to = Vec::new();
    for n in 0..1 + rng.below(3) {
        let service = match (r + n, rng.below(8)) {
            (0, _) | (_, 0) => "fileserver".to_owned(),
            (_, 1..=3) => commune_service(rng.below(shape.services_per_commune.max(1))),
            (_, 4) if shape.communes > 1 && shape.services_per_commune > 1 => {
                let other = (commune_index + 1 + rng.below(shape.communes - 1)) % shape.communes;
                format!("{}/{}", commune(other), commune_service(1))
            }
            _ => {
                let k = if restricted {
                    1 + rng.below(shape.shared_services.max(2) - 1)
                } else {
                    rng.below(shape.shared_services.max(1))
                };
                format!("shared-{k:02}")
            }
        };
        if !to.contains(&service) {
            to.push(service);
        }
    }
    let description = format!(
        "Zugriff von {} auf {} (Ticket #{})",
        from[0],
        to[0],
        10_000 + rng.below(90_000)
    );
    (from, to, description)
}

/// Packets resembling a hub's traffic under `policy`: about 70 % belong to flows some rule
/// allows (a random rule, one of its segments and services, a port it allows), the rest are
/// denied (other ports, other services), in both address families.
pub fn packets(policy: &Policy, count: usize) -> Vec<PacketMeta> {
    let mut rng = Lcg(0x7061_636b);
    let mut out = Vec::with_capacity(count);
    if policy.rules.is_empty() {
        return out;
    }
    while out.len() < count {
        let rule = &policy.rules[rng.below(policy.rules.len() as u32) as usize];
        let seg = &policy.segments[rule.from[rng.below(rule.from.len() as u32) as usize].index()];
        let svc_id = rule.to[rng.below(rule.to.len() as u32) as usize];
        let svc = &policy.services[svc_id.index()];
        let v6 = rng.below(4) == 0;
        let (Some(src_net), Some(dst_net)) = (
            seg.prefixes.iter().find(|p| p.addr().is_ipv6() == v6),
            svc.addresses.iter().find(|p| p.addr().is_ipv6() == v6),
        ) else {
            continue;
        };
        let src = host_in(src_net, 1 + rng.below(200));
        let dst = dst_net.network();
        let allowed = rule.allowed_ports(svc);
        let packet = if rng.below(10) < 7 && !allowed.is_empty() {
            let r = allowed[rng.below(allowed.len() as u32) as usize];
            let span = u32::from(r.hi - r.lo) + 1;
            PacketMeta::new(src, dst, r.proto, r.lo + rng.below(span) as u16)
        } else {
            PacketMeta::new(src, dst, Proto::Tcp, 1 + rng.below(1024) as u16)
        };
        out.push(packet);
    }
    out
}

fn host_in(net: &ipnet::IpNet, host: u32) -> IpAddr {
    match net {
        ipnet::IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | (host & 0xff))),
        ipnet::IpNet::V6(n) => {
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | u128::from(host)))
        }
    }
}
