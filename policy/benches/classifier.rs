//! Classifier speed on a generated district policy (400 communes × 6 segments, 50 shared
//! services, 10,000 rules): lookups per second on one core, and the time to compile.
//!
//! `cargo bench -p komnet-policy --bench classifier`

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use komnet_policy::synthetic::{generate, packets, Shape};
use komnet_policy::{Classifier, Origin, Policy};

fn load(shape: Shape) -> Policy {
    let (op, tenants) = generate(shape);
    let refs: Vec<(&str, &str)> = tenants
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    match Policy::from_texts(&op, &refs) {
        Ok(p) => p,
        Err(e) => panic!("generated policy does not load:\n{}", e.render()),
    }
}

fn bench(c: &mut Criterion) {
    let shape = Shape::DISTRICT;
    let policy = load(shape);
    let classifier = Classifier::compile(&policy);
    let batch = packets(&policy, 4096);

    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("district_10k_rules_4096_packets", |b| {
        b.iter(|| {
            let mut allowed = 0u32;
            for p in &batch {
                allowed += u32::from(classifier.classify(Origin::Address, black_box(p)).allow);
            }
            allowed
        })
    });
    g.finish();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("district_10k_rules", |b| {
        b.iter(|| Classifier::compile(black_box(&policy)))
    });
    g.bench_function("district_10k_rules_parse_check_compile", |b| {
        let (op, tenants) = generate(shape);
        b.iter_batched(
            || (op.clone(), tenants.clone()),
            |(op, tenants)| {
                let refs: Vec<(&str, &str)> = tenants
                    .iter()
                    .map(|(n, t)| (n.as_str(), t.as_str()))
                    .collect();
                let p = Policy::from_texts(&op, &refs).map_err(|e| e.render());
                p.map(|p| Classifier::compile(&p).entry_count())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
