//! Runs a fixed number of the `pasid-alloc-free` probe's operations at one occupancy, so
//! that callgrind counts their instructions and simulated cache misses whatever the
//! machine's load, and counts their heap allocations:
//!
//! ```text
//! cargo build --release --example pasid_churn -p vsva-testbed
//! valgrind --tool=callgrind --toggle-collect='pasid_churn::churn' --cache-sim=yes \
//!     --D1=49152,12,64 --LL=2097152,16,64 target/release/examples/pasid_churn 99 200000
//! ```
//!
//! Arguments: `OCCUPANCY_PERCENT OPERATIONS` (0 to 99). One operation is the probe's: an
//! allocation of the first free PASID at or above a random one and the free of a PASID
//! held since an earlier operation at a random position (at 0 %, the free of the one just
//! allocated). The space is filled at random positions and settled first
//! (`PasidChurn::settle`, not counted), as `vsva bench` does; the churn checks after its
//! operations that the allocator holds exactly the PASIDs the workload holds.

use vsva_testbed::bench::{pasid::PasidChurn, Workload};

#[path = "common/counting.rs"]
mod counting;

/// The counted operations.
#[inline(never)]
fn churn(c: &mut PasidChurn, operations: u64) -> Result<(), Box<dyn std::error::Error>> {
    c.run(operations)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: pasid_churn OCCUPANCY_PERCENT OPERATIONS";
    let percent: u32 = args.first().ok_or(usage)?.parse()?;
    let operations: u64 = args.get(1).ok_or(usage)?.parse()?;
    if percent > 99 {
        return Err(usage.into());
    }
    let mut c = PasidChurn::new(f64::from(percent) / 100.0)?;
    c.settle()?;
    let before = counting::allocations();
    churn(&mut c, operations)?;
    let allocations = counting::allocations() - before;
    println!(
        "{operations} operations at {:.2} % occupancy ({} PASIDs held): {:.4} allocations each",
        c.occupancy() * 100.0,
        c.allocated(),
        allocations as f64 / operations.max(1) as f64
    );
    Ok(())
}
