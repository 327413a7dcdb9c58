//! The VMM side of vsva: the guest-visible virtual VT-d (vIOMMU).
//!
//! [`VIommu`] is a scalable-mode VT-d remapping unit built on the shared VT-d core
//! (`vsva-vtd`): the guest programs it through its register page ([`VIommu::read`],
//! [`VIommu::write`]) and through root, context and PASID tables, an invalidation queue
//! and a page request queue in its own RAM, as Linux's intel-iommu driver does. It offers
//! first-level translation only (the guest's process page tables), and serves two kinds
//! of devices:
//! - passthrough devices ([`VIommu::attach_passthrough`]): the guest's PASID entries and
//!   invalidations are shadowed to the host ([`HostSva`]), which nests the guest's first
//!   level over the host's second level. The host is reached through either uAPI: the
//!   seed's VFIO type1 container (every [`UapiFile`](vsva_uapi::file::UapiFile) is a
//!   [`HostSva`]), or iommufd ([`IommufdDevice`]: nested HWPTs attached at PASIDs);
//! - emulated devices: the vIOMMU translates by itself ([`VIommu::translate`]), also as a
//!   vm-memory `Iommu` per address space ([`VIommu::address_space`]).
//!
//! Page requests the host reports are injected into the guest's page request queue
//! ([`VIommu::inject_host_page_request`]); the guest's page group responses go back down.
//! Unrecoverable faults the host reports are recorded in the guest's fault recording
//! registers ([`VIommu::inject_host_fault`]).
//!
//! [`VSmmu`] is the arm64 counterpart: a virtual SMMUv3 whose guest owns its
//! context descriptor tables; a guest STE translating with stage 1 becomes
//! `VFIO_IOMMU_ATTACH_PASID_TABLE` ([`HostPasidTable`]) for passthrough devices,
//! and emulated devices translate through it ([`VSmmu::translate`], also as a vm-memory
//! `Iommu` per address space: [`VSmmu::address_space`]).

mod caches;
mod config;
mod error;
mod fault;
mod host;
mod iommufd;
mod prq;
mod shadow;
mod space;
mod stats;
mod translate;
mod viommu;
mod vsmmu;

pub use config::{VIommuConfig, PASID_BITS};
pub use error::{HostCall, HostCallError, VIommuError};
pub use fault::HostFaultOutcome;
pub use host::{HostPasidTable, HostSva, PasidSource};
pub use iommufd::{GuestPasids, Iommufd, IommufdDevice, UserBuffer};
pub use prq::PageRequestOutcome;
pub use shadow::{bind_data, host_invalidations, refusal, Binding, Refusal};
pub use space::{IommuAddressSpace, SmmuAddressSpace};
pub use stats::VIommuStats;
pub use translate::GpaTranslation;
pub use viommu::{GuestRam, InterruptHandler, VIommu};
pub use vsmmu::{
    host_invalidation, HostConfig, PriOutcome, SmmuGpa, SmmuInterruptHandler, SmmuIommufd,
    SmmuIommufdDevice, VSmmu, VSmmuConfig, VSmmuError, VSmmuFault, VSmmuStats, Vevent,
};
