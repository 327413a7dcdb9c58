//! Makes a fixed number of page walks alone (the `vsva bench` workload `WalkOnly`: the
//! VT-d walker over the bench platform's tables, no IOMMU cache looked up or filled, each
//! walk's output checked against the expected host address), so that the instructions of
//! one walk can be counted whatever the machine's load:
//!
//! ```text
//! cargo build --release --example walks_alone -p vsva-testbed
//! valgrind --tool=callgrind --toggle-collect='*WalkOnly*Workload*run*' \
//!     target/release/examples/walks_alone sl 2000
//! ```
//!
//! Arguments: `sl|nested walks`. The count collected is `walks` walks and the workload's
//! two clock reads; divide by `walks`.

use vsva_testbed::bench::platform::{Platform, PlatformConfig};
use vsva_testbed::bench::translate::{WalkKind, WalkOnly};
use vsva_testbed::bench::Workload;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: walks_alone sl|nested WALKS";
    let [kind, walks] = args.as_slice() else {
        return Err(usage.into());
    };
    let kind = match kind.as_str() {
        "sl" => WalkKind::SecondLevel,
        "nested" => WalkKind::Nested,
        _ => return Err(usage.into()),
    };
    let walks: u64 = walks.parse()?;
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: 16 * vsva_hw::memory::PAGE_SIZE,
    })?;
    let took = WalkOnly::new(&p, kind)?.run(walks)?;
    println!(
        "{walks} {kind:?} walks alone: {} ns each",
        took.as_nanos() / u128::from(walks.max(1))
    );
    Ok(())
}
