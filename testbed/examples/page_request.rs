//! Runs a fixed number of the `page-request` probe's operations, so that callgrind counts
//! their instructions whatever the machine's load, and counts their heap allocations:
//!
//! ```text
//! cargo build --release --example page_request -p vsva-testbed
//! valgrind --tool=callgrind --toggle-collect='page_request::round_trip' \
//!     target/release/examples/page_request round-trip 200
//! ```
//!
//! Operations (each a function of this example to toggle on):
//! - `round-trip`: the device's fill of a page of the bound process that is reserved but
//!   not mapped, one page request up to the guest and its response down (the
//!   `page-request` probe's timed operation); between calls, not counted, the process
//!   unmaps the page and reserves it again;
//! - `resident`: the same fill of a resident page that the device TLB holds (its
//!   baseline).
//!
//! Arguments: `OPERATION CALLS`. Twenty uncounted operations come first. Every fill is
//! checked as the bench checks it, and the page requests sent and served are counted.

use vsva_guest::process::Prot;
use vsva_hw::memory::PAGE_SIZE;
use vsva_testbed::bench::vm::BenchVm;
use vsva_vtd::addr::Gva;

#[path = "common/counting.rs"]
mod counting;

#[inline(never)]
fn round_trip(vm: &BenchVm, page: Gva) -> Result<(), Box<dyn std::error::Error>> {
    Ok(vm.fill(page, PAGE_SIZE)?)
}

/// The page after the bench buffer's first, resident and in the device TLB.
#[inline(never)]
fn resident(vm: &BenchVm) -> Result<(), Box<dyn std::error::Error>> {
    Ok(vm.fill(Gva(vm.buffer().0 + PAGE_SIZE), PAGE_SIZE)?)
}

/// Unmaps the page (invalidating it all the way down) and reserves it again.
fn unmap(vm: &BenchVm, page: Gva) -> Result<(), Box<dyn std::error::Error>> {
    vm.process().munmap(page, PAGE_SIZE)?;
    vm.process()
        .mmap_fixed(page, PAGE_SIZE, Prot::READ_WRITE, false)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: page_request round-trip|resident CALLS";
    let calls: u64 = args.get(1).ok_or(usage)?.parse()?;
    let vm = BenchVm::new()?;
    let requests = |vm: &BenchVm| vm.vm().engine.stats().page_requests;
    let served = |vm: &BenchVm| vm.vm().driver.stats().page_requests_served;
    let (mut allocations, sent, answered) = (0, requests(&vm), served(&vm));
    let expected = match args.first().map(String::as_str) {
        Some("round-trip") => {
            let page = vm.process().mmap_lazy(PAGE_SIZE, Prot::READ_WRITE)?;
            for _ in 0..20 {
                round_trip(&vm, page)?;
                unmap(&vm, page)?;
            }
            for _ in 0..calls {
                let before = counting::allocations();
                round_trip(&vm, page)?;
                allocations += counting::allocations() - before;
                unmap(&vm, page)?;
            }
            20 + calls
        }
        Some("resident") => {
            for _ in 0..20 {
                resident(&vm)?;
            }
            let before = counting::allocations();
            for _ in 0..calls {
                resident(&vm)?;
            }
            allocations = counting::allocations() - before;
            0
        }
        _ => return Err(usage.into()),
    };
    let (sent, answered) = (requests(&vm) - sent, served(&vm) - answered);
    if (sent, answered) != (expected, expected) {
        return Err(format!(
            "{expected} page requests expected, {sent} sent and {answered} served"
        )
        .into());
    }
    println!(
        "{calls} calls: {:.2} allocations each, {sent} page requests sent and served",
        allocations as f64 / calls.max(1) as f64
    );
    Ok(())
}
