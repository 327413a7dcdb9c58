//! Whole-stack benchmarks on one VM: the host's ioctl path (cache invalidation, guest PASID
//! bind and unbind, 4 KiB MAP/UNMAP_DMA, each with its invalidations waited for) and the
//! guest's forwarded path (mmu-notifier invalidation, SVA bind and unbind, page request
//! round trip), each next to its baseline where it has one.

// `criterion_group!` defines a public `benches` function that carries no doc comment.
#![allow(missing_docs)]

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use vsva_testbed::bench::forward::{
    ForwardedInvalidation, GuestBind, GuestCall, PageRequestRoundTrip, ResidentFill,
    UnboundMprotect,
};
use vsva_testbed::bench::uapi::{
    BindCall, CachedTranslations, HostBind, HostInvalidations, HostMap, MapCall,
};
use vsva_testbed::bench::vm::BenchVm;
use vsva_testbed::bench::{BenchError, Workload};

/// Benchmarks `workload` as `name` in `g`.
fn bench(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    workload: Result<impl Workload, BenchError>,
) {
    let mut w = workload.unwrap_or_else(|e| panic!("{name}: {e}"));
    g.bench_function(name, |b| {
        b.iter_custom(|n| w.run(n).unwrap_or_else(|e| panic!("{name}: {e}")))
    });
}

fn ioctl(c: &mut Criterion) {
    let vm = BenchVm::new().expect("VM");
    let cached = CachedTranslations::new(&vm).expect("cached translations");
    let mut g = c.benchmark_group("ioctl");
    bench(
        &mut g,
        "cache_invalidate_pasid",
        HostInvalidations::pasid(&cached),
    );
    bench(
        &mut g,
        "cache_invalidate_1_page",
        HostInvalidations::pages(&cached, 1),
    );
    bench(
        &mut g,
        "cache_invalidate_512_pages",
        HostInvalidations::pages(&cached, 512),
    );
    bench(&mut g, "bind_gpasid", HostBind::new(&vm, BindCall::Bind));
    bench(
        &mut g,
        "unbind_gpasid",
        HostBind::new(&vm, BindCall::Unbind),
    );
    bench(&mut g, "map_dma_4k", HostMap::new(&vm, MapCall::Map));
    bench(&mut g, "unmap_dma_4k", HostMap::new(&vm, MapCall::Unmap));
    g.finish();
}

fn forwarded(c: &mut Criterion) {
    let vm = BenchVm::new().expect("VM");
    let mut g = c.benchmark_group("forwarded");
    bench(
        &mut g,
        "mmu_notifier_invalidation",
        ForwardedInvalidation::new(&vm),
    );
    bench(&mut g, "mprotect_unbound", UnboundMprotect::new(&vm));
    bench(&mut g, "guest_bind", GuestBind::new(&vm, GuestCall::Bind));
    bench(
        &mut g,
        "guest_unbind",
        GuestBind::new(&vm, GuestCall::Unbind),
    );
    bench(
        &mut g,
        "page_request_round_trip",
        PageRequestRoundTrip::new(&vm),
    );
    bench(&mut g, "fill_resident", Ok(ResidentFill::new(&vm)));
    g.finish();
}

criterion_group!(benches, ioctl, forwarded);
criterion_main!(benches);
