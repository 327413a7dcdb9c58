//! The virtual SMMUv3 (IHI 0070) of an arm64 VM.
//!
//! The guest programs it as Linux's arm-smmu-v3 driver programs hardware: through the
//! register page ([`VSmmu::read`], [`VSmmu::write`], the register state machine of
//! `vsva-smmuv3`) and through a stream table, a command queue, an event queue and a PRI
//! queue in its own RAM. It offers stage 1 only (IDR0.S1P; no stage 2, no EL2 contexts):
//! the guest owns the context descriptor tables and the AArch64 tables they point to.
//!
//! Passthrough devices ([`VSmmu::attach_passthrough`]) are shadowed to the host through
//! the VM's VFIO container ([`HostPasidTable`]), as the nested-stage series' QEMU
//! integration does:
//! - the guest's STE of a device, read when the guest invalidates it (CMD_CFGI_STE,
//!   CMD_CFGI_STE_RANGE, CMD_CFGI_ALL) or enables or disables the SMMU, becomes the
//!   host's configuration: an STE translating with stage 1 is
//!   `VFIO_IOMMU_ATTACH_PASID_TABLE` with its CD table (S1ContextPtr, S1CDMax, S1Fmt,
//!   S1DSS), an aborting or invalid STE (or SMMUEN clear with GBPA.ABORT) an attach that
//!   aborts, a bypassing STE (or SMMUEN clear without GBPA.ABORT)
//!   `VFIO_IOMMU_DETACH_PASID_TABLE` (stage 2 alone: guest physical addresses);
//! - CMD_TLBI_NH_*, CMD_TLBI_NSNH_ALL, CMD_CFGI_CD(_ALL) and CMD_ATC_INV become
//!   `VFIO_IOMMU_CACHE_INVALIDATE` with the series' SMMU semantics (arch id = ASID,
//!   PASID = SubstreamID) for the devices whose CD table is attached;
//! - CMD_PRI_RESP becomes a page response to the host device;
//! - a host stall of a stall-capable device (a page request whose group id is the host's
//!   STAG) is a stall event in the guest's event queue under a vSTAG of the vSMMU's own,
//!   and the guest's CMD_RESUME or CMD_STALL_TERM naming it becomes the page response
//!   that resumes or aborts the host's transaction (`stall.rs`);
//! - CMD_SYNC completes (CMDQ_CONS passes it, its MSI is written) once every host call of
//!   the commands before it has returned: commands are carried out in order, each host
//!   call before the next command;
//! - faults and page requests the host reports are written to the guest's event and PRI
//!   queues ([`VSmmu::inject_host_fault`], [`VSmmu::inject_page_request`]).
//!
//! Or they are attached on the VM's iommufd ([`VSmmu::attach_iommufd`], [`SmmuIommufd`]):
//! - the guest's STE of a device becomes a nested HWPT under the VM's vIOMMU carrying STE
//!   words 0 and 1 (abort: V = 0; bypass: Config bypass), attached to the device;
//! - CMD_TLBI_NH_*, CMD_TLBI_NSNH_ALL, CMD_CFGI_CD(_ALL) and CMD_ATC_INV (and CMD_CFGI_ALL
//!   as CMD_CFGI_CD_ALL per device) are gathered up to the next CMD_SYNC, STE
//!   invalidation or page response and sent as one `IOMMU_HWPT_INVALIDATE` array per
//!   vIOMMU; CMDQ_CONS passes them once the host returned, and the first command the
//!   host refused stops the queue with CERROR_ILL there;
//! - events from the vIOMMU's vEVENT queue are written to the guest's event queue
//!   ([`VSmmu::inject_vevent`]), a loss the queue reports as the event queue's overflow
//!   ([`VSmmu::inject_vevents_lost`]); page requests from the vIOMMU's fault queue go to
//!   the guest's PRI queue ([`VSmmu::inject_page_request`]) and its CMD_PRI_RESP back to
//!   the fault queue with the group's cookie; stalls of a stall-capable device, which
//!   come from the fault queue too, take the same vSTAG path as over a container
//!   (`stall.rs`) and its CMD_RESUME goes back with the group's cookie.
//!
//! Emulated devices are translated by the vSMMU itself, through the guest's STE, CD and
//! stage-1 tables, with faults recorded in the guest's event queue; each of their address
//! spaces is a vm-memory `Iommu` whose IOTLB only the guest's invalidation commands empty
//! (`space.rs`).
//!
//! A hostile guest gets what hardware would give it: an illegal command stops the queue
//! with CERROR_ILL (CERROR_ABT when it cannot be read) and GERROR.CMDQ_ERR; an STE that is
//! ILLEGAL, out of the stream table or unreadable is recorded as C_BAD_STE,
//! C_BAD_STREAMID or F_STE_FETCH, at the invalidation that makes the vSMMU read it, and
//! the device's transactions abort. No host call carries a field that was not decoded and
//! checked by the spec's rules first.

