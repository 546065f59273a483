//! `/metrics` of the enrollment service (plain HTTP on `metrics_listen`, keep it on loopback or
//! a management network): when what the service holds expires — its TLS certificate, the CAs,
//! the published policy bundle — and whether less than a third of its lifetime is left
//! (`komnet_enroll_expiring`), the registry version and the hubs following it now.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use x509_parser::prelude::FromDer as _;

use crate::server_cert::RotatingServerCert;
use crate::service::Service;

/// Hubs following the registry stream now (one per open stream).
#[derive(Debug, Default)]
pub struct Followers(AtomicI64);

impl Followers {
    /// Counts a stream until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>) -> FollowerGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        FollowerGuard(self.clone())
    }

    pub fn count(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct FollowerGuard(Arc<Followers>);

impl Drop for FollowerGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Something the service holds that runs out: what it is and its validity (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub what: &'static str,
    pub not_before: i64,
    pub not_after: i64,
}

impl Held {
    /// Less than a third of its lifetime left at `now`.
    pub fn expiring(&self, now: i64) -> bool {
        komnet_proto::status::less_than_a_third_left(self.not_before, self.not_after, now)
    }
}

/// The validity of a DER certificate.
pub fn certificate_validity(what: &'static str, der: &[u8]) -> Option<Held> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let v = cert.validity();
    Some(Held {
        what,
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// Everything the service holds that expires, at this moment.
pub fn held(service: &Service, server_cert: &RotatingServerCert) -> Vec<Held> {
    let mut out = Vec::new();
    out.push(Held {
        what: "server_tls",
        not_before: server_cert.not_before(),
        not_after: server_cert.not_after(),
    });
    out.extend(certificate_validity("issuing_ca", &service.ca.issuing_der));
    out.extend(certificate_validity("root_ca", &service.ca.root_der));
    if let Some((not_before, expires)) = service.published_policy_validity() {
        out.push(Held {
            what: "policy",
            not_before,
            not_after: expires,
        });
    }
    out
}

/// One sample: its labels (none: a single unlabelled value) and value.
type Row = (Vec<(&'static str, String)>, i64);

/// Gauge families: name, help, rows.
#[derive(Debug, Default)]
struct Families(Vec<(String, String, Vec<Row>)>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, help, rows) in &self.0 {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, value) in rows {
                if labels.is_empty() {
                    ConstGauge::new(*value).encode(metric)?;
                    break;
                }
                ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// The exposition at `now`.
pub fn render(
    held: &[Held],
    registry_version: u64,
    policy_version: u64,
    followers: i64,
    now: i64,
) -> String {
    let mut f = Families::default();
    let by_what = |value: &dyn Fn(&Held) -> i64| -> Vec<Row> {
        held.iter()
            .map(|h| (vec![("what", h.what.to_owned())], value(h)))
            .collect()
    };
    f.0.push((
        "komnet_enroll_expiry_seconds".into(),
        "Unix time each thing the service holds stops being valid: server_tls (its own TLS certificate, renewed two thirds in), issuing_ca, root_ca, policy (the published bundle's --valid-for).".into(),
        by_what(&|h| h.not_after),
    ));
    f.0.push((
        "komnet_enroll_expiring".into(),
        "1 when less than a third of its lifetime is left (a renewal that keeps failing, a CA to roll over, a bundle to re-sign).".into(),
        by_what(&|h| i64::from(h.expiring(now))),
    ));
    f.0.push((
        "komnet_enroll_registry_version".into(),
        "The registry version (grows with every enrolment, renewal and revocation).".into(),
        vec![(Vec::new(), registry_version as i64)],
    ));
    f.0.push((
        "komnet_enroll_policy_version".into(),
        "The published policy version (0: none).".into(),
        vec![(Vec::new(), policy_version as i64)],
    ));
    f.0.push((
        "komnet_enroll_registry_followers".into(),
        "Hubs following the registry stream now.".into(),
        vec![(Vec::new(), followers)],
    ));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(f));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}
