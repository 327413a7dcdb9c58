//! A PASID-capable DMA engine: the idea of Intel DSA, simplified.
//!
//! Software submits 64-byte descriptors (memmove, fill, compare, drain, no-op), each naming
//! a PASID and device-visible addresses, through an MMIO portal; the engine does the DMA
//! through the IOMMU ([`DmaPort`]), optionally caching ATS translations in a device TLB
//! that honours invalidations, sends PRI page requests on recoverable faults and retries
//! after the response, and reports the outcome in a completion record written back by DMA.

pub mod descriptor;
pub mod devtlb;
pub mod engine;
pub mod port;
pub mod regs;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;

pub use descriptor::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DescriptorError, Opcode,
    Operation, RawDescriptor,
};
pub use devtlb::{DevTlb, OvertakenBy, OvertakenCompletion};
pub use engine::{DmaEngine, DmaStats};
pub use port::{
    AtsCapability, AtsCompletion, AtsEndpoint, DevTlbInvalidation, DmaAccess, DmaFault, DmaPort,
    DmaRun, DmaTranslation, PageRequestMessage, PcieCapabilities, PrgResponse,
};
pub use regs::{DmaEngineConfig, DmaError, SoftwareError};
