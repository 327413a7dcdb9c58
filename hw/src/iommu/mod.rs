//! The physical VT-d IOMMU model (scalable mode).

pub mod iotlb;
