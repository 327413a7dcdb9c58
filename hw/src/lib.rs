//! The physical layer of vsva: host memory, the VT-d IOMMU model and DMA devices.

pub mod dma;
pub mod drain;
pub mod iommu;
pub mod memory;
pub mod smmuv3;
mod sync;
