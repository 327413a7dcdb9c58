//! Why a measurement could not be taken.

use vsva_hw::dma::DmaError;
use vsva_hw::memory::HostMemoryError;
use vsva_mem::MemError;
use vsva_vtd::regs::RegError;
use vsva_vtd::request::TranslationFault;
use vsva_vtd::{builder::BuildError, inv_desc::InvDescError};

/// A measurement failed: its set-up was refused, or a check of what it measures found the
/// model not doing what the measurement assumes (then no figure is reported for it).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Host memory set-up or frame allocation failed.
    #[error("host memory: {0}")]
    HostMemory(#[from] HostMemoryError),
    /// A table or data access to physical memory failed.
    #[error("memory access: {0}")]
    Memory(#[from] MemError),
    /// The page-table builder refused a mapping.
    #[error("page-table builder: {0}")]
    Build(#[from] BuildError),
    /// The physical IOMMU model refused its configuration.
    #[error("IOMMU model: {0}")]
    Iommu(#[from] vsva_hw::iommu::IommuConfigError),
    /// A register access of the IOMMU model was refused.
    #[error("IOMMU register: {0}")]
    Register(#[from] RegError),
    /// An invalidation descriptor did not encode or decode.
    #[error("invalidation descriptor: {0}")]
    Descriptor(#[from] InvDescError),
    /// A translation the measurement expects to succeed faulted.
    #[error("translation: {0}")]
    Translation(#[from] TranslationFault),
    /// The DMA engine refused a register or portal access.
    #[error("DMA engine: {0}")]
    Dma(#[from] DmaError),
    /// A host operation failed.
    #[error("host: {0}")]
    Host(#[from] vsva_host::error::HostError),
    /// Building or running the host/VMM/guest stack failed.
    #[error("stack: {0}")]
    Stack(#[from] crate::stack::StackError),
    /// The `vsva host` service could not start or listen.
    #[error("host service: {0}")]
    Service(#[from] vsva_service::server::ServiceError),
    /// A VM could not connect to or boot on the host service.
    #[error("VM on the host service: {0}")]
    RemoteVm(#[from] crate::remote::VmError),
    /// A guest process operation was refused.
    #[error("guest process: {0}")]
    Process(#[from] vsva_guest::process::ProcessError),
    /// A guest IOMMU driver operation failed.
    #[error("guest IOMMU driver: {0}")]
    GuestDriver(#[from] vsva_guest::iommu::GuestIommuError),
    /// The model did not behave as the measurement needs (for example a translation that
    /// should hit the IOTLB walked).
    #[error("check failed: {0}")]
    Check(String),
    /// Measurements of a run failed (each named, with its reason).
    #[error("measurements failed: {0}")]
    Failed(String),
    /// `--compare-quick`: the quick run's medians of these figures disagree with the full
    /// run's.
    #[error("the quick and full runs disagree on {0}")]
    Disagree(String),
    /// Drawing the SVG plot failed; the text is the plotting library's error.
    #[error("plot: {0}")]
    Plot(String),
    /// Writing the report failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
