//! The Arm SMMUv3 core of vsva: the formats and walkers a physical SMMUv3 model and a
//! virtual SMMUv3 share.
//!
//! Section numbers refer to the Arm System Memory Management Unit Architecture
//! Specification, SMMU architecture version 3 (IHI 0070), and, for translation tables, to
//! the Arm Architecture Reference Manual for A-profile (DDI 0487), chapter D8 (VMSAv8-64).
//! Tables are read through `vsva_vtd`'s [`PhysMem`], the memory trait every vsva IOMMU
//! model uses.

pub mod builder;
pub mod cd;
pub mod cmd;
pub mod desc;
pub mod event;
pub mod features;
mod field;
pub mod lookup;
pub mod priq;
pub mod regs;
pub mod ste;
#[cfg(test)]
mod testutil;
pub mod walk;

pub use builder::{BuildError, Mapping, TableBuilder};
pub use cd::{BadCd, ContextDescriptor, L1Cd};
pub use cmd::{Cmd, CmdError, PriResp, ResumeAction, SyncCs, TlbiAddr};
pub use desc::{Descriptor, DescriptorKind};
pub use event::{Event, EventType, UnknownEvent};
pub use features::{Features, Httu, StallModel};
pub use lookup::{find_cd, BadSplit, ConfigFault, L1Std, Stage1Context, StreamTable};
pub use priq::PriqEntry;
pub use regs::{Queue, RegEffect, RegError, RegisterFile};
pub use ste::{BadSte, Config, Eats, Granule, S1Dss, S1Fmt, Ste, Strw};
pub use vsva_vtd::{MemError, PhysMem};
pub use walk::{
    walk_nested, walk_stage1, walk_stage1_from, walk_stage1_via, walk_stage2, walk_stage2_from,
    AccessRequest, AddressSize, Direct, FaultClass, FaultKind, FaultStage, NestedStage, PageSize,
    Permissions, S1Config, S1Flags, S1Stage, S1Start, S2Config, S2Flags, S2Start, Stage,
    StepOutcome, TableConfigError, TableControls, Translation, WalkFault, WalkObserver, WalkRecord,
    WalkStep,
};
