//! Makes a fixed number of `IOMMU_HWPT_INVALIDATE` calls of one kind (the `vsva bench`
//! workload `HwptInvalidate`: `entries` one-page entries `stride` pages apart), so that
//! their instructions can be counted whatever the machine's load:
//!
//! ```text
//! cargo build --release --example hwpt_invalidate_calls -p vsva-testbed
//! valgrind --tool=callgrind --toggle-collect='*do_hwpt_invalidate*' \
//!     target/release/examples/hwpt_invalidate_calls 64 2 100
//! ```
//!
//! Arguments: `entries stride calls`. Every call is checked as the bench checks it.

use vsva_testbed::bench::iommufd::{HwptInvalidate, IommufdVm};
use vsva_testbed::bench::Workload;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u64>())
        .collect::<Result<Vec<_>, _>>()?;
    let &[entries, stride, calls] = args.as_slice() else {
        return Err("usage: hwpt_invalidate_calls ENTRIES STRIDE CALLS".into());
    };
    let vm = IommufdVm::new()?;
    let mut calls_of = HwptInvalidate::new(&vm, entries, stride)?;
    let took = calls_of.run(calls)?;
    println!(
        "{calls} calls of {entries} entries {stride} pages apart: {} ns each",
        took.as_nanos() / u128::from(calls.max(1))
    );
    Ok(())
}
