//! Why a measurement could not be taken.

use vsva_hw::dma::DmaError;
use vsva_hw::iommu::TranslationFault;
use vsva_hw::HostMemoryError;
use vsva_vtd::regs::RegError;
use vsva_vtd::{BuildError, InvDescError, MemError};

/// A measurement failed: its set-up was refused, or a check of what it measures found the
/// model not doing what the measurement assumes (then no figure is reported for it).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("host memory: {0}")]
    HostMemory(#[from] HostMemoryError),
    #[error("memory access: {0}")]
    Memory(#[from] MemError),
    #[error("page-table builder: {0}")]
    Build(#[from] BuildError),
    #[error("IOMMU model: {0}")]
    Iommu(#[from] vsva_hw::iommu::IommuConfigError),
    #[error("IOMMU register: {0}")]
    Register(#[from] RegError),
    #[error("invalidation descriptor: {0}")]
    Descriptor(#[from] InvDescError),
    #[error("translation: {0}")]
    Translation(#[from] TranslationFault),
    #[error("DMA engine: {0}")]
    Dma(#[from] DmaError),
    #[error("host: {0}")]
    Host(#[from] vsva_host::HostError),
    #[error("stack: {0}")]
    Stack(#[from] crate::stack::StackError),
    #[error("guest process: {0}")]
    Process(#[from] vsva_guest::ProcessError),
    #[error("guest IOMMU driver: {0}")]
    GuestDriver(#[from] vsva_guest::DriverError),
    /// The model did not behave as the measurement needs (for example a translation that
    /// should hit the IOTLB walked).
    #[error("check failed: {0}")]
    Check(String),
    #[error("plot: {0}")]
    Plot(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
