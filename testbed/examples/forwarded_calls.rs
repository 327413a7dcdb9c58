//! Runs a fixed number of one forwarded operation of the `vsva bench` workloads, so that
//! callgrind counts its instructions whatever the machine's load, and counts its heap
//! allocations:
//!
//! ```text
//! cargo build --release --example forwarded_calls -p vsva-testbed
//! valgrind --tool=callgrind --toggle-collect='forwarded_calls::mprotect' \
//!     target/release/examples/forwarded_calls mprotect 200
//! ```
//!
//! Operations (each a function of this example to toggle on):
//! - `mprotect`: the guest process's `mprotect` of one bound page, whose notifier forwards
//!   two invalidations (the `forwarded-invalidation` probe);
//! - `bind`, `unbind`: the guest's `sva_bind` of a process and its `sva_unbind` (the
//!   `guest-bind` probe);
//! - `pages N` (N a power of two up to 512) and `pasid`: the host's
//!   `VFIO_IOMMU_CACHE_INVALIDATE` of N pages or of the whole PASID against populated
//!   caches (the `ioctl-invalidate` probe's workload, every call checked as the bench
//!   checks it; toggle on `*VtdDomain*cache_invalidate*`).
//!
//! Arguments: `OPERATION [N] CALLS`. Twenty untimed operations come first.

use std::sync::Arc;

use vsva_guest::process::{Process, Prot};
use vsva_hw::memory::PAGE_SIZE;
use vsva_testbed::bench::uapi::{CachedTranslations, HostInvalidations};
use vsva_testbed::bench::vm::BenchVm;
use vsva_testbed::bench::Workload;
use vsva_testbed::stack::GUEST_DEVICE_SID;
use vsva_vtd::addr::Pasid;
use vsva_vtd::flpte::FlPagingMode;

#[path = "common/counting.rs"]
mod counting;

#[inline(never)]
fn mprotect(vm: &BenchVm) -> Result<(), Box<dyn std::error::Error>> {
    vm.process()
        .mprotect(vm.buffer(), PAGE_SIZE, Prot::READ_WRITE)?;
    Ok(())
}

#[inline(never)]
fn bind(vm: &BenchVm, process: &Arc<Process>) -> Result<Pasid, Box<dyn std::error::Error>> {
    Ok(vm.vm().bind(process)?)
}

#[inline(never)]
fn unbind(vm: &BenchVm, pasid: Pasid) -> Result<(), Box<dyn std::error::Error>> {
    vm.vm().driver.sva_unbind(GUEST_DEVICE_SID, pasid)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: forwarded_calls mprotect|bind|unbind|pasid CALLS | pages N CALLS";
    let number = |i: usize| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(args.get(i).ok_or(usage)?.parse()?)
    };
    let vm = BenchVm::new()?;
    let (allocations, calls) = match args.first().map(String::as_str) {
        Some("mprotect") => {
            let calls = number(1)?;
            for _ in 0..20 {
                mprotect(&vm)?;
            }
            let before = counting::allocations();
            for _ in 0..calls {
                mprotect(&vm)?;
            }
            (counting::allocations() - before, calls)
        }
        Some(op @ ("bind" | "unbind")) => {
            let calls = number(1)?;
            let process = vm.vm().spawn(FlPagingMode::FourLevel)?;
            for _ in 0..20 {
                unbind(&vm, bind(&vm, &process)?)?;
            }
            let mut allocations = 0;
            for _ in 0..calls {
                let before = counting::allocations();
                let pasid = bind(&vm, &process)?;
                let bound = counting::allocations();
                unbind(&vm, pasid)?;
                let after = counting::allocations();
                allocations += if op == "bind" {
                    bound - before
                } else {
                    after - bound
                };
            }
            (allocations, calls)
        }
        Some(op @ ("pages" | "pasid")) => {
            let cached = CachedTranslations::new(&vm)?;
            let (mut calls_of, calls) = if op == "pasid" {
                (HostInvalidations::pasid(&cached)?, number(1)?)
            } else {
                (HostInvalidations::pages(&cached, number(1)?)?, number(2)?)
            };
            calls_of.run(20)?;
            let before = counting::allocations();
            calls_of.run(calls)?;
            (counting::allocations() - before, calls)
        }
        _ => return Err(usage.into()),
    };
    println!(
        "{calls} calls: {:.2} allocations each",
        allocations as f64 / calls.max(1) as f64
    );
    Ok(())
}
