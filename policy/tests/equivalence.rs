//! Proof, not hope: over random policies and random packets, the compiled classifier decides
//! exactly as the reference evaluator (allow/deny and the deciding rule or guardrail), IPv4
//! and IPv6 get the same decisions for the same intent, and mutated policy files never panic.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use komnet_policy::{
    decide, run_tests, Classifier, Origin, PacketMeta, PeerIdentity, Policy, Proto, Role, SiteId,
    TenantId,
};
use proptest::prelude::*;

/// A small deterministic generator driven by proptest's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const KINDS: [&str; 3] = ["staff", "guest", "iot"];

/// IPv4 service address `10.50.a.b/len` and its IPv6 twin `fd05::a.b/(96+len)`: the same
/// layout in both families, so the same intent must get the same decisions.
fn service_prefix(rng: &mut Rng) -> (Ipv4Addr, u8) {
    let len = [24u8, 28, 30, 32][rng.below(4) as usize];
    let a = rng.below(2) as u8;
    let b = rng.below(256) as u8;
    let raw = u32::from(Ipv4Addr::new(10, 50, a, b));
    let mask = if len == 32 {
        u32::MAX
    } else {
        !(u32::MAX >> len)
    };
    (Ipv4Addr::from(raw & mask), len)
}

fn twin_v6(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(0xfd05_0000_0000_0000_0000_0000_0000_0000u128 | u128::from(u32::from(v4)))
}

fn port_spec(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => "icmp".to_owned(),
        1 => format!("udp/{}", 1 + rng.below(12)),
        2 => {
            let lo = 1 + rng.below(10);
            format!("tcp/{lo}-{}", lo + rng.below(5))
        }
        _ => format!("tcp/{}", 1 + rng.below(12)),
    }
}

struct Generated {
    operator: String,
    tenants: Vec<(String, String)>,
}

