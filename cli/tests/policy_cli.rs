//! `komnet policy …` end to end: the real binary on the worked example and on broken copies.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::fs;
use std::path::Path;
use std::process::Command;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn komnet(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_komnet"))
        .args(args)
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn replace_in(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?}");
    fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn check_and_test_pass_on_the_example() {
    let dir = komnet_testkit::example_dir("landkreis");
    let dir = dir.to_str().unwrap();
    let check = komnet(&["policy", "check", dir]);
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert!(
        check.stdout.contains("is valid: 4 tenants"),
        "{}",
        check.stdout
    );
    let test = komnet(&["policy", "test", dir]);
    assert_eq!(test.code, 0, "{}", test.stdout);
    assert!(
        test.stdout.contains("32 passed, 0 failed"),
        "{}",
        test.stdout
    );
}

#[test]
fn check_reports_every_error_with_a_caret_and_exits_1() {
    let dir = komnet_testkit::copy_example("landkreis");
    let frag = dir.join("tenants/musterstadt.toml");
    replace_in(&frag, "from = [\"gebaeude\"]", "from = [\"gebäude\"]");
    replace_in(&frag, "ports = [\"tcp/445\"]", "ports = [\"tcp/4455555\"]");
    let out = komnet(&["policy", "check", dir.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("tenants/musterstadt.toml:"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("unknown segment or group \"gebäude\""),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("out of range"), "{}", out.stderr);
    assert!(
        out.stderr.contains(" | from = [\"gebäude\"]\n"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("^^^^^^^^^"), "{}", out.stderr);
    assert!(
        out.stderr.contains(": 2 errors; the policy is not usable"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_failing_inline_test_names_the_guardrail_and_its_line() {
    let dir = komnet_testkit::copy_example("landkreis");
    replace_in(
        &dir.join("tenants/musterstadt.toml"),
        "from = \"gaeste\"\nto = \"mail:tcp/993\"\nverdict = \"deny\"",
        "from = \"gaeste\"\nto = \"mail:tcp/993\"\nverdict = \"allow\"",
    );
    let out = komnet(&["policy", "test", dir.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("expected allow, got deny (guardrail \"guest-isolation\","),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("operator.toml:85)"), "{}", out.stdout);
    assert!(out.stdout.contains("30 passed, 2 failed"), "{}", out.stdout);
}

#[test]
fn explain_query_and_compile() {
    let dir = komnet_testkit::example_dir("landkreis");
    let dir = dir.to_str().unwrap();
    let out = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "10.30.1.20",
        "--to",
        "musterstadt/fileserver:tcp/445",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("allow (rule \"bauamt-share\", ")
            && out.stdout.contains("tenants/beispieldorf.toml:29)"),
        "{}",
        out.stdout
    );
    let out = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "musterstadt/gaeste",
        "--to",
        "dns:udp/53",
    ]);
    assert_eq!(
        out.stdout
            .matches("deny (guardrail \"guest-isolation\"")
            .count(),
        2,
        "{}",
        out.stdout
    );
    let out = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "10.20.1.7",
        "--to",
        "10.1.0.10:tcp/8080",
    ]);
    assert!(
        out.stdout
            .contains("deny (default deny: no rule allows it)"),
        "{}",
        out.stdout
    );
    // Issue 13: as the town hall's appliance decides it, a staff address that arrives on the
    // guest VLAN is dropped; on the staff VLAN it passes; and flows between two segments of
    // the town hall say so.
    let spoofed = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "10.20.1.77",
        "--to",
        "dms:tcp/443",
        "--vlan",
        "100",
    ]);
    assert_eq!(spoofed.code, 0, "{}", spoofed.stderr);
    assert!(
        spoofed.stdout.contains(
            "deny (dropped as segment_spoof at musterstadt/rathaus: 10.20.1.77 belongs to musterstadt/verwaltung on VLAN 10, but the segment of VLAN 100 is musterstadt/gaeste)"
        ),
        "{}",
        spoofed.stdout
    );
    let staff = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "10.20.1.77",
        "--to",
        "dms:tcp/443",
        "--vlan",
        "10",
    ]);
    assert!(
        staff.stdout.contains("allow (rule \"staff-dms\""),
        "{}",
        staff.stdout
    );
    let elsewhere = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "10.1.0.10",
        "--to",
        "dms",
        "--port",
        "eth1",
        "--site",
        "musterstadt/bauhof",
    ]);
    assert!(
        elsewhere.stdout.contains(
            "10.1.0.10 is in no segment, but the segment of port eth1 is musterstadt/bauhof-buero"
        ),
        "{}",
        elsewhere.stdout
    );
    let bad = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "10.20.1.77",
        "--to",
        "dms",
        "--vlan",
        "4095",
    ]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let intra = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "musterstadt/gebaeude",
        "--to",
        "musterstadt/zeiterfassung",
    ]);
    assert!(
        intra.stdout.contains(
            "deny (default deny: no rule allows it); inside segment musterstadt/gebaeude"
        ),
        "{}",
        intra.stdout
    );
    let intra = komnet(&[
        "policy",
        "explain",
        dir,
        "--from",
        "musterstadt/verwaltung",
        "--to",
        "zeiterfassung",
    ]);
    assert_eq!(
        intra
            .stdout
            .matches("allow (rule \"staff-time-clock\"")
            .count(),
        2,
        "{}",
        intra.stdout
    );
    assert!(
        intra.stdout.contains("between two segments of musterstadt/rathaus (musterstadt/verwaltung on VLAN 10 -> musterstadt/gebaeude on VLAN 40), enforced by its appliance"),
        "{}",
        intra.stdout
    );
    let out = komnet(&[
        "policy",
        "query",
        dir,
        "--segment",
        "musterstadt/verwaltung",
    ]);
    assert!(
        out.stdout.contains("musterstadt/verwaltung -> musterstadt/zeiterfassung tcp/443 [within its site] (rule \"staff-time-clock\""),
        "{}",
        out.stdout
    );

    let out = komnet(&["policy", "explain", dir, "--from", "nowhere", "--to", "dms"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("unknown segment \"nowhere\""),
        "{}",
        out.stderr
    );

    let out = komnet(&["policy", "query", dir, "--segment", "musterstadt/gebaeude"]);
    assert_eq!(out.code, 0);
    assert!(
        out.stdout
            .contains("musterstadt/gebaeude -> gebaeudeleittechnik udp/47808"),
        "{}",
        out.stdout
    );
    let out = komnet(&["policy", "query", dir, "--service", "dms"]);
    assert!(
        out.stdout.contains("kreis/homeoffice -> dms tcp/443"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("gebaeude"), "{}", out.stdout);

    let out = komnet(&[
        "policy",
        "compile",
        dir,
        "--site",
        "musterstadt/rathaus",
        "--nft",
        "--lan",
        "eth1",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("table inet komnet {"));
    assert!(out
        .stdout
        .contains("type filter hook forward priority filter; policy drop;"));
    let out = komnet(&["policy", "compile", dir, "--site", "rathaus", "--nft"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("several tenants have a site named \"rathaus\""),
        "{}",
        out.stderr
    );
    let out = komnet(&[
        "policy",
        "compile",
        dir,
        "--site",
        "kreishaus",
        "--nft",
        "--tunnel",
        "a-name-far-too-long",
    ]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("is not valid"), "{}", out.stderr);
}

#[test]
fn diff_lists_newly_allowed_and_denied_flows() {
    let new = komnet_testkit::copy_example("landkreis");
    let frag = new.join("tenants/musterstadt.toml");
    // The citizen office loses the housing-benefit system; VoIP phones gain mail.
    replace_in(
        &frag,
        "from = [\"alle-telefone\"]\nto = [\"telefonanlage\", \"dns\"]",
        "from = [\"alle-telefone\"]\nto = [\"telefonanlage\", \"dns\", \"mail\"]",
    );
    replace_in(
        &frag,
        "[[rule]]\nname = \"staff-dms\"\nfrom = [\"mitarbeiter\"]",
        "[[rule]]\nname = \"staff-dms\"\nfrom = [\"verwaltung\", \"bauhof-buero\", \"homeoffice\"]",
    );
    replace_in(&new.join("operator.toml"), "version = 7", "version = 8");
    let old = komnet_testkit::example_dir("landkreis");
    let out = komnet(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("version 7 -> 8"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("+ allow musterstadt/voip -> mail tcp/25,tcp/587,tcp/993"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("- deny  musterstadt/buergerbuero -> dms tcp/443"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("- deny  musterstadt/buergerbuero -> wohngeld tcp/443,tcp/8443"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("1 flow(s) newly allowed, 2 newly denied"),
        "{}",
        out.stdout
    );
}

#[test]
fn help_and_completions() {
    let out = komnet(&["policy", "--help"]);
    assert_eq!(out.code, 0);
    for verb in [
        "check", "test", "explain", "query", "diff", "compile", "apply",
    ] {
        assert!(
            out.stdout.contains(verb),
            "{verb} missing from help:\n{}",
            out.stdout
        );
    }
    let out = komnet(&["--help"]);
    for verb in [
        "policy",
        "token",
        "revoke",
        "homeoffice",
        "audit",
        "completions",
    ] {
        assert!(
            out.stdout.contains(verb),
            "{verb} missing from help:\n{}",
            out.stdout
        );
    }
    // Admin commands reach the enrollment service only through its socket: none here.
    let out = komnet(&[
        "token",
        "create",
        "--tenant",
        "t",
        "--site",
        "s",
        "--role",
        "spoke",
        "--out",
        "/nonexistent/x.json",
        "--socket",
        "/nonexistent/admin.sock",
    ]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("admin.sock"), "{}", out.stderr);
    let out = komnet(&["completions", "bash"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("komnet"));
    let out = komnet(&["policy", "query", "x"]);
    assert_eq!(out.code, 2, "usage errors exit 2: {}", out.stderr);
}

#[test]
fn keygen_bundle_verify() {
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    let key = tmp.join("operator.key");
    let out = komnet(&["policy", "keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Never overwrites a key.
    assert_eq!(
        komnet(&["policy", "keygen", "--out", key.to_str().unwrap()]).code,
        1
    );
    let bundle = tmp.join("policy.bundle");
    let out = komnet(&[
        "policy",
        "bundle",
        komnet_testkit::example_dir("landkreis").to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("policy version 7"), "{}", out.stdout);
    let public = tmp.join("operator.pub");
    let out = komnet(&[
        "policy",
        "verify",
        bundle.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("signature valid"), "{}", out.stdout);
    // A broken policy is not bundled, and says why.
    let broken = komnet_testkit::copy_example("landkreis");
    replace_in(
        &broken.join("tenants/kreis.toml"),
        "to = [\"dms\"",
        "to = [\"dmz\"",
    );
    let out = komnet(&[
        "policy",
        "bundle",
        broken.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        tmp.join("x.bundle").to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("unknown service \"dmz\""),
        "{}",
        out.stderr
    );
    assert!(!tmp.join("x.bundle").exists());
}

/// The man pages the Debian package ships: one per subcommand, named by its path, with the real
/// invocation in the synopsis; the generating command stays out of `--help`.
#[test]
fn manpages_for_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man");
    let out = komnet(&["manpages", dir.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for page in [
        "komnet.1",
        "komnet-policy.1",
        "komnet-policy-check.1",
        "komnet-token-create.1",
        "komnet-status.1",
    ] {
        assert!(dir.join(page).is_file(), "{page} missing");
    }
    assert!(!dir.join("komnet-help.1").exists());
    assert!(!dir.join("komnet-manpages.1").exists());
    let check = fs::read_to_string(dir.join("komnet-policy-check.1")).unwrap();
    assert!(check.contains(".TH komnet-policy-check 1"), "{check}");
    assert!(check.contains("komnet policy check"), "{check}");
    let top = fs::read_to_string(dir.join("komnet.1")).unwrap();
    assert!(top.contains("komnet\\-policy(1)"), "{top}");
    assert!(!komnet(&["--help"]).stdout.contains("manpages"));
}

#[test]
fn a_guardrail_over_a_communes_rule_is_a_warning_once_and_deny_warnings_makes_it_an_error() {
    let dir = komnet_testkit::copy_example("landkreis");
    // The operator adds a guardrail that fully overrides musterstadt's "building-control".
    replace_in(
        &dir.join("operator.toml"),
        "# ---- operator tests",
        "[[guardrail]]\nname = \"iot-offline\"\nfrom_kinds = [\"iot\"]\nto = [\"gebaeudeleittechnik\"]\n\n# ---- operator tests",
    );
    let d = dir.to_str().unwrap();
    let check = komnet(&["policy", "check", d]);
    assert_eq!(check.code, 0, "{}", check.stderr);
    let warning = "rule \"building-control\" in ";
    assert_eq!(check.stderr.matches(warning).count(), 1, "{}", check.stderr);
    assert!(
        check
            .stderr
            .contains("tenants/musterstadt.toml:96 is inactive: guardrail \"iot-offline\" in "),
        "{}",
        check.stderr
    );
    assert!(
        check
            .stderr
            .contains("operator.toml:97 denies every flow it allows"),
        "{}",
        check.stderr
    );
    assert!(check.stderr.ends_with(": 1 warning\n"), "{}", check.stderr);
    assert!(
        check.stdout.contains("17 tests (1 warning)\n"),
        "{}",
        check.stdout
    );
    // Every verb keeps working for the other communes.
    for args in [
        vec!["policy", "test", d],
        vec![
            "policy",
            "compile",
            d,
            "--site",
            "musterstadt/rathaus",
            "--nft",
        ],
        vec!["policy", "query", d, "--service", "dms"],
    ] {
        let out = komnet(&args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.matches(warning).count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
    }
    // Strict: the warning is an error.
    let strict = komnet(&["policy", "check", "--deny-warnings", d]);
    assert_eq!(strict.code, 1);
    assert!(
        strict
            .stderr
            .contains("1 warning (--deny-warnings: treated as errors); the policy is not usable"),
        "{}",
        strict.stderr
    );
    let strict = komnet(&["policy", "test", d, "--deny-warnings"]);
    assert_eq!(strict.code, 1, "{}", strict.stdout);
}

#[test]
fn diff_warns_when_the_content_changed_but_the_version_did_not() {
    let old = komnet_testkit::example_dir("landkreis");
    let new = komnet_testkit::copy_example("landkreis");
    replace_in(
        &new.join("tenants/musterstadt.toml"),
        "to = [\"telefonanlage\", \"dns\"]",
        "to = [\"telefonanlage\", \"dns\", \"mail\"]",
    );
    let (o, n) = (old.to_str().unwrap(), new.to_str().unwrap());
    let out = komnet(&["policy", "diff", o, n]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("warning: ")
            && out.stderr.contains(": the content changed (tenants/musterstadt.toml) but the version did not (7 in both): gateways refuse a bundle with the version they run and other content; raise [policy] version in operator.toml to 8"),
        "{}",
        out.stderr
    );
    replace_in(&new.join("operator.toml"), "version = 7", "version = 8");
    let out = komnet(&["policy", "diff", o, n]);
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
    replace_in(&new.join("operator.toml"), "version = 8", "version = 6");
    let out = komnet(&["policy", "diff", o, n]);
    assert!(
        out.stderr.contains("the version goes down (7 -> 6)"),
        "{}",
        out.stderr
    );
    // The same files: nothing to say.
    let out = komnet(&["policy", "diff", o, o]);
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
}

#[test]
fn explain_takes_the_other_port_order_with_a_hint_and_uses_host_addresses() {
    let dir = komnet_testkit::example_dir("landkreis");
    let d = dir.to_str().unwrap();
    let out = komnet(&[
        "policy",
        "explain",
        d,
        "--from",
        "musterstadt/gebaeude",
        "--to",
        "dms:443/tcp",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("warning: --to \"dms:443/tcp\": write \"dms:tcp/443\", not \"dms:443/tcp\""),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout
            .starts_with("IPv4 10.20.4.1 -> 10.1.0.10:tcp/443: deny (guardrail \"iot-not-dms\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("\nIPv6 fd00:20:0:4::1 -> [fd00:1::10]:tcp/443: deny"),
        "{}",
        out.stdout
    );
    // An IPv4-only destination from an IPv6 source: a deny that says why, exit 0.
    let out = komnet(&[
        "policy",
        "explain",
        d,
        "--from",
        "fd00:20:0:1::7",
        "--to",
        "10.1.0.10:tcp/443",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "IPv6 fd00:20:0:1::7 -> 10.1.0.10:tcp/443: deny (the source is IPv6 and the destination is not: no packet has both)\n"
    );
}

#[test]
fn check_speaks_json_gitlab_code_quality_and_sarif_for_ci() {
    let dir = komnet_testkit::copy_example("landkreis");
    let frag = dir.join("tenants/musterstadt.toml");
    replace_in(&frag, "from = [\"gebaeude\"]", "from = [\"gebaede\"]");
    // And a warning: a guardrail that overrides a rule.
    replace_in(
        &dir.join("operator.toml"),
        "# ---- operator tests",
        "[[guardrail]]\nname = \"no-phones\"\nfrom_kinds = [\"voip\"]\nto = [\"telefonanlage\", \"dns\"]\n\n# ---- operator tests",
    );
    let d = dir.to_str().unwrap();
    let line = fs::read_to_string(&frag)
        .unwrap()
        .lines()
        .position(|l| l.contains("gebaede"))
        .unwrap()
        + 1;

    let out = komnet(&["policy", "check", "--format", "json", d]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["valid"], false);
    assert_eq!(
        (report["errors"].as_u64(), report["warnings"].as_u64()),
        (Some(1), Some(1))
    );
    let error = &report["diagnostics"][0];
    assert_eq!(error["severity"], "error");
    assert!(error["file"]
        .as_str()
        .unwrap()
        .ends_with("tenants/musterstadt.toml"));
    assert_eq!(error["line"].as_u64(), Some(line as u64));
    assert_eq!(error["column"].as_u64(), Some(9));
    assert_eq!(
        error["message"],
        "unknown segment or group \"gebaede\"; did you mean \"gebaeude\"?"
    );
    let warning = &report["diagnostics"][1];
    assert_eq!(warning["severity"], "warning");
    assert!(warning["related"]["file"]
        .as_str()
        .unwrap()
        .ends_with("operator.toml"));

    let out = komnet(&["policy", "check", "--format", "gitlab", d]);
    assert_eq!(out.code, 1);
    let issues: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let issues = issues.as_array().unwrap();
    assert_eq!(issues.len(), 2);
    assert_eq!(issues[0]["severity"], "critical");
    assert_eq!(issues[1]["severity"], "minor");
    assert_eq!(
        issues[0]["location"]["lines"]["begin"].as_u64(),
        Some(line as u64)
    );
    assert!(issues[0]["location"]["path"]
        .as_str()
        .unwrap()
        .ends_with("tenants/musterstadt.toml"));
    assert_eq!(issues[0]["fingerprint"].as_str().unwrap().len(), 32);
    assert_ne!(issues[0]["fingerprint"], issues[1]["fingerprint"]);

    let out = komnet(&["policy", "check", "--format", "sarif", d]);
    assert_eq!(out.code, 1);
    let sarif: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results[0]["level"], "error");
    let region = &results[0]["locations"][0]["physicalLocation"]["region"];
    assert_eq!(region["startLine"].as_u64(), Some(line as u64));
    assert_eq!(
        (region["startColumn"].as_u64(), region["endColumn"].as_u64()),
        (Some(9), Some(18))
    );
    assert_eq!(results[1]["level"], "warning");
    assert!(
        results[1]["relatedLocations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            .as_str()
            .unwrap()
            .ends_with("operator.toml")
    );

    // A valid policy: an empty report, exit 0; --deny-warnings counts the warning.
    replace_in(&frag, "from = [\"gebaede\"]", "from = [\"gebaeude\"]");
    let out = komnet(&["policy", "check", "--format", "gitlab", d]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let out = komnet(&["policy", "check", "--format", "json", "--deny-warnings", d]);
    assert_eq!(out.code, 1, "{}", out.stdout);
}

#[test]
fn diff_writes_markdown_for_a_merge_request() {
    let new = komnet_testkit::copy_example("landkreis");
    replace_in(
        &new.join("tenants/musterstadt.toml"),
        "to = [\"telefonanlage\", \"dns\"]",
        "to = [\"telefonanlage\", \"dns\", \"mail\"]",
    );
    replace_in(&new.join("operator.toml"), "version = 7", "version = 8");
    let old = komnet_testkit::example_dir("landkreis");
    let out = komnet(&[
        "policy",
        "diff",
        "--format",
        "markdown",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "### Policy \"Landkreis Musterland\": version 7 → 8\n\n\
         **Newly allowed** (1)\n\n\
         | from (segment) | to (service) | ports |\n|---|---|---|\n\
         | `musterstadt/voip` | `mail` | tcp/25, tcp/587, tcp/993 |\n\n\
         1 newly allowed, 0 newly denied, 0 address changes.\n"
    );
}

#[test]
fn fmt_brings_a_messy_copy_back_to_the_examples_layout_and_keeps_comments() {
    let dir = komnet_testkit::copy_example("landkreis");
    let d = dir.to_str().unwrap();
    let frag = dir.join("tenants/musterstadt.toml");
    replace_in(
        &frag,
        "kind = \"staff\"\nsite = \"rathaus\"",
        "site=\"rathaus\"\n    kind   =  \"staff\"",
    );
    replace_in(
        &frag,
        "[\"10.20.1.0/24\", \"fd00:20:0:1::/64\"]",
        "[ \"10.20.1.0/24\",\"fd00:20:0:1::/64\" ]",
    );
    replace_in(&frag, "\n\n[[rule]]", "\n\n\n\n[[rule]]");
    replace_in(
        &frag,
        "export = [\"beispieldorf\"]   #",
        "export = [\"beispieldorf\"]   #  ",
    );
    replace_in(&dir.join("operator.toml"), "version = 7", "version=7");
    // CI mode: lists what is not in the layout, changes nothing, exits 1.
    let out = komnet(&["policy", "fmt", "--check", d]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        format!("would reformat {d}/operator.toml\nwould reformat {d}/tenants/musterstadt.toml\n")
    );
    let out = komnet(&["policy", "fmt", d]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    // The example is in the layout: fmt gives back exactly its files (comments included)...
    let original = fs::read_to_string(
        komnet_testkit::example_dir("landkreis").join("tenants/musterstadt.toml"),
    )
    .unwrap();
    let tidy = fs::read_to_string(&frag).unwrap();
    assert_eq!(
        tidy,
        original.replace("[\"beispieldorf\"]   #", "[\"beispieldorf\"]   #  ")
    );
    assert_eq!(
        fs::read_to_string(dir.join("operator.toml")).unwrap(),
        fs::read_to_string(komnet_testkit::example_dir("landkreis").join("operator.toml")).unwrap()
    );
    // ...and a second run changes nothing.
    let out = komnet(&["policy", "fmt", "--check", d]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    // A file that is not TOML is named, not touched.
    fs::write(dir.join("tenants/kreis.toml"), "tenant = \n").unwrap();
    let out = komnet(&["policy", "fmt", d]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("tenants/kreis.toml: not valid TOML"),
        "{}",
        out.stderr
    );
    assert_eq!(
        fs::read_to_string(dir.join("tenants/kreis.toml")).unwrap(),
        "tenant = \n"
    );
}

#[test]
fn both_examples_are_in_the_fmt_layout() {
    for name in ["landkreis", "st-wendel"] {
        let dir = komnet_testkit::example_dir("landkreis")
            .join("..")
            .join(name);
        let out = komnet(&["policy", "fmt", "--check", dir.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{name}: {}{}", out.stdout, out.stderr);
    }
}

#[test]
fn schema_prints_and_writes_the_shipped_schemas() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = komnet(&["policy", "schema", "tenant"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        fs::read_to_string(root.join("docs/schema/tenant.schema.json")).unwrap()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("schema");
    let out = komnet(&["policy", "schema", "--out-dir", dir.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for name in ["operator.schema.json", "tenant.schema.json"] {
        assert_eq!(
            fs::read_to_string(dir.join(name)).unwrap(),
            fs::read_to_string(root.join("docs/schema").join(name)).unwrap()
        );
    }
    // Neither: a usage error.
    assert_eq!(komnet(&["policy", "schema"]).code, 2);
}

#[test]
fn diff_shows_the_new_versions_warnings_once_not_the_old_ones() {
    let guardrail = "[[guardrail]]\nname = \"iot-offline\"\nfrom_kinds = [\"iot\"]\nto = [\"gebaeudeleittechnik\"]\n\n# ---- operator tests";
    let old = komnet_testkit::copy_example("landkreis");
    let new = komnet_testkit::copy_example("landkreis");
    replace_in(
        &old.join("operator.toml"),
        "# ---- operator tests",
        guardrail,
    );
    replace_in(
        &new.join("operator.toml"),
        "# ---- operator tests",
        guardrail,
    );
    replace_in(&new.join("operator.toml"), "version = 7", "version = 8");
    let out = komnet(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stderr.matches("rule \"building-control\" in ").count(),
        1,
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("{}: 1 warning", new.display())),
        "{}",
        out.stderr
    );
}

/// docs/policy.md's "Trying it" session is what the commands print: each `$ komnet …` line runs
/// from the repository root, and its output must match the lines shown (up to a line `…`, or
/// the `{ … }` of a ruleset: shortened there). `| tail -1` keeps the last line.
#[test]
fn the_docs_session_shows_what_the_commands_print() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = fs::read_to_string(root.join("docs/policy.md")).unwrap();
    let session = doc
        .split("### Trying it\n\n```\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("docs/policy.md has a \"Trying it\" session");
    let mut blocks: Vec<(String, Vec<&str>)> = Vec::new();
    for line in session.lines() {
        match line.strip_prefix("$ komnet ") {
            Some(cmd) => blocks.push((cmd.to_owned(), Vec::new())),
            None => blocks
                .last_mut()
                .expect("output after a command")
                .1
                .push(line),
        }
    }
    assert!(blocks.len() >= 6);
    for (cmd, shown) in blocks {
        let (cmd, tail) = match cmd.strip_suffix(" | tail -1") {
            Some(c) => (c.to_owned(), true),
            None => (cmd, false),
        };
        let out = Command::new(env!("CARGO_BIN_EXE_komnet"))
            .args(cmd.split_whitespace())
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "komnet {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines: Vec<&str> = stdout.lines().collect();
        if tail {
            lines = lines.split_off(lines.len().saturating_sub(1));
        }
        for (i, want) in shown.iter().enumerate() {
            if want.trim() == "…" {
                break;
            }
            if let Some(prefix) = want.strip_suffix("{ … }") {
                assert!(stdout.starts_with(prefix), "komnet {cmd}: {stdout}");
                break;
            }
            assert_eq!(
                lines.get(i).copied(),
                Some(*want),
                "komnet {cmd}:\n{stdout}"
            );
            if i + 1 == shown.len() {
                assert_eq!(
                    lines.len(),
                    shown.len(),
                    "komnet {cmd} printed more:\n{stdout}"
                );
            }
        }
    }
}

#[test]
fn query_and_compile_suggest_the_closest_name() {
    let dir = komnet_testkit::example_dir("landkreis");
    let d = dir.to_str().unwrap();
    for (args, want) in [
        (
            vec!["policy", "query", d, "--service", "musterstadt/filserver"],
            "did you mean \"musterstadt/fileserver\"?",
        ),
        (
            vec!["policy", "query", d, "--segment", "musterstadt/verwaltnug"],
            "did you mean \"musterstadt/verwaltung\"?",
        ),
        (
            vec!["policy", "compile", d, "--site", "musterstadt/rathuas", "--nft"],
            "tenant \"musterstadt\" has no site named \"rathuas\"; did you mean \"musterstadt/rathaus\"?",
        ),
    ] {
        let out = komnet(&args);
        assert_eq!(out.code, 1, "{args:?}");
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
    }
}

#[test]
fn lan_prints_the_technicians_sheet_where_each_segment_arrives_and_what_it_serves() {
    let dir = komnet_testkit::copy_example("landkreis");
    let frag = dir.join("tenants/musterstadt.toml");
    replace_in(
        &frag,
        "vlan = 10\n",
        "vlan = 10\ndhcp = { dns = [\"10.1.1.53\"], lease = \"8h\", reserved = [\"10.20.1.2-10.20.1.49\"], hosts = [{ mac = \"52:54:00:12:34:56\", address = \"10.20.1.20\", name = \"drucker\" }] }\n",
    );
    replace_in(
        &frag,
        "vlan = 100\n",
        "vlan = 100\ndhcp = { enabled = false }\n",
    );
    let out = komnet(&[
        "policy",
        "lan",
        dir.to_str().unwrap(),
        "--site",
        "musterstadt/rathaus",
    ]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    for want in [
        "musterstadt/rathaus: the appliance's LAN port eth1 goes to the town hall's switch\n",
        "\n  verwaltung (staff): VLAN 10, tagged on eth1 (interface eth1.10)\n    router (the appliance): 10.20.1.1/24, fd00:20:0:1::1/64\n    DHCP: 10.20.1.50-10.20.1.254, lease 8h, DNS 10.1.1.53\n    not leased (static hosts): 10.20.1.2-10.20.1.49\n    reserved for 52:54:00:12:34:56: 10.20.1.20 (drucker)\n    IPv6: router advertisements for fd00:20:0:1::/64 (SLAAC)\n",
        "\n  gaeste (guest): VLAN 100, tagged on eth1 (interface eth1.100)\n    router (the appliance): 10.20.100.1/24, fd00:20:0:100::1/64\n    DHCP: off (enabled = false)",
        "switch port to eth1 (trunk):\n  tagged: VLAN 10 (verwaltung), VLAN 20 (buergerbuero), VLAN 30 (voip), VLAN 40 (gebaeude), VLAN 100 (gaeste)\n  untagged (native VLAN): none\n",
    ] {
        assert!(out.stdout.contains(want), "{want:?} missing in:\n{}", out.stdout);
    }
    // VLAN interfaces are named after the trunk given.
    let out = komnet(&[
        "policy",
        "lan",
        dir.to_str().unwrap(),
        "--site",
        "musterstadt/rathaus",
        "--lan",
        "enp2s0",
    ]);
    assert!(
        out.stdout
            .contains("VLAN 10, tagged on enp2s0 (interface enp2s0.10)"),
        "{}",
        out.stdout
    );
    drop(dir);

    // The district example: a port of its own next to the trunk; a town hall's own numbering.
    let st_wendel = komnet_testkit::example_dir("landkreis").join("../st-wendel");
    let d = st_wendel.to_str().unwrap();
    let out = komnet(&["policy", "lan", d, "--site", "nohfelden/rathaus"]);
    assert!(
        out.stdout
            .contains("  gaeste (guest): untagged on port guest0, a cable of its own\n")
            && out.stdout.contains(
                "  untagged (native VLAN): verwaltung\n  cable to port guest0 (gaeste)\n"
            ),
        "{}",
        out.stdout
    );
    let out = komnet(&["policy", "lan", d, "--site", "marpingen/rathaus"]);
    assert!(
        out.stdout.contains("    192.168.178.0/24: the LAN's own numbering, translated 1:1 to 10.50.1.0/24 at the tunnel\n    router (the appliance): 192.168.178.1/24\n    DHCP: 192.168.178.2-192.168.178.254, lease 12h, no DNS server\n"),
        "{}",
        out.stdout
    );
    let out = komnet(&["policy", "lan", d, "--site", "marpingen/rathuas"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("did you mean \"marpingen/rathaus\"?"),
        "{}",
        out.stderr
    );
    // An interface name Linux would not take is refused before anything is printed.
    let out = komnet(&[
        "policy",
        "lan",
        d,
        "--site",
        "marpingen/rathaus",
        "--lan",
        "eth 1",
    ]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.is_empty() && out.stderr.contains("interface name \"eth 1\" is not valid"),
        "{}",
        out.stderr
    );
}