mod cmdq;
mod fault;
mod iommufd;
mod space;
mod stall;
mod stream;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vsva_smmuv3::regs::{cr0, irq_ctrl, offset};
use vsva_smmuv3::{
    features::Features, features::StallModel, regs::Irq, regs::Msi, regs::RegEffect,
    regs::RegError, regs::RegisterFile,
};
use vsva_uapi::error::Errno;
use vsva_vtd::addr::SourceId;

use crate::error::{HostCall, HostCallError};
use crate::host::HostPasidTable;
use crate::space::Spaces;
use crate::viommu::{lock, GuestRam};

pub use cmdq::host_invalidation;
pub use fault::PriOutcome;
pub use iommufd::{SmmuIommufd, SmmuIommufdDevice, Vevent};
pub use space::{SmmuGpa, VSmmuFault};
pub use stream::HostConfig;

/// Receives the vSMMU's interrupts (GERROR, event queue, PRI queue) with the MSI the guest
/// programmed for each: the VMM's MSI delivery into the guest.
pub type SmmuInterruptHandler = Arc<dyn Fn(Irq, Msi) + Send + Sync>;

/// How many failed host calls are kept for [`VSmmu::take_host_errors`].
const HOST_ERRORS_KEPT: usize = 256;

/// What the vSMMU advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VSmmuConfig {
    /// The ID registers' features. Stage 2, EL2 contexts, range invalidations and forced
    /// stalls are never offered (`new` refuses them); STALL_MODEL 0b00 offers stalls
    /// to the passthrough devices declared stall-capable ([`VSmmu::set_stall_capable`]).
    pub features: Features,
    /// log2 of the largest command, event and PRI queues (IDR1).
    pub queue_log2: [u8; 3],
}

impl Default for VSmmuConfig {
    /// Stage 1 with 2-level CD tables, 16-bit ASIDs, ATS and PRI, hardware access and
    /// dirty updates, 20-bit SubstreamIDs, 16-bit StreamIDs, a 48-bit IPA space (the host's
    /// stage-2 input size) and the three granules; queues of up to 2^8 entries.
    fn default() -> Self {
        VSmmuConfig {
            // The vsva SMMU's own features without stage 2: the guest sees one stage.
            features: Features {
                s2p: false,
                vmid16: false,
                ..Features::VSVA
            },
            queue_log2: [8, 8, 8],
        }
    }
}

