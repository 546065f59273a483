//! Any bytes as a policy file — the operator file, or a tenant fragment next to the worked
//! example's operator file — must give a policy or errors, never a panic; a policy that loads
//! must also survive its tests, the classifier compiler and the nftables compiler.
#![no_main]

use komnet_policy::{nft, run_tests, Classifier, Policy, SiteId};
use libfuzzer_sys::fuzz_target;

const OPERATOR: &str = include_str!("../../../examples/policy/landkreis/operator.toml");

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let loaded = if selector % 2 == 0 {
        Policy::from_texts(&text, &[])
    } else {
        Policy::from_texts(OPERATOR, &[("musterstadt.toml", &text)])
    };
    match loaded {
        Ok(policy) => {
            let _ = run_tests(&policy);
            let _ = Classifier::compile(&policy);
            for i in 0..policy.sites.len() {
                let interfaces = nft::Interfaces {
                    lan: vec!["lan0".into()],
                    tunnel: "wg0".into(),
                };
                if let Ok(rules) = nft::ruleset_for_site(&policy, SiteId(i as u32), &interfaces) {
                    let _ = rules.to_string();
                }
            }
        }
        Err(errors) => {
            assert!(errors.error_count() > 0);
            let _ = errors.render();
        }
    }
});
