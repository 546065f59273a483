//! The compiled policy as enforcement points hold it: behind an atomic swap, so the packet path
//! reads it without a lock, and a new version that fails to load never replaces a good one.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::analysis::run_tests;
use crate::classifier::Classifier;
use crate::flow::{Origin, PacketMeta};
use crate::model::{Policy, PolicyErrors};
use crate::oracle::Decision;

/// A checked policy with its classifier.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub policy: Policy,
    pub classifier: Classifier,
}

impl CompiledPolicy {
    /// Loads, checks, runs the inline tests and compiles; any failure is an error.
    pub fn load(dir: &Path) -> Result<CompiledPolicy, ReloadError> {
        let policy = Policy::load(dir).map_err(ReloadError::Invalid)?;
        Self::from_policy(policy)
    }

    pub fn from_policy(policy: Policy) -> Result<CompiledPolicy, ReloadError> {
        let report = run_tests(&policy);
        if report.failed > 0 {
            let failures: Vec<String> = report
                .outcomes
                .iter()
                .filter(|o| !o.passed)
                .map(|o| o.line.clone())
                .collect();
            return Err(ReloadError::TestsFailed {
                failed: report.failed,
                lines: failures,
            });
        }
        let classifier = Classifier::compile(&policy);
        Ok(CompiledPolicy { policy, classifier })
    }

    pub fn version(&self) -> u64 {
        self.policy.version
    }

    #[inline]
    pub fn classify(&self, origin: Origin, packet: &PacketMeta) -> Decision {
        self.classifier.classify(origin, packet)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(PolicyErrors),
    #[error("{failed} inline test(s) failed: {}", lines.join("; "))]
    TestsFailed { failed: usize, lines: Vec<String> },
}

/// The current policy of an enforcement point. Readers take a snapshot per batch of packets;
/// [`PolicyHandle::reload`] swaps in a new version only when it loaded completely.
#[derive(Debug)]
pub struct PolicyHandle {
    current: ArcSwap<CompiledPolicy>,
}

impl PolicyHandle {
    pub fn new(initial: CompiledPolicy) -> Self {
        PolicyHandle {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<CompiledPolicy> {
        self.current.load_full()
    }

    /// Loads `dir`; on success it replaces the policy in force and returns the new version, on
    /// failure the previous policy stays and the error says why.
    pub fn reload(&self, dir: &Path) -> Result<u64, ReloadError> {
        let next = CompiledPolicy::load(dir)?;
        let version = next.version();
        self.current.store(Arc::new(next));
        Ok(version)
    }
}
