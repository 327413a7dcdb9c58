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
pub mod mem;
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

pub use addr::{DomainId, Gpa, Gva, Hpa, InvalidPasid, Iova, Pasid, SourceId};
pub use builder::{BuildError, FrameSource, MapFlags, Mapping, PageTableBuilder, TableFormat};
pub use context::ScalableContextEntry;
pub use fault::FaultReason;
pub use flpte::{FlFormat, FlPagingMode, FlPte, InvalidAddressWidth};
pub use inv_desc::{AddrRange, InvDesc, InvDescError, InvDescType};
pub use mem::{MemError, MemWindow, PhysMem};
pub use pasid::{PasidDirEntry, PasidEntry, PasidLookup, Pgtt};
pub use regs::{Cap, Ecap, FaultRecord, RegEffect, RegError, RegisterFile};
pub use request::{Remapped, RemappingUnit, Request, RootState, TranslationFault};
pub use root::{Capabilities, EntryFault, ScalableRootEntry};
pub use slpte::{SlFormat, SlLevels, SlPte};
pub use walk::{
    walk_first_level, walk_first_level_from, walk_first_level_via, walk_nested, walk_second_level,
    walk_second_level_from, AccessRequest, Direct, FlConfig, FlRights, FlStage, FlStart,
    NestedStage, PageSize, Permissions, SlConfig, SlStart, Stage, StepOutcome, Translation,
    WalkFault, WalkObserver, WalkRecord, WalkStep,
};
