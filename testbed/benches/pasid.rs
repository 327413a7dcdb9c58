//! PASID allocator benchmark: alloc and free at random positions with 0, 50 and 99 % of
//! the 20-bit space, shared by 1,000 VM sets, allocated at random positions.

// `criterion_group!` defines a public `benches` function that carries no doc comment.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use vsva_testbed::bench::pasid::PasidChurn;
use vsva_testbed::bench::Workload;

fn alloc_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("pasid_alloc_free");
    for percent in [0u32, 50, 99] {
        let mut churn = PasidChurn::new(f64::from(percent) / 100.0).expect("allocator");
        g.bench_function(format!("occupancy_{percent}"), |b| {
            b.iter_custom(|n| churn.run(n).unwrap_or_else(|e| panic!("churn: {e}")))
        });
    }
    g.finish();
}

criterion_group!(benches, alloc_free);
criterion_main!(benches);
