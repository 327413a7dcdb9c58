//! Makes a fixed number of IOTLB-miss translations of one kind (the `vsva bench` workload
//! `ColdWalks`), so that the instructions of one miss can be counted whatever the machine's
//! load:
//!
//! ```text
//! cargo build --release --example cold_misses -p vsva-testbed
//! valgrind --tool=callgrind --toggle-collect='vsva_vtd::request::translate_miss*' \
//!     target/release/examples/cold_misses sl cold 2000
//! ```
//!
//! Arguments: `sl|nested cold|warm calls`. `cold` empties every IOMMU cache before each
//! translation (the `cold … walk+fills` figures), `warm` only the IOTLB and the
//! paging-structure caches, leaving the context and PASID caches warm (`sl_miss_ns`,
//! `nested_miss_ns`). The workload adds one warming translation to the calls. Every
//! translation is checked as the bench checks it.

use vsva_testbed::bench::platform::{Platform, PlatformConfig};
use vsva_testbed::bench::translate::{ColdWalks, WalkKind};
use vsva_testbed::bench::Workload;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: cold_misses sl|nested cold|warm CALLS";
    let [kind, caches, calls] = args.as_slice() else {
        return Err(usage.into());
    };
    let kind = match kind.as_str() {
        "sl" => WalkKind::SecondLevel,
        "nested" => WalkKind::Nested,
        _ => return Err(usage.into()),
    };
    let calls: u64 = calls.parse()?;
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: 16 * vsva_hw::memory::PAGE_SIZE,
    })?;
    let mut walks = match caches.as_str() {
        "cold" => ColdWalks::new(&p, kind),
        "warm" => ColdWalks::misses(&p, kind),
        _ => return Err(usage.into()),
    };
    let took = walks.run(calls)?;
    println!(
        "{calls} {caches} {kind:?} misses: {} ns each",
        took.as_nanos() / u128::from(calls.max(1))
    );
    Ok(())
}
