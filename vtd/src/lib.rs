//! The VT-d scalable-mode core of vsva.
//!
//! Everything here is shared by the two VT-d implementations of the project: the physical
//! IOMMU model (`vsva-hw`, tables in host memory) and the guest-visible vIOMMU (`vsva-vmm`,
//! tables in guest memory). Section numbers refer to the Intel VT-d specification, rev. 3.x.

pub mod addr;
pub mod builder;
pub mod context;
pub mod explain;
pub mod fault;
mod field;
pub mod flpte;
pub mod inv_desc;
pub mod invalidation;
pub mod pasid;
pub mod prq;
mod pte;
pub mod regs;
pub mod request;
pub mod root;
pub mod slpte;
#[cfg(test)]
mod testutil;
pub mod walk;
