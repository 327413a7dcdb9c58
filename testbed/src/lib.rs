//! vsva's test bed: what sits on top of the library crates to exercise them whole.
//!
//! The library crates (`vsva-vtd`, `vsva-vtd-driver`, `vsva-smmuv3`, `vsva-hw`,
//! `vsva-uapi`, `vsva-host`, `vsva-vmm`, `vsva-guest`) hold only what a host or a VMM would
//! embed. Everything that assembles them into a whole system, drives it and measures it
//! lives here, and the `vsva` command is a thin front end over it.
//!
//! - [`stack`]: a host (memory, physical IOMMU, driver, PASID allocator) and VMs (RAM,
//!   container, passthrough device, vIOMMU, guest) assembled the way a real system is.
//! - [`demo`]: the end-to-end demo `vsva demo` runs, every claim computed from a check.
//! - [`dma_io`]: an emulated device's reads and writes through a vm-memory IOMMU address
//!   space.
//! - [`scenario`]: the single-behaviour scenarios of `vsva run`.
//! - [`scale`]: the PASID space full of VMs, thousands of bound PASIDs, timed and checked
//!   for leaks.
//! - [`migrate`]: `vsva run migrate-dirty`, a live migration's dirty-page rounds over
//!   the domain's second-level dirty bits.
//! - [`remote`]: one VM against a `vsva host` process, as `vsva vm` runs it, and the
//!   bind → DMA → verify → invalidate → unbind loop.
//! - [`holdings`]: what the host holds (memory, cache entries, domain ids, PASIDs), to
//!   prove a teardown left nothing behind.
//! - [`bench`](mod@bench): the workloads of `vsva bench` and the criterion benchmarks, each with a
//!   same-run baseline and a check that the work was done.

pub mod bench;
pub mod demo;
pub mod dma_io;
pub mod holdings;
pub mod migrate;
pub mod remote;
pub mod scale;
pub mod scenario;
pub mod smmu_demo;
pub mod stack;
