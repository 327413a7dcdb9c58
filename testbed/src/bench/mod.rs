//! `vsva bench` and the criterion benchmarks: vsva's hot paths measured against baselines
//! taken in the same run (issue 6).
//!
//! - [`platform`]: a VT-d model programmed through its registers, with a guest address
//!   space reached by nested translation; [`vm`]: the whole stack, a VM with a bound guest
//!   process.
//! - Workloads ([`Workload`]): [`translate`] (IOTLB hits, cold walks), [`dma`] (DMA engine
//!   memmove, streaming reads per miss), [`pasid`] (allocator churn) and their baselines
//!   ([`loads`], hash map, the CPU's copy); on the whole stack, [`uapi`] (the host's
//!   ioctl path, bound-PASID memory) and [`forward`] (the guest's forwarded path);
//!   [`socket`] (the forwarded path with the host served over a UNIX socket);
//!   [`dirty`] (the dirty-bitmap harvest of a 1 GiB domain against reading its words).
//! - [`suite`]: the probes `vsva bench` runs; [`report`]: the table and JSON object;
//!   [`steal`]: the hypervisor's steal time over each probe;
//!   [`plot`]: the SVG; [`compare`]: a quick run held to a full one; [`cli`]: the
//!   command.

pub mod cli;
pub mod compare;
pub mod dirty;
pub mod dma;
mod error;
pub mod figures;
pub mod forward;
pub mod iommufd;
pub mod loads;
mod lockstep;
pub mod measure;
pub mod pasid;
mod pin;
pub mod platform;
pub mod plot;
pub mod report;
pub mod socket;
pub mod steal;
pub mod suite;
pub mod translate;
pub mod uapi;
pub mod vm;

pub use cli::{run_cli, BenchArgs};
pub use error::BenchError;
pub use figures::{Figure, Goal, GOALS};
pub use measure::{measure, measure_pair, SampleBudget, Samples, Spread, Workload};
pub use report::BenchReport;
pub use suite::{run, run_probes, standard_probes, BenchOptions, Probe};