fn generate(seed: u64) -> Generated {
    let mut rng = Rng(seed | 1);
    let tenants = 1 + rng.below(3) as usize;
    let mut op = String::from(
        "[policy]\nname = \"random\"\nversion = 1\nkinds = [\"staff\", \"guest\", \"iot\", \"homeoffice\"]\n\n",
    );
    for t in 0..tenants {
        let _ = writeln!(
            op,
            "[tenants.t{t}]\ndatacenter = [\"10.{}.0.0/16\", \"fd01:{t}::/48\"]\nhomeoffice = [\"10.200.{t}.0/24\", \"fd02:{t}::/64\"]\n[tenants.t{t}.sites.s0]\nprefixes = [\"10.{t}.0.0/17\", \"fd00:{t}::/48\"]\n[tenants.t{t}.sites.s1]\nprefixes = [\"10.{t}.128.0/17\", \"fd00:{t}:1::/48\"]\n",
            100 + t
        );
    }
    // The operator's own data centre, where the shared services live.
    op.push_str("[tenants.rz]\ndatacenter = [\"10.50.0.0/16\", \"fd05::/64\"]\n\n");
    // Shared services, possibly nested inside each other.
    let shared = rng.below(4) as usize;
    let mut shared_names = Vec::new();
    for k in 0..shared {
        let (v4, len) = service_prefix(&mut rng);
        let mut addrs = vec![format!("\"{v4}/{len}\"")];
        if !rng.chance(15) {
            addrs.push(format!("\"{}/{}\"", twin_v6(v4), 96 + len));
        }
        let ports: Vec<String> = (0..1 + rng.below(3))
            .map(|_| format!("\"{}\"", port_spec(&mut rng)))
            .collect();
        let export = if rng.chance(50) {
            "\"*\"".to_owned()
        } else {
            (0..tenants)
                .filter(|_| rng.chance(60))
                .map(|t| format!("\"t{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            op,
            "[services.shared{k}]\naddresses = [{}]\nports = [{}]\nexport = [{export}]\n",
            addrs.join(", "),
            ports.join(", ")
        );
        shared_names.push((format!("shared{k}"), export));
    }
    let mut guard_count = 0;
    for g in 0..rng.below(3) {
        let kinds: Vec<&str> = ["guest", "iot"]
            .into_iter()
            .filter(|_| rng.chance(60))
            .collect();
        if kinds.is_empty() {
            continue;
        }
        let to = if shared == 0 || rng.chance(30) {
            "\"*\"".to_owned()
        } else {
            format!("\"shared{}\"", rng.below(shared as u64))
        };
        let kinds: Vec<String> = kinds.iter().map(|k| format!("\"{k}\"")).collect();
        let _ = writeln!(
            op,
            "[[guardrail]]\nname = \"g{g}\"\nfrom_kinds = [{}]\nto = [{to}]\n",
            kinds.join(", ")
        );
        guard_count += 1;
    }
    let _ = guard_count;

    let mut files = Vec::new();
    // Every tenant's own services, and which tenants they are exported to.
    let mut own_services: Vec<Vec<(String, Vec<usize>)>> = Vec::new();
    let mut tenant_texts: Vec<String> = Vec::new();
    for t in 0..tenants {
        let mut text = format!("tenant = \"t{t}\"\n\n");
        // Segment 0 is always staff with both families, and every rule includes it: no rule is
        // ever wholly shadowed or unmatchable, so generated policies load.
        let segs = 1 + rng.below(4) as usize;
        for s in 0..segs {
            let kind = if s == 0 {
                "staff"
            } else {
                KINDS[rng.below(3) as usize]
            };
            let site = if rng.chance(50) { 0 } else { 1 };
            let third = site * 128 + s;
            let v6_site = if site == 0 {
                format!("fd00:{t}:0")
            } else {
                format!("fd00:{t}:1")
            };
            let _ = writeln!(
                text,
                "[segments.seg{s}]\nkind = \"{kind}\"\nsite = \"s{site}\"\nprefixes = [\"10.{t}.{third}.0/24\", \"{v6_site}:{s:x}::/64\"]\nvlan = {}\n",
                s + 1
            );
        }
        if rng.chance(40) {
            text.push_str("[segments.home]\nkind = \"homeoffice\"\n\n");
        }
        let mut mine = Vec::new();
        for k in 0..rng.below(3) {
            let host = rng.below(250) as u8;
            let exported: Vec<usize> = (0..tenants).filter(|&o| o != t && rng.chance(50)).collect();
            let export: Vec<String> = exported.iter().map(|o| format!("\"t{o}\"")).collect();
            let _ = writeln!(
                text,
                "[services.own{k}]\naddresses = [\"10.{}.0.{host}\", \"fd01:{t}::{host:x}\"]\nports = [\"{}\", \"{}\"]\nexport = [{}]\n",
                100 + t,
                port_spec(&mut rng),
                port_spec(&mut rng),
                export.join(", ")
            );
            mine.push((format!("own{k}"), exported));
        }
        own_services.push(mine);
        tenant_texts.push(text);
        let _ = segs;
    }
    for t in 0..tenants {
        let mut text = std::mem::take(&mut tenant_texts[t]);
        let seg_count = text.matches("[segments.seg").count();
        let has_home = text.contains("[segments.home]");
        // Services this tenant may name.
        let mut usable: Vec<String> = own_services[t].iter().map(|(n, _)| n.clone()).collect();
        for (name, export) in &shared_names {
            if export.contains('*') || export.contains(&format!("\"t{t}\"")) {
                usable.push(name.clone());
            }
        }
        for (o, list) in own_services.iter().enumerate() {
            for (name, exported) in list {
                if exported.contains(&t) {
                    usable.push(format!("t{o}/{name}"));
                }
            }
        }
        if !usable.is_empty() {
            for r in 0..rng.below(6) {
                let mut from = vec!["\"seg0\"".to_owned()];
                for s in 1..seg_count {
                    if rng.chance(40) {
                        from.push(format!("\"seg{s}\""));
                    }
                }
                if has_home && rng.chance(40) {
                    from.push("\"home\"".to_owned());
                }
                let to = usable[rng.below(usable.len() as u64) as usize].clone();
                let _ = writeln!(
                    text,
                    "[[rule]]\nname = \"r{r}\"\nfrom = [{}]\nto = [\"{to}\"]\n",
                    from.join(", ")
                );
            }
        }
        files.push((format!("t{t}.toml"), text));
    }
    Generated {
        operator: op,
        tenants: files,
    }
}

fn load(g: &Generated) -> Result<Policy, String> {
    let refs: Vec<(&str, &str)> = g
        .tenants
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    Policy::from_texts(&g.operator, &refs).map_err(|e| e.render())
}

fn dump(g: &Generated) -> String {
    let mut s = format!("--- operator.toml\n{}", g.operator);
    for (n, t) in &g.tenants {
        let _ = write!(s, "--- tenants/{n}\n{t}");
    }
    s
}

/// A random address: in a segment, in a service prefix, or anywhere in the ranges used.
fn random_addr(rng: &mut Rng, policy: &Policy, v6: bool) -> IpAddr {
    let nets: Vec<ipnet::IpNet> = policy
        .segments
        .iter()
        .flat_map(|s| s.prefixes.iter().copied())
        .chain(
            policy
                .services
                .iter()
                .flat_map(|s| s.addresses.iter().copied()),
        )
        .filter(|n| n.addr().is_ipv6() == v6)
        .collect();
    if nets.is_empty() || rng.chance(10) {
        return if v6 {
            IpAddr::V6(Ipv6Addr::from(
                0xfd00_u128 << 112 | u128::from(rng.next() as u16),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(
                0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff),
            ))
        };
    }
    let net = nets[rng.below(nets.len() as u64) as usize];
    match net {
        ipnet::IpNet::V4(n) => {
            let host_bits = 32 - u32::from(n.prefix_len());
            let host = if host_bits == 0 {
                0
            } else {
                rng.next() as u32 & ((1u64 << host_bits) - 1) as u32
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        ipnet::IpNet::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix_len());
            let host = if host_bits == 0 {
                0
            } else {
                u128::from(rng.next() as u16) & (u128::MAX >> (128 - host_bits.min(127)))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

fn random_packet(rng: &mut Rng, policy: &Policy) -> PacketMeta {
    let v6 = rng.chance(50);
    let src = random_addr(rng, policy, v6);
    let dst = random_addr(rng, policy, v6);
    let ip_proto = [6u8, 6, 17, 1, 58, 47][rng.below(6) as usize];
    let dport = if rng.chance(90) {
        1 + rng.below(16) as u16
    } else {
        rng.next() as u16
    };
    PacketMeta {
        src,
        dst,
        ip_proto,
        dport: if ip_proto == 1 || ip_proto == 58 {
            0
        } else {
            dport
        },
    }
}

fn random_origin(rng: &mut Rng, policy: &Policy) -> Origin {
    if rng.chance(50) {
        return Origin::Address;
    }
    let tenant = TenantId(rng.below(policy.tenants.len() as u64) as u32);
    let mut role = [Role::Spoke, Role::Hub, Role::HomeOffice][rng.below(3) as usize];
    let sites = &policy.tenants[tenant.index()].sites;
    if sites.is_empty() && role == Role::Spoke {
        // The operator's tenant has a data centre but no town hall.
        role = Role::Hub;
    }
    let site = (role == Role::Spoke).then(|| sites[rng.below(sites.len() as u64) as usize]);
    Origin::Peer(PeerIdentity {
        tenant,
        role,
        site: site.map(|s: SiteId| s),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn classifier_equals_oracle(seed in any::<u64>()) {
        let g = generate(seed);
        let policy = match load(&g) {
            Ok(p) => p,
            Err(e) => panic!("generated policy did not load:\n{e}\n{}", dump(&g)),
        };
        let classifier = Classifier::compile(&policy);
        let mut rng = Rng(seed.rotate_left(17) | 1);
        for _ in 0..400 {
            let packet = random_packet(&mut rng, &policy);
            let origin = random_origin(&mut rng, &policy);
            let want = decide(&policy, origin, &packet);
            let got = classifier.classify(origin, &packet);
            prop_assert_eq!(got, want, "packet {:?} from {:?}\n{}", packet, origin, dump(&g));
        }
        // Packets aimed at what the rules name: most random packets are denied by default.
        for rule in &policy.rules {
            for seg in &rule.from {
                for svc in &rule.to {
                    for net in &policy.segments[seg.index()].prefixes {
                        for dst in &policy.services[svc.index()].addresses {
                            if net.addr().is_ipv4() != dst.addr().is_ipv4() {
                                continue;
                            }
                            for r in &policy.services[svc.index()].ports {
                                let packet = PacketMeta::new(net.network(), dst.network(), r.proto, r.lo.max(1));
                                let want = decide(&policy, Origin::Address, &packet);
                                let got = classifier.classify(Origin::Address, &packet);
                                prop_assert_eq!(got, want, "packet {:?}\n{}", packet, dump(&g));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ipv4_and_ipv6_get_the_same_decision(seed in any::<u64>()) {
        let g = generate(seed);
        let policy = load(&g).map_err(|e| TestCaseError::fail(format!("{e}\n{}", dump(&g))))?;
        let classifier = Classifier::compile(&policy);
        let mut rng = Rng(seed.rotate_left(29) | 1);
        for _ in 0..300 {
            // A source in a segment (same offset in its v4 and v6 prefix) and a destination in
            // a shared service (v4 and its twin); only services declared in both families.
            let seg = &policy.segments[rng.below(policy.segments.len() as u64) as usize];
            let (Some(s4), Some(s6)) = (
                seg.prefixes.iter().find(|p| p.addr().is_ipv4()),
                seg.prefixes.iter().find(|p| p.addr().is_ipv6()),
            ) else { continue };
            let offset = rng.below(200) as u32;
            let src4 = IpAddr::V4(Ipv4Addr::from(u32::from_be_bytes(match s4.network() { IpAddr::V4(a) => a.octets(), IpAddr::V6(_) => [0; 4] }) + offset));
            let src6 = IpAddr::V6(Ipv6Addr::from(match s6.network() { IpAddr::V6(a) => u128::from(a), IpAddr::V4(_) => 0 } + u128::from(offset)));
            let dst4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 50, 0, 0)) + rng.below(512) as u32);
            let dst6 = twin_v6(dst4);
            let both_families = policy.services.iter().all(|s| {
                let v4 = s.addresses.iter().filter(|a| a.addr().is_ipv4()).count();
                let v6 = s.addresses.iter().filter(|a| a.addr().is_ipv6()).count();
                v4 == v6
            });
            if !both_families { continue; }
            let proto = [Proto::Tcp, Proto::Udp, Proto::Icmp][rng.below(3) as usize];
            let port = 1 + rng.below(16) as u16;
            let a = classifier.classify(Origin::Address, &PacketMeta::new(src4, IpAddr::V4(dst4), proto, port));
            let b = classifier.classify(Origin::Address, &PacketMeta::new(src6, IpAddr::V6(dst6), proto, port));
            prop_assert_eq!(a, b, "{} -> {}:{}/{} vs {} -> {}\n{}", src4, dst4, port, proto, src6, dst6, dump(&g));
        }
    }

    #[test]
    fn mutated_policy_files_never_panic(seed in any::<u64>(), edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..4), 1..12)) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
        let read = |p: &str| std::fs::read(dir.join(p)).unwrap_or_default();
        let mut files = [
            read("operator.toml"),
            read("tenants/musterstadt.toml"),
            read("tenants/beispieldorf.toml"),
        ];
        let target = (seed % files.len() as u64) as usize;
        let bytes = &mut files[target];
        for (pos, byte, op) in edits {
            let at = usize::from(pos) % (bytes.len() + 1);
            match op {
                0 => bytes.insert(at, byte),
                1 if at < bytes.len() => { bytes.remove(at); }
                2 if at < bytes.len() => bytes[at] = byte,
                _ => bytes.truncate(at),
            }
        }
        let texts: Vec<String> = files.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
        let result = Policy::from_texts(&texts[0], &[("musterstadt.toml", &texts[1]), ("beispieldorf.toml", &texts[2])]);
        match result {
            Ok(p) => {
                let _ = run_tests(&p);
                let _ = Classifier::compile(&p);
            }
            Err(e) => {
                prop_assert!(e.error_count() > 0);
                let _ = e.render();
            }
        }
    }
}

#[test]
fn generated_district_policy_loads_and_agrees() {
    use komnet_policy::synthetic::{generate, packets, Shape};
    let shape = Shape {
        communes: 40,
        shared_services: 20,
        rules: 1000,
        ..Shape::DISTRICT
    };
    let (op, tenants) = generate(shape);
    let refs: Vec<(&str, &str)> = tenants
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let policy = Policy::from_texts(&op, &refs).unwrap_or_else(|e| panic!("{}", e.render()));
    assert_eq!(policy.rules.len(), 1000);
    let classifier = Classifier::compile(&policy);
    let mut allowed = 0;
    for p in packets(&policy, 5000) {
        let want = decide(&policy, Origin::Address, &p);
        assert_eq!(classifier.classify(Origin::Address, &p), want, "{p:?}");
        allowed += usize::from(want.allow);
    }
    assert!(
        allowed > 2500 && allowed < 4500,
        "the generated traffic should be partly allowed: {allowed}"
    );
    assert_eq!(run_tests(&policy).failed, 0);
}
