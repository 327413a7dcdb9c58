//! Makes a fixed number of IOTLB hits (the `vsva bench` workload `IotlbHits`: nested
//! translations of random addresses over a warm 1,024-page working set, each checked to
//! come from the IOTLB), so that the instructions of one hit can be counted whatever the
//! machine's load:
//!
//! ```text
//! cargo build --release --example iotlb_hits -p vsva-testbed
//! valgrind --tool=callgrind --toggle-collect='*IotlbHits*Workload*run*' \
//!     target/release/examples/iotlb_hits 20000
//! ```
//!
//! Argument: the number of hits. The count collected is the hits and the workload's two
//! clock reads; divide by the hits.

use vsva_testbed::bench::platform::{Platform, PlatformConfig};
use vsva_testbed::bench::translate::{IotlbHits, WORKING_SET};
use vsva_testbed::bench::Workload;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hits: u64 = std::env::args()
        .nth(1)
        .ok_or("usage: iotlb_hits HITS")?
        .parse()?;
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: WORKING_SET * vsva_hw::memory::PAGE_SIZE,
    })?;
    let took = IotlbHits::new(&p)?.run(hits)?;
    println!(
        "{hits} IOTLB hits: {} ns each",
        took.as_nanos() / u128::from(hits.max(1))
    );
    Ok(())
}
