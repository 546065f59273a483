//! Hot reload: a policy that fails to parse, check, test or compile never replaces the one in
//! force, and the error says why.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::fs;
use std::path::Path;

use komnet_policy::{CompiledPolicy, Origin, PacketMeta, PolicyHandle, Proto, ReloadError};

fn edit(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn a_bad_policy_never_replaces_a_good_one() {
    let dir = komnet_testkit::copy_example("landkreis");
    let handle = PolicyHandle::new(CompiledPolicy::load(&dir).unwrap());
    assert_eq!(handle.current().version(), 7);
    let staff_to_dms = PacketMeta::new(
        "10.20.1.7".parse().unwrap(),
        "10.1.0.10".parse().unwrap(),
        Proto::Tcp,
        443,
    );
    assert!(
        handle
            .current()
            .classify(Origin::Address, &staff_to_dms)
            .allow
    );
    let snapshot = handle.current();

    // 1. A syntax error.
    let frag = dir.join("tenants/musterstadt.toml");
    edit(
        &frag,
        "[[rule]]\nname = \"staff-dms\"",
        "[[rule]\nname = \"staff-dms\"",
    );
    match handle.reload(&dir) {
        Err(ReloadError::Invalid(e)) => assert!(e.render().contains("musterstadt.toml:")),
        other => panic!("syntax error accepted: {other:?}"),
    }
    edit(
        &frag,
        "[[rule]\nname = \"staff-dms\"",
        "[[rule]]\nname = \"staff-dms\"",
    );

    // 2. A check error (unknown service) with a higher version.
    edit(&dir.join("operator.toml"), "version = 7", "version = 8");
    edit(
        &frag,
        "to = [\"dms\", \"wohngeld\"]",
        "to = [\"dms\", \"wohngelt\"]",
    );
    match handle.reload(&dir) {
        Err(ReloadError::Invalid(e)) => {
            assert!(e.render().contains("unknown service \"wohngelt\""))
        }
        other => panic!("check error accepted: {other:?}"),
    }
    edit(
        &frag,
        "to = [\"dms\", \"wohngelt\"]",
        "to = [\"dms\", \"wohngeld\"]",
    );

    // 3. A failing inline test: the staff no longer reach the DMS.
    edit(&frag, "to = [\"dms\", \"wohngeld\"]", "to = [\"wohngeld\"]");
    match handle.reload(&dir) {
        Err(ReloadError::TestsFailed { failed, lines }) => {
            assert!(failed >= 1);
            assert!(
                lines.iter().any(|l| l.contains("expected allow, got deny")),
                "{lines:?}"
            );
        }
        other => panic!("failing tests accepted: {other:?}"),
    }
    // Through all of it the old policy stayed in force, unchanged.
    assert!(std::sync::Arc::ptr_eq(&snapshot, &handle.current()));
    assert_eq!(handle.current().version(), 7);
    assert!(
        handle
            .current()
            .classify(Origin::Address, &staff_to_dms)
            .allow
    );

    // 4. A good new version replaces it.
    edit(&frag, "to = [\"wohngeld\"]", "to = [\"dms\", \"wohngeld\"]");
    edit(
        &frag,
        "[[rule]]\nname = \"staff-files\"",
        "[[rule]]\nname = \"staff-files\"\nports = [\"tcp/445\"]",
    );
    assert_eq!(handle.reload(&dir).unwrap(), 8);
    assert_eq!(handle.current().version(), 8);
}
