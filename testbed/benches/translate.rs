//! Translation benchmarks, each figure in one group with its baseline: IOTLB hits against
//! a foldhash map (and on two threads: the time of one hit on each), cold second-level
//! and nested walks against 4 and 24 dependent loads.

// `criterion_group!` defines a public `benches` function that carries no doc comment.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use vsva_hw::memory::PAGE_SIZE;
use vsva_testbed::bench::loads::DependentLoads;
use vsva_testbed::bench::platform::{Platform, PlatformConfig};
use vsva_testbed::bench::translate::{
    ColdWalks, HashMapLookups, IotlbHits, TwoThreadHits, WalkKind, WORKING_SET,
};
use vsva_testbed::bench::Workload;

fn bench(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    w: &mut dyn Workload,
) {
    g.bench_function(name, |b| {
        b.iter_custom(|n| w.run(n).unwrap_or_else(|e| panic!("{name}: {e}")))
    });
}

fn iotlb_hit(c: &mut Criterion) {
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: WORKING_SET * PAGE_SIZE,
    })
    .expect("platform");
    let mut g = c.benchmark_group("iotlb_hit");
    bench(
        &mut g,
        "iotlb",
        &mut IotlbHits::new(&p).expect("IOTLB hits"),
    );
    bench(
        &mut g,
        "hashmap_foldhash",
        &mut HashMapLookups::new(&p).expect("hash map"),
    );
    bench(
        &mut g,
        "iotlb_2_threads",
        &mut TwoThreadHits::new(&p).expect("two-thread hits"),
    );
    g.finish();
}

fn cold_walk(c: &mut Criterion) {
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: 16 * PAGE_SIZE,
    })
    .expect("platform");
    let mut g = c.benchmark_group("cold_walk");
    bench(
        &mut g,
        "second_level",
        &mut ColdWalks::new(&p, WalkKind::SecondLevel),
    );
    bench(&mut g, "dependent_loads_4", &mut DependentLoads::new(4));
    bench(&mut g, "nested", &mut ColdWalks::new(&p, WalkKind::Nested));
    bench(&mut g, "dependent_loads_24", &mut DependentLoads::new(24));
    bench(
        &mut g,
        "second_level_miss",
        &mut ColdWalks::misses(&p, WalkKind::SecondLevel),
    );
    bench(
        &mut g,
        "nested_miss",
        &mut ColdWalks::misses(&p, WalkKind::Nested),
    );
    g.finish();
}

criterion_group!(benches, iotlb_hit, cold_walk);
criterion_main!(benches);
