//! The guest OS model of vsva.
//!
//! What a guest kernel contributes to shared virtual addressing: guest-physical frames,
//! processes whose page tables are real x86-64 tables in guest RAM, and a VT-d driver
//! modelled on Linux's intel-iommu in scalable mode that binds a process's address space
//! to a PASID of a device, keeps the IOMMU's caches coherent with the process's tables, and
//! serves the device's page requests; and, for arm64 guests, processes with AArch64 tables
//! and an arm-smmu-v3 driver ([`SmmuSva`](smmu::SmmuSva)) that binds them through context descriptors.

pub mod frames;
pub mod iommu;
pub mod process;
pub mod smmu;