/// A refused vSMMU operation; it changed nothing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VSmmuError {
    /// A register access the register file refuses (width, alignment, range).
    #[error(transparent)]
    Register(#[from] RegError),
    /// Features a vSMMU does not offer.
    #[error("the vSMMU cannot offer {0}")]
    Unsupported(&'static str),
    /// A device with this StreamID is already attached.
    #[error("StreamID {0:#x} is already attached to the vSMMU")]
    AlreadyAttached(u32),
    /// A StreamID beyond IDR1.SIDSIZE.
    #[error("StreamID {0:#x} is beyond the vSMMU's StreamID size")]
    BadStreamId(u32),
    /// A second device with the same host source id.
    #[error("host device {0} is already attached to the vSMMU")]
    HostDeviceAttached(SourceId),
    /// No passthrough device with this host source id.
    #[error("no passthrough device {0} is attached to the vSMMU")]
    NotAttached(SourceId),
    /// No passthrough device with this StreamID.
    #[error("no passthrough device has StreamID {0:#x}")]
    NoStream(u32),
    /// A vEVENT record the guest cannot be shown.
    #[error("vEVENT not injected: {0}")]
    Vevent(&'static str),
    /// A host report the guest cannot be shown.
    #[error("report of host device {sid} not injected: {why}")]
    HostReport {
        /// The host device.
        sid: SourceId,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Counters of the vSMMU's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VSmmuStats {
    /// Commands carried out.
    pub commands: u64,
    /// Commands refused (CERROR_ILL, CERROR_ABT).
    pub command_errors: u64,
    /// Host calls made.
    pub host_calls: u64,
    /// Host calls that failed.
    pub host_errors: u64,
    /// Cache invalidations forwarded to the host (`VFIO_IOMMU_CACHE_INVALIDATE`).
    pub invalidations: u64,
    /// Translating CD tables attached on the host (`VFIO_IOMMU_ATTACH_PASID_TABLE`).
    pub table_attaches: u64,
    /// Events written to the guest's event queue.
    pub events: u64,
    /// Events lost (queue disabled, full or unwritable).
    pub events_lost: u64,
    /// Losses the host's vEVENT queue reported (each shown as an event queue overflow).
    pub vevents_lost: u64,
    /// Page requests written to the guest's PRI queue.
    pub page_requests: u64,
    /// Page requests not queued (answered by the vSMMU where an answer was due).
    pub page_requests_dropped: u64,
    /// Host stalls written to the guest's event queue with Stall = 1.
    pub stalls: u64,
    /// Host stalls ended with an Abort response: by the vSMMU (not shown as a stall) or
    /// by the guest's CMD_STALL_TERM, a configuration change or a detach.
    pub stalls_aborted: u64,
}

/// The guest-visible SMMUv3 of one VM.
pub struct VSmmu {
    mem: GuestRam,
    config: VSmmuConfig,
    regs: Mutex<RegisterFile>,
    streams: Mutex<Vec<stream::Stream>>,
    /// Serialises command consumption and stream reconfiguration: the host calls of one
    /// command return before the next command starts.
    cmdq: Mutex<()>,
    irq_handler: RwLock<Option<SmmuInterruptHandler>>,
    stats: Mutex<VSmmuStats>,
    host_errors: Mutex<Vec<HostCallError>>,
    /// The host stalls shown to the guest, by vSTAG.
    stalls: Mutex<stall::StallTags>,
    /// The vm-memory address spaces of emulated devices.
    spaces: Spaces<space::SmmuScope>,
}

impl fmt::Debug for VSmmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VSmmu")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl VSmmu {
    /// A vSMMU over guest RAM `mem` in its reset state (everything disabled, GBPA
    /// aborting). Refused: features with stage 2, EL2 contexts, range invalidations or
    /// forced stalls (STALL_MODEL 0b10), which the vSMMU does not implement.
    pub fn new(mem: GuestRam, config: VSmmuConfig) -> Result<Arc<Self>, VSmmuError> {
        let f = &config.features;
        if f.s2p || f.hyp {
            return Err(VSmmuError::Unsupported("stage 2 or EL2 contexts"));
        }
        if !f.s1p {
            return Err(VSmmuError::Unsupported("an SMMU without stage 1"));
        }
        if f.ril {
            return Err(VSmmuError::Unsupported("range invalidations"));
        }
        if f.stall_model == StallModel::ForceStall {
            return Err(VSmmuError::Unsupported("forced stalls"));
        }
        Ok(Arc::new(VSmmu {
            mem,
            config,
            regs: Mutex::new(RegisterFile::new(config.features, config.queue_log2)),
            streams: Mutex::default(),
            cmdq: Mutex::new(()),
            irq_handler: RwLock::new(None),
            stats: Mutex::default(),
            host_errors: Mutex::default(),
            stalls: Mutex::default(),
            spaces: Spaces::default(),
        }))
    }

    /// What the vSMMU advertises.
    pub fn config(&self) -> &VSmmuConfig {
        &self.config
    }

    /// Size of the register space (two 64 KiB pages).
    pub fn mmio_size(&self) -> u64 {
        offset::LIMIT
    }

    /// Registers the receiver of the vSMMU's interrupts.
    pub fn set_interrupt_handler(&self, handler: SmmuInterruptHandler) {
        *self
            .irq_handler
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// A guest read of `size` bytes (4 or 8) at `offset` of the register space.
    pub fn read(&self, offset: u64, size: usize) -> Result<u64, VSmmuError> {
        Ok(lock(&self.regs).read(offset, size)?)
    }

    /// A guest write of `size` bytes (4 or 8) at `offset`, with what it sets in motion (the
    /// commands it produced, the streams' new configuration) done before it returns.
    pub fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), VSmmuError> {
        let _serial = lock(&self.cmdq);
        let effect = lock(&self.regs).write(offset, size, value)?;
        let mut irqs = Vec::new();
        match effect {
            RegEffect::CmdqProd => self.consume_commands(&mut irqs),
            RegEffect::Cr0 { old, new } => {
                if (old ^ new) & cr0::SMMUEN != 0 {
                    self.spaces.invalidate(space::SmmuScope::All);
                    self.resync_streams(|_| true, None);
                }
                if old & cr0::CMDQEN == 0 && new & cr0::CMDQEN != 0 {
                    self.consume_commands(&mut irqs);
                }
            }
            // GBPA decides what the streams do while SMMUEN is clear.
            RegEffect::Config if offset == offset::GBPA => {
                self.spaces.invalidate(space::SmmuScope::All);
                self.resync_streams(|_| true, None)
            }
            // Acknowledging CMDQ_ERR resumes the commands already produced.
            _ if offset == offset::GERRORN => self.consume_commands(&mut irqs),
            _ => {}
        }
        self.deliver(irqs);
        Ok(())
    }

    /// The interrupts of `irqs` the guest enabled in IRQ_CTRL, to the handler.
    fn deliver(&self, irqs: Vec<Irq>) {
        if irqs.is_empty() {
            return;
        }
        let msis: Vec<(Irq, Msi)> = {
            let regs = lock(&self.regs);
            let enabled = regs.read(offset::IRQ_CTRL, 4).unwrap_or(0) as u32;
            irqs.into_iter()
                .filter(|&irq| {
                    let bit = match irq {
                        Irq::Gerror => irq_ctrl::GERROR_IRQEN,
                        Irq::Eventq => irq_ctrl::EVENTQ_IRQEN,
                        Irq::Priq => irq_ctrl::PRIQ_IRQEN,
                    };
                    enabled & bit != 0
                })
                .map(|irq| (irq, regs.msi(irq)))
                .collect()
        };
        let handler = self
            .irq_handler
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(h) = handler {
            msis.into_iter().for_each(|(irq, msi)| h(irq, msi));
        }
    }

    /// Counters of the vSMMU's work.
    pub fn stats(&self) -> VSmmuStats {
        *lock(&self.stats)
    }

    fn count(&self, f: impl FnOnce(&mut VSmmuStats)) {
        f(&mut lock(&self.stats));
    }

    /// The most recent host calls that failed (up to 256), oldest first; empties the list.
    pub fn take_host_errors(&self) -> Vec<HostCallError> {
        std::mem::take(&mut lock(&self.host_errors))
    }

    /// Makes a host call; a failure is counted and kept. Whether it succeeded.
    fn host_call(&self, result: Result<(), Errno>, call: impl FnOnce() -> HostCall) -> bool {
        self.count(|s| s.host_calls += 1);
        let Err(error) = result else {
            return true;
        };
        let e = HostCallError {
            call: call(),
            error,
        };
        tracing::warn!("vSMMU: {e}");
        self.count(|s| s.host_errors += 1);
        let mut kept = lock(&self.host_errors);
        if kept.len() == HOST_ERRORS_KEPT {
            kept.remove(0);
        }
        kept.push(e);
        false
    }
}

/// A host source of the streams' host calls.
pub(crate) type Host = Arc<dyn HostPasidTable>;

/// Where a passthrough stream's host calls go.
#[derive(Clone)]
pub(crate) enum StreamHost {
    /// The VM's VFIO type1 container (the nested-stage series' ioctls).
    Container(Host),
    /// The device on the VM's iommufd (nested HWPTs under a vIOMMU).
    Iommufd(Arc<SmmuIommufdDevice>),
}
