//! DMA benchmark: the DMA engine's 1 MiB memmove through nested translation (4 KiB pages,
//! IOTLB warm) against the CPU's copy of the same 1 MiB (`HostMemory::copy`).

// `criterion_group!` defines a public `benches` function that carries no doc comment.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vsva_testbed::bench::dma::{HostCopy, NestedMemmove, MEMMOVE_BYTES};
use vsva_testbed::bench::platform::{Platform, PlatformConfig};
use vsva_testbed::bench::Workload;

fn memmove(c: &mut Criterion) {
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: 2 * MEMMOVE_BYTES,
    })
    .expect("platform");
    let mut nested = NestedMemmove::new(&p).expect("nested memmove");
    let mut plain = HostCopy::new(&p).expect("host copy");
    let mut g = c.benchmark_group("memmove_1mib");
    g.throughput(Throughput::Bytes(MEMMOVE_BYTES));
    g.bench_function("dma_engine_nested", |b| {
        b.iter_custom(|n| nested.run(n).unwrap_or_else(|e| panic!("memmove: {e}")))
    });
    g.bench_function("host_memory_copy", |b| {
        b.iter_custom(|n| plain.run(n).unwrap_or_else(|e| panic!("copy: {e}")))
    });
    g.finish();
}

criterion_group!(benches, memmove);
criterion_main!(benches);
