//! The iommufd uAPI on the host's SMMUv3: what `drivers/iommu/iommufd/` (`viommu.c`,
//! `hw_pagetable.c`) and `arm-smmu-v3-iommufd.c` do for a VMM whose vSMMU nests the
//! guest's stream table entries over a stage 2 the host owns.
//!
//! The objects, by id in the file's own id space:
//! - IOAS: an IOVA (here, IPA) space the VMM maps its memory into ([`Iopt`](super::iopt::Iopt));
//! - paging HWPT: a stage-2 [`SmmuDomain`] (a VMID, a stage-2 table) holding its IOAS's
//!   mappings; with `IOMMU_HWPT_ALLOC_NEST_PARENT` a vIOMMU may be built on it; with
//!   `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` a stage-1 domain instead (its own CD table with HA
//!   and HD), whose dirty pages `IOMMU_HWPT_GET_DIRTY_BITMAP` reads, as Linux v6.13's
//!   arm-smmu-v3 gives dirty tracking to stage-1 domains only (with NEST_PARENT:
//!   EOPNOTSUPP);
//! - vIOMMU (`IOMMU_VIOMMU_TYPE_ARM_SMMUV3`): the VM's slice of the SMMU, tagged with the
//!   nest parent's VMID, through which guest commands are invalidated;
//! - vDEVICE: a device's virtual StreamID (vSID) in a vIOMMU;
//! - nested HWPT (`IOMMU_HWPT_DATA_ARM_SMMUV3`): the guest's STE words 0 and 1 (Config
//!   abort, bypass or stage-1 translate, S1ContextPtr as an IPA, S1CDMax, S1Fmt, S1DSS,
//!   cache attributes, EATS); attaching it writes the physical STE: stage 2 from the
//!   parent, stage 1 from the guest's CD table walked through stage 2;
//! - device: bound through its VFIO cdev ([`super::device::VfioDeviceFile`]);
//! - vEVENT queue (`IOMMU_VEVENTQ_TYPE_ARM_SMMUV3`): the file a vIOMMU's events go to,
//!   each SMMU event record of a stream attached to a nested HWPT of the vIOMMU with a
//!   vDEVICE (other than stage-2 faults and stalls), its StreamID replaced by the vSID;
//! - fault queue (`IOMMU_FAULT_QUEUE_ALLOC`, [`FaultFile`]): a nested HWPT allocated with
//!   `IOMMU_HWPT_FAULT_ID_VALID` sends the page requests (PRI queue) and stalled
//!   transactions (event queue, the STAG as group id) of the streams attached to it
//!   there, whatever their SubstreamID; the VMM's response goes down as CMD_PRI_RESP or
//!   CMD_RESUME ([`SmmuHost`]'s `page_response`). A stream leaving the HWPT has its
//!   unanswered groups answered Invalid (Deny, or Abort for a stall).
//!
//! The core ([`super::IommufdCtx`]) holds the objects, IOASes, paging HWPTs and devices;
//! this is its SMMUv3 configuration ([`Smmu`]). `IOMMU_DESTROY` of a referenced object
//! is EBUSY; every ioctl checks before its first change, so a refused one changes
//! nothing. The IOAS ioctls are the core's (IOAS_COPY, IOAS_IOVA_RANGES and
//! IOAS_ALLOW_IOVAS and IOAS_MAP_FILE as on VT-d, IPAs from `1 << IPA_BITS` reserved by
//! each stage 2), and so are IOMMU_FAULT_QUEUE_ALLOC, IOMMU_HWPT_SET_DIRTY_TRACKING and
//! IOMMU_HWPT_GET_DIRTY_BITMAP.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use vsva_hw::memory::{FrameAllocator, HostMemory};
use vsva_smmuv3::regs::offset;
use vsva_smmuv3::{cmd::Cmd, features::Features, ste::Config, ste::Ste};
use vsva_uapi::error::Errno;
use vsva_uapi::iommufd::*;
use vsva_uapi::request::{PageRequest, PageResponse};
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_vtd::{addr::Iova, addr::SourceId};

use super::ctx::{
    self, Device, File, HwInfo, HwptPaging, IoctlOp, IommuOps, IommufdCtx, PagingDomain,
};
use super::device::{Iommufds, OpenDevices};
use super::fault::{FaultFile, PageResponder};
use super::user::{for_each_user_entry, UserArray};
use super::vevent::VeventqFile;
use super::IommufdError;
use crate::container::IommuBackend;
use crate::driver::DirtyBitmap;
use crate::smmu::{SmmuDomain, SmmuHost, VeventSink, IPA_BITS};

type Object = ctx::Object<Smmu>;

/// The SMMUv3 configuration of the iommufd core: the host's SMMU.
#[derive(Debug)]
pub struct Smmu {
    smmu: Arc<SmmuHost>,
    /// The fault queue each stream's page requests go to, by StreamID.
    faults: Mutex<BTreeMap<u32, Arc<FaultFile>>>,
}

impl Smmu {
    fn faults(&self) -> MutexGuard<'_, BTreeMap<u32, Arc<FaultFile>>> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// CMD_PRI_RESP or CMD_RESUME, as `SmmuHost::page_response` chooses.
impl PageResponder for SmmuHost {
    fn page_response(
        &self,
        sid: SourceId,
        request: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), Errno> {
        SmmuHost::page_response(self, u32::from(sid.rid()), request, response)
            .map_err(|e| Errno::new(-e.errno()))
    }
}

/// One open `/dev/iommu` on an SMMU: its objects.
pub type SmmuCtx = IommufdCtx<Smmu>;

/// One open `/dev/iommu` on an SMMU.
pub type SmmuIommufdFile = File<Smmu>;

impl File<Smmu> {
    /// Opens `/dev/iommu` on the SMMU `smmu`, outside any fd table (it cannot hand out
    /// vEVENT queue fds: `IOMMU_VEVENTQ_ALLOC` is EMFILE).
    pub fn open(smmu: &Arc<SmmuHost>) -> Arc<Self> {
        Self::open_in(smmu, Weak::new())
    }

    /// Opens `/dev/iommu` on the SMMU `smmu` in the fd table `fds`.
    pub(crate) fn open_in(smmu: &Arc<SmmuHost>, fds: Weak<Iommufds>) -> Arc<Self> {
        File::new(
            Smmu {
                smmu: smmu.clone(),
                faults: Mutex::default(),
            },
            fds,
        )
    }
}

/// A vIOMMU: the VM's slice of the SMMU over a nest parent (`struct arm_vsmmu`).
#[derive(Debug)]
pub struct Viommu {
    parent: u32,
    events: Arc<ViommuEvents>,
}

/// Where a vIOMMU's events go: its vEVENT queue, when it has one.
#[derive(Debug, Default)]
struct ViommuEvents {
    queue: Mutex<Option<Arc<VeventqFile>>>,
}

impl ViommuEvents {
    fn set(&self, queue: Option<Arc<VeventqFile>>) {
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) = queue;
    }
}

impl VeventSink for ViommuEvents {
    /// `iommufd_viommu_report_event`: into the vEVENT queue, or nowhere without one.
    fn report(&self, record: [u64; 4]) {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(q) = queue.as_ref() {
            q.report(&IommuVeventArmSmmuv3 { evt: record }.to_bytes());
        }
    }
}

/// A vDEVICE: `dev`'s virtual StreamID in `viommu`.
#[derive(Debug)]
pub struct Vdevice {
    viommu: u32,
    dev: u32,
    virt_id: u64,
}

/// A nested HWPT: the guest's STE words 0 and 1 (checked, EATS cleared), whether the
/// guest asked for ATS (`struct arm_smmu_nested_domain`), and the fault queue (object id
/// and file) its streams' page requests go to.
#[derive(Debug)]
pub struct HwptNested {
    viommu: u32,
    vste: [u64; 2],
    ats: bool,
    fault: Option<(u32, Arc<FaultFile>)>,
}

/// The SMMU's own objects.
#[derive(Debug)]
pub enum Vobj {
    /// A vIOMMU.
    Viommu(Viommu),
    /// A vDEVICE.
    Vdevice(Vdevice),
    /// A vEVENT queue of a vIOMMU.
    Veventq {
        /// The vIOMMU.
        viommu: u32,
    },
}

/// What a file holds, for diagnostics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmmuObjectState {
    /// An IOAS and its areas (IOVA, length, host address).
    Ioas(Vec<(u64, u64, u64)>),
    /// A paging HWPT: its IOAS, whether it is a nest parent, its VMID.
    HwptPaging {
        /// The IOAS it maps.
        ioas: u32,
        /// `IOMMU_HWPT_ALLOC_NEST_PARENT`.
        nest_parent: bool,
        /// The VMID of its stage 2.
        vmid: u16,
    },
    /// A nested HWPT: its vIOMMU and the guest's STE words.
    HwptNested {
        /// The vIOMMU.
        viommu: u32,
        /// STE words 0 and 1 as accepted.
        vste: [u64; 2],
    },
    /// A vIOMMU and its nest parent.
    Viommu {
        /// The nest-parent HWPT.
        parent: u32,
    },
    /// A vDEVICE.
    Vdevice {
        /// Its vIOMMU.
        viommu: u32,
        /// Its device.
        dev: u32,
        /// The virtual StreamID.
        virt_id: u64,
    },
    /// A vEVENT queue of a vIOMMU.
    Veventq {
        /// The vIOMMU.
        viommu: u32,
    },
    /// A fault queue.
    Fault,
    /// A device and the HWPT of its STE.
    Device {
        /// Its StreamID.
        sid: u32,
        /// The HWPT it is attached to.
        hwpt: Option<u32>,
    },
}

fn no_object(id: u32, want: &'static str) -> IommufdError {
    IommufdError::NoObject { id, want }
}

// STE fields a VM may set (IHI 0070 §5.2; `STRTAB_STE_*_NESTING_ALLOWED`).
const STE0_V: u64 = 1;
const STE0_CFG: u64 = 0b111 << 1;
const STE0_S1FMT: u64 = 0b11 << 4;
const STE0_S1CONTEXTPTR: u64 = ((1 << 52) - 1) & !((1 << 6) - 1);
const STE0_S1CDMAX: u64 = 0b1_1111 << 59;
const STE1_S1DSS: u64 = 0b11;
const STE1_S1CIR: u64 = 0b11 << 2;
const STE1_S1COR: u64 = 0b11 << 4;
const STE1_S1CSH: u64 = 0b11 << 6;
const STE1_S1STALLD: u64 = 1 << 27;
const STE1_EATS_SHIFT: u32 = 28;
const STE1_EATS: u64 = 0b11 << STE1_EATS_SHIFT;
const STE0_ALLOWED: u64 = STE0_V | STE0_CFG | STE0_S1FMT | STE0_S1CONTEXTPTR | STE0_S1CDMAX;
const STE1_ALLOWED: u64 =
    STE1_S1DSS | STE1_S1CIR | STE1_S1COR | STE1_S1CSH | STE1_S1STALLD | STE1_EATS;

/// The guest STE's Config (abort for an STE with V clear).
fn vste_config(vste: &[u64; 2]) -> Option<Config> {
    if vste[0] & STE0_V == 0 {
        return Some(Config::Abort);
    }
    Config::from_bits((vste[0] & STE0_CFG) >> 1)
}

/// Checks the guest's STE words as `arm_smmu_validate_vste` does: an STE with V clear
/// becomes all zero (abort); otherwise only the allowed fields may be set, Config must be
/// abort, bypass or stage-1 translate and EATS abort or full (each `-EIO`). Returns the
/// words with EATS cleared and whether a translating STE asked for ATS.
fn validate_vste(mut vste: [u64; 2]) -> Result<([u64; 2], bool), IommufdError> {
    const WHAT: &str = "iommu_hwpt_arm_smmuv3";
    if vste[0] & STE0_V == 0 {
        return Ok(([0; 2], false));
    }
    if vste[0] & !STE0_ALLOWED != 0 || vste[1] & !STE1_ALLOWED != 0 {
        return Err(IommufdError::io(WHAT, "a field a VM may not set"));
    }
    let cfg = vste_config(&vste);
    if !matches!(cfg, Some(Config::Abort | Config::Bypass | Config::S1Trans)) {
        return Err(IommufdError::io(WHAT, "Config"));
    }
    let eats = (vste[1] & STE1_EATS) >> STE1_EATS_SHIFT;
    vste[1] &= !STE1_EATS;
    if eats > 1 {
        return Err(IommufdError::io(WHAT, "EATS other than abort or full"));
    }
    Ok((vste, cfg == Some(Config::S1Trans) && eats == 1))
}

/// The physical STE of a stream under a guest STE over `parent`
/// (`arm_smmu_make_nested_domain_ste`): abort (`None`), stage 2 alone for bypass, or
/// nested: the parent's stage-2 STE with Config nested, the guest's word-0 fields and
/// its word-1 fields merged in, EATS full only when the guest asked and the SMMU has ATS.
/// A nested STE the SMMU would find C_BAD_STE (S1CDMax beyond SSIDSIZE, a 2-level table
/// without CD2L...) is `-EIO` here, where Linux lets the hardware report it.
fn physical_ste(
    parent: &SmmuDomain,
    vste: &[u64; 2],
    ats: bool,
    f: &Features,
) -> Result<Option<Ste>, IommufdError> {
    match vste_config(vste) {
        Some(Config::Bypass) => Ok(Some(parent.s2_ste())),
        Some(Config::S1Trans) => {
            let mut words = Ste {
                eats: vsva_smmuv3::ste::Eats::Abort,
                ..parent.s2_ste()
            }
            .encode();
            words[0] = STE0_V | Config::Nested.raw() << 1 | (vste[0] & !(STE0_V | STE0_CFG));
            words[1] |= vste[1];
            if ats && f.ats {
                words[1] |= 1 << STE1_EATS_SHIFT;
            }
            Ste::decode(&words, f)
                .map(Some)
                .map_err(|e| IommufdError::io("iommu_hwpt_arm_smmuv3", format!("C_BAD_STE: {e}")))
        }
        _ => Ok(None),
    }
}

impl PagingDomain for SmmuDomain {
    fn map_area(
        &mut self,
        iova: u64,
        hpa: u64,
        length: u64,
        read: bool,
        write: bool,
    ) -> Result<(), IommufdError> {
        SmmuDomain::map_pages(self, iova, hpa, length, read, write).map_err(Into::into)
    }

    fn unmap_area(&mut self, iova: u64, length: u64) {
        IommuBackend::unmap_dma(self, Iova(iova), length);
    }

    /// The stage-2 input size: IPAs from `1 << IPA_BITS` are reserved.
    fn iova_bits(&self) -> u32 {
        IPA_BITS
    }

    /// `iopt_set_dirty_tracking` over `arm_smmu_set_dirty_tracking`: EOPNOTSUPP for a
    /// stage-2 domain (no dirty ops); turning it on makes every dirty leaf clean first, so
    /// no page of an earlier round is reported; the hardware itself always tracks (CD.HD
    /// is set at allocation), so turning it off changes nothing.
    fn set_dirty(&mut self, enable: bool) -> Result<(), IommufdError> {
        if !self.dirty_tracking() {
            return Err(IommufdError::not_supported(
                "iommu_hwpt_set_dirty_tracking",
                "a HWPT allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING",
            ));
        }
        if enable {
            self.clear_dirty()?;
        }
        Ok(())
    }

    /// [`SmmuDomain::read_and_clear_dirty`]; EOPNOTSUPP for a stage-2 domain.
    fn read_dirty(&mut self, bitmap: &mut DirtyBitmap, no_clear: bool) -> Result<(), IommufdError> {
        self.read_and_clear_dirty(bitmap, no_clear)?;
        Ok(())
    }
}

impl IommuOps for Smmu {
    type Domain = SmmuDomain;
    type Nested = HwptNested;
    type Object = Vobj;
    type State = SmmuObjectState;

    const IOCTLS: &'static [IoctlOp<Self>] = &[
        IoctlOp {
            ucmd: UCMD_DESTROY,
            handler: SmmuCtx::do_destroy,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_ALLOC,
            handler: SmmuCtx::do_ioas_alloc,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_ALLOW_IOVAS,
            handler: SmmuCtx::do_ioas_allow_iovas,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_COPY,
            handler: SmmuCtx::do_ioas_copy,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_IOVA_RANGES,
            handler: SmmuCtx::do_ioas_iova_ranges,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_MAP,
            handler: SmmuCtx::do_ioas_map,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_MAP_FILE,
            handler: SmmuCtx::do_ioas_map_file,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_UNMAP,
            handler: SmmuCtx::do_ioas_unmap,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_ALLOC,
            handler: SmmuCtx::do_hwpt_alloc,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_INVALIDATE,
            handler: SmmuCtx::do_hwpt_invalidate,
        },
        IoctlOp {
            ucmd: UCMD_GET_HW_INFO,
            handler: SmmuCtx::do_get_hw_info,
        },
        IoctlOp {
            ucmd: UCMD_VIOMMU_ALLOC,
            handler: SmmuCtx::do_viommu_alloc,
        },
        IoctlOp {
            ucmd: UCMD_VDEVICE_ALLOC,
            handler: SmmuCtx::do_vdevice_alloc,
        },
        IoctlOp {
            ucmd: UCMD_VEVENTQ_ALLOC,
            handler: SmmuCtx::do_veventq_alloc,
        },
        IoctlOp {
            ucmd: UCMD_FAULT_QUEUE_ALLOC,
            handler: SmmuCtx::do_fault_queue_alloc,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_SET_DIRTY_TRACKING,
            handler: SmmuCtx::do_hwpt_set_dirty_tracking,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_GET_DIRTY_BITMAP,
            handler: SmmuCtx::do_hwpt_get_dirty_bitmap,
        },
    ];
    const PAGING_FLAGS: u32 = IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
    /// `arm_smmu_domain_alloc_paging_flags`: a nest parent is a stage 2, dirty tracking
    /// is stage 1's.
    const DIRTY_NEST_PARENT: bool = false;
    const HW_INFO_TYPE: u32 = IOMMU_HW_INFO_TYPE_ARM_SMMUV3;
    const NAME: &'static str = "smmuv3 iommufd";

    fn memory(&self) -> &Arc<HostMemory> {
        self.smmu.frames().memory()
    }

    fn frames(&self) -> &Arc<FrameAllocator> {
        self.smmu.frames()
    }

    fn open_devices(&self) -> &OpenDevices {
        self.smmu.open_devices()
    }

    /// A stage-2 domain (a VMID, a stage-2 table); with `dirty` a stage-1 domain that
    /// tracks dirty pages (EOPNOTSUPP without stage 1 and HTTU A and D).
    fn new_domain(&self, dirty: bool) -> Result<SmmuDomain, IommufdError> {
        Ok(if dirty {
            SmmuDomain::new_dirty_tracking(&self.smmu)?
        } else {
            SmmuDomain::new(&self.smmu)?
        })
    }

    /// A nest parent needs stage 1 and stage 2 (IDR0.S1P and S2P).
    fn check_nest_parent(&self) -> Result<(), IommufdError> {
        let f = self.smmu.features();
        if !(f.s1p && f.s2p) {
            return Err(IommufdError::not_supported(
                "paging HWPT",
                "no nesting (S1P, S2P)",
            ));
        }
        Ok(())
    }

    /// `arm_smmu_hw_info`: SMMU_IDR0..5, IIDR and AIDR as read now, as
    /// `iommu_hw_info_arm_smmuv3`; the SubstreamID width as `out_max_pasid_log2`;
    /// `IOMMU_HW_CAP_DIRTY_TRACKING` when the SMMU can track dirty pages
    /// (`arm_smmu_capable`'s `IOMMU_CAP_DIRTY_TRACKING`, from IDR0.HTTU and S1P).
    fn hw_info(&self) -> Result<HwInfo, IommufdError> {
        const WHAT: &str = "iommu_hw_info";
        let hw = self.smmu.hardware();
        let reg = |off: u64| {
            hw.mmio_read(off, 4)
                .map(|v| v as u32)
                .map_err(|e| IommufdError::io(WHAT, format!("register {off:#x}: {e}")))
        };
        let mut idr = [0u32; 6];
        for (i, r) in idr.iter_mut().enumerate() {
            *r = reg(offset::IDR0 + 4 * i as u64)?;
        }
        let data = IommuHwInfoArmSmmuv3 {
            flags: 0,
            __reserved: 0,
            idr,
            iidr: reg(offset::IIDR)?,
            aidr: reg(offset::AIDR)?,
        };
        Ok(HwInfo {
            data: data.to_bytes().to_vec(),
            max_pasid_log2: self.smmu.features().ssid_bits,
            capabilities: if SmmuDomain::dirty_tracking_supported(&self.smmu) {
                IOMMU_HW_CAP_DIRTY_TRACKING
            } else {
                0
            },
        })
    }

    fn responder(&self) -> Arc<dyn PageResponder> {
        self.smmu.clone()
    }

    fn kind(o: &Vobj) -> &'static str {
        match o {
            Vobj::Viommu(_) => "vIOMMU",
            Vobj::Vdevice(_) => "vDEVICE",
            Vobj::Veventq { .. } => "vEVENT queue",
        }
    }

    fn nested_refers(n: &HwptNested, id: u32) -> bool {
        n.viommu == id || n.fault.as_ref().is_some_and(|(f, _)| *f == id)
    }

    fn object_refers(o: &Vobj, id: u32) -> bool {
        match o {
            Vobj::Viommu(v) => v.parent == id,
            Vobj::Vdevice(v) => v.viommu == id,
            Vobj::Veventq { viommu } => *viommu == id,
        }
    }

    fn state(o: &Object) -> SmmuObjectState {
        match o {
            Object::Ioas(i) => {
                SmmuObjectState::Ioas(i.areas().map(|a| (a.iova, a.length, a.hpa)).collect())
            }
            Object::HwptPaging(h) => SmmuObjectState::HwptPaging {
                ioas: h.ioas,
                nest_parent: h.nest_parent,
                vmid: h.domain.vmid(),
            },
            Object::HwptNested(n) => SmmuObjectState::HwptNested {
                viommu: n.viommu,
                vste: n.vste,
            },
            Object::Vendor(Vobj::Viommu(v)) => SmmuObjectState::Viommu { parent: v.parent },
            Object::Vendor(Vobj::Veventq { viommu }) => {
                SmmuObjectState::Veventq { viommu: *viommu }
            }
            Object::Vendor(Vobj::Vdevice(v)) => SmmuObjectState::Vdevice {
                viommu: v.viommu,
                dev: v.dev,
                virt_id: v.virt_id,
            },
            Object::Fault(_) => SmmuObjectState::Fault,
            Object::Device(d) => SmmuObjectState::Device {
                sid: u32::from(d.sid.rid()),
                hwpt: d.rid,
            },
        }
    }

    /// From a vIOMMU, a nested HWPT; from a paging HWPT EOPNOTSUPP (the SMMU nests only
    /// through a vIOMMU); from anything else EINVAL.
    fn alloc_hwpt_on(ctx: &mut SmmuCtx, cmd: &IommuHwptAlloc) -> Result<u32, IommufdError> {
        const WHAT: &str = "iommu_hwpt_alloc";
        match ctx.objects.get(&cmd.pt_id) {
            None => Err(no_object(cmd.pt_id, "page table")),
            Some(Object::Vendor(Vobj::Viommu(_))) => ctx.alloc_nested(cmd),
            Some(Object::HwptPaging(_)) => Err(IommufdError::not_supported(
                WHAT,
                "an SMMUv3 nests through a vIOMMU",
            )),
            Some(o) => Err(IommufdError::WrongType {
                id: cmd.pt_id,
                is: o.kind(),
                what: WHAT,
            }),
        }
    }

    /// Through a vIOMMU, as `SmmuCtx::invalidate_array` says.
    fn invalidate(
        ctx: &SmmuCtx,
        cmd: &IommuHwptInvalidate,
        done: &mut u32,
    ) -> Result<(), IommufdError> {
        ctx.invalidate_array(cmd, done)
    }

    /// A paging HWPT (stage 2 alone) or a nested one (the STE `physical_ste` builds);
    /// anything else EINVAL.
    fn rid_target(ctx: &SmmuCtx, _dev: &Device, pt_id: u32) -> Result<u32, IommufdError> {
        match ctx.objects.get(&pt_id) {
            None => Err(no_object(pt_id, "page table")),
            Some(Object::HwptPaging(_) | Object::HwptNested(_)) => Ok(pt_id),
            Some(o) => Err(IommufdError::WrongType {
                id: pt_id,
                is: o.kind(),
                what: "attach",
            }),
        }
    }

    /// `arm_smmu_attach_dev`, `arm_smmu_attach_dev_nested`: as
    /// `SmmuCtx::point_stream` says.
    fn set_rid(
        ctx: &mut SmmuCtx,
        dev_id: u32,
        old: Option<u32>,
        hwpt: u32,
    ) -> Result<(), IommufdError> {
        let sid = u32::from(ctx.device(dev_id)?.sid.rid());
        ctx.point_stream(dev_id, sid, old, hwpt)
    }

    /// The stream leaves its stage-2 domain and aborts.
    fn release_rid(ctx: &mut SmmuCtx, sid: SourceId, hwpt: u32) {
        if let Some(p) = ctx.domain_of(hwpt).and_then(|d| ctx.paging_mut(d)) {
            p.domain.release(u32::from(sid.rid()));
        }
    }

    fn rid_changed(ctx: &SmmuCtx, dev_id: u32) {
        ctx.update_vmaster(dev_id);
        ctx.update_fault_route(dev_id);
    }

    /// Its vDEVICEs go with it (the kernel's tombstone: a later `IOMMU_DESTROY` of their
    /// ids is ENOENT).
    fn unbound(ctx: &mut SmmuCtx, dev_id: u32) {
        ctx.objects
            .retain(|_, o| !matches!(o, Object::Vendor(Vobj::Vdevice(v)) if v.dev == dev_id));
    }

    /// A vEVENT queue leaves its vIOMMU; a vDEVICE's stream stops reporting to it.
    fn removed(ctx: &mut SmmuCtx, o: Object) {
        match o {
            Object::Vendor(Vobj::Veventq { viommu }) => {
                if let Some(Object::Vendor(Vobj::Viommu(v))) = ctx.objects.get(&viommu) {
                    v.events.set(None);
                }
            }
            Object::Vendor(Vobj::Vdevice(v)) => ctx.update_vmaster(v.dev),
            _ => {}
        }
    }
}

impl IommufdCtx<Smmu> {
    /// The paging HWPT whose domain a HWPT's streams use: itself, or a nested HWPT's
    /// vIOMMU's nest parent.
    fn domain_of(&self, hwpt: u32) -> Option<u32> {
        match self.objects.get(&hwpt)? {
            Object::HwptPaging(_) => Some(hwpt),
            Object::HwptNested(n) => match self.objects.get(&n.viommu)? {
                Object::Vendor(Vobj::Viommu(v)) => Some(v.parent),
                _ => None,
            },
            _ => None,
        }
    }

    /// Points the SMMU's event reporting for device `dev_id`'s stream at the vIOMMU of its
    /// nested HWPT, with its vSID, when it has a vDEVICE there; clears it otherwise.
    fn update_vmaster(&self, dev_id: u32) {
        let Ok(dev) = self.device(dev_id) else {
            return;
        };
        let vmaster = dev.rid.and_then(|h| {
            let Some(Object::HwptNested(n)) = self.objects.get(&h) else {
                return None;
            };
            let Some(Object::Vendor(Vobj::Viommu(viommu))) = self.objects.get(&n.viommu) else {
                return None;
            };
            self.objects.values().find_map(|o| match o {
                Object::Vendor(Vobj::Vdevice(v)) if v.viommu == n.viommu && v.dev == dev_id => {
                    let sink: Arc<dyn VeventSink> = viommu.events.clone();
                    Some((sink, v.virt_id as u32))
                }
                _ => None,
            })
        });
        self.ops.smmu.set_vmaster(u32::from(dev.sid.rid()), vmaster);
    }

    /// Routes the page requests and stalls of device `dev_id`'s stream to the fault queue
    /// of the nested HWPT it is attached to, if that has one
    /// (`iommufd_fault_domain_replace_dev`): the new queue takes the stream first, then
    /// the SMMU's route moves, then a queue the stream leaves answers its unanswered
    /// groups of the stream with Invalid.
    fn update_fault_route(&self, dev_id: u32) {
        let Ok(dev) = self.device(dev_id) else {
            return;
        };
        let (sid, stream) = (dev.sid, u32::from(dev.sid.rid()));
        let want = dev.rid.and_then(|h| match self.objects.get(&h) {
            Some(Object::HwptNested(n)) => n.fault.as_ref().map(|(_, f)| f.clone()),
            _ => None,
        });
        let mut faults = self.ops.faults();
        let have = faults.get(&stream).cloned();
        if have.as_ref().map(Arc::as_ptr) == want.as_ref().map(Arc::as_ptr) {
            return;
        }
        if let Some(f) = &want {
            f.add_stream(sid, dev_id);
            faults.insert(stream, f.clone());
        } else {
            faults.remove(&stream);
        }
        drop(faults);
        self.ops
            .smmu
            .set_stream_sink(stream, want.as_ref().map(|f| f.sink()));
        if let Some(f) = have {
            f.remove_stream(sid);
        }
    }

    /// `IOMMU_VEVENTQ_ALLOC` (`iommufd_veventq_alloc`): flags and reserved 0 and a type
    /// other than DEFAULT (EOPNOTSUPP; ARM_SMMUV3 the only one served), a depth (EINVAL for
    /// 0), a vIOMMU (ENOENT) without a queue of that type (EEXIST); the queue's file is
    /// installed in the process's fd table (EMFILE for a file opened outside one).
    fn do_veventq_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_veventq_alloc";
        let mut cmd: IommuVeventqAlloc = u.copy_in(arg)?;
        if cmd.flags != 0 || cmd.__reserved != 0 || cmd.type_ == IOMMU_VEVENTQ_TYPE_DEFAULT {
            return Err(IommufdError::not_supported(WHAT, "flags, reserved or type"));
        }
        if cmd.type_ != IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("vEVENT queue type {}", cmd.type_),
            ));
        }
        if cmd.veventq_depth == 0 {
            return Err(IommufdError::invalid(WHAT, "depth 0"));
        }
        let Some(Object::Vendor(Vobj::Viommu(viommu))) = self.objects.get(&cmd.viommu_id) else {
            return Err(no_object(cmd.viommu_id, "vIOMMU"));
        };
        let events = viommu.events.clone();
        let taken = self.objects.values().any(
            |o| matches!(o, Object::Vendor(Vobj::Veventq { viommu }) if *viommu == cmd.viommu_id),
        );
        if taken {
            return Err(IommufdError::Exists("vEVENT queue of the type"));
        }
        let fds = self.fds.upgrade().ok_or(IommufdError::NoFd)?;
        let id = self.next_id()?;
        let file = VeventqFile::new(cmd.veventq_depth);
        let fd = fds.install_veventq(file.clone());
        events.set(Some(file));
        self.objects.insert(
            id,
            Object::Vendor(Vobj::Veventq {
                viommu: cmd.viommu_id,
            }),
        );
        cmd.out_veventq_id = id;
        cmd.out_veventq_fd = fd as u32;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// A nested HWPT under vIOMMU `cmd.pt_id` (`arm_vsmmu_alloc_domain_nested`): flags
    /// other than FAULT_ID_VALID EOPNOTSUPP, FAULT_ID_VALID with a `fault_id` that is not
    /// a fault queue ENOENT; data of type ARM_SMMUV3 (NONE: EINVAL, another:
    /// EOPNOTSUPP), at least `iommu_hwpt_arm_smmuv3` (EINVAL), read from `data_uptr`
    /// (EFAULT) with a zero tail (E2BIG); the STE words as [`validate_vste`] takes them
    /// and the nested STE they make as [`physical_ste`] builds it (EIO).
    fn alloc_nested(&mut self, cmd: &IommuHwptAlloc) -> Result<u32, IommufdError> {
        const WHAT: &str = "nested HWPT";
        if cmd.flags & !IOMMU_HWPT_FAULT_ID_VALID != 0 {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("flags {:#x}", cmd.flags),
            ));
        }
        if cmd.data_type != IOMMU_HWPT_DATA_ARM_SMMUV3 {
            return Err(if cmd.data_type == IOMMU_HWPT_DATA_NONE {
                IommufdError::invalid(WHAT, "no data")
            } else {
                IommufdError::not_supported(WHAT, format!("data type {}", cmd.data_type))
            });
        }
        let data: IommuHwptArmSmmuv3 = self.hwpt_data(cmd, WHAT)?;
        let fault = if cmd.flags & IOMMU_HWPT_FAULT_ID_VALID != 0 {
            match self.objects.get(&cmd.fault_id) {
                Some(Object::Fault(f)) => Some((cmd.fault_id, f.clone())),
                _ => return Err(no_object(cmd.fault_id, "fault queue")),
            }
        } else {
            None
        };
        let (vste, ats) = validate_vste(data.ste)?;
        let parent = self
            .domain_of_viommu(cmd.pt_id)
            .ok_or(no_object(cmd.pt_id, "vIOMMU"))?;
        physical_ste(&parent.domain, &vste, ats, self.ops.smmu.features())?;
        let id = self.next_id()?;
        self.objects.insert(
            id,
            Object::HwptNested(HwptNested {
                viommu: cmd.pt_id,
                vste,
                ats,
                fault,
            }),
        );
        Ok(id)
    }

    fn domain_of_viommu(&self, viommu: u32) -> Option<&HwptPaging<SmmuDomain>> {
        match self.objects.get(&viommu)? {
            Object::Vendor(Vobj::Viommu(v)) => self.paging(v.parent),
            _ => None,
        }
    }

    /// `IOMMU_VIOMMU_ALLOC` (`iommufd_viommu_alloc_ioctl`, `arm_vsmmu_init`): flags and
    /// `__reserved` 0 and a type other than DEFAULT (EOPNOTSUPP); a bound device (ENOENT);
    /// type ARM_SMMUV3 on an SMMU with stage 1 and stage 2 (EOPNOTSUPP otherwise); a paging
    /// HWPT (ENOENT) that is a nest parent (EINVAL). The vIOMMU tags the VM's commands
    /// with the parent's VMID.
    fn do_viommu_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_viommu_alloc";
        let mut cmd: IommuViommuAlloc = u.copy_in(arg)?;
        if cmd.flags != 0 || cmd.__reserved != 0 || cmd.type_ == IOMMU_VIOMMU_TYPE_DEFAULT {
            return Err(IommufdError::not_supported(WHAT, "flags, reserved or type"));
        }
        self.device(cmd.dev_id)?;
        let f = self.ops.smmu.features();
        if cmd.type_ != IOMMU_VIOMMU_TYPE_ARM_SMMUV3 || !(f.s1p && f.s2p) {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("vIOMMU type {}", cmd.type_),
            ));
        }
        let parent = self
            .paging(cmd.hwpt_id)
            .ok_or(no_object(cmd.hwpt_id, "paging HWPT"))?;
        if !parent.nest_parent {
            return Err(IommufdError::invalid(WHAT, "the HWPT is not a nest parent"));
        }
        let id = self.next_id()?;
        self.objects.insert(
            id,
            Object::Vendor(Vobj::Viommu(Viommu {
                parent: cmd.hwpt_id,
                events: Arc::default(),
            })),
        );
        cmd.out_viommu_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_VDEVICE_ALLOC` (`iommufd_vdevice_alloc_ioctl`): a vIOMMU and a bound device
    /// (ENOENT); a virtual StreamID already used in the vIOMMU, or a device that has one
    /// there already, EEXIST.
    fn do_vdevice_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuVdeviceAlloc = u.copy_in(arg)?;
        match self.objects.get(&cmd.viommu_id) {
            Some(Object::Vendor(Vobj::Viommu(_))) => {}
            _ => return Err(no_object(cmd.viommu_id, "vIOMMU")),
        }
        self.device(cmd.dev_id)?;
        let taken = self.objects.values().any(|o| {
            matches!(o, Object::Vendor(Vobj::Vdevice(v)) if v.viommu == cmd.viommu_id
                && (v.virt_id == cmd.virt_id || v.dev == cmd.dev_id))
        });
        if taken {
            return Err(IommufdError::Exists("vDEVICE"));
        }
        let id = self.next_id()?;
        self.objects.insert(
            id,
            Object::Vendor(Vobj::Vdevice(Vdevice {
                viommu: cmd.viommu_id,
                dev: cmd.dev_id,
                virt_id: cmd.virt_id,
            })),
        );
        cmd.out_vdevice_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_HWPT_INVALIDATE` through a vIOMMU (`arm_vsmmu_cache_invalidate`): reserved
    /// zero (EOPNOTSUPP), entries with a pointer and a length (EINVAL), `hwpt_id` a vIOMMU
    /// (unknown: ENOENT; a nested HWPT, which has no invalidation of its own on an SMMU:
    /// EOPNOTSUPP; anything else EINVAL), data type ARM_SMMUV3 (EINVAL), entries of at
    /// least 16 bytes (EINVAL) with a zero tail (E2BIG). Each command is checked and
    /// confined to the VM by [`SmmuCtx::confine`]; the first refused one (EIO) ends the
    /// array, the commands before it are issued as one batch with one CMD_SYNC, and
    fn invalidate_array(
        &self,
        cmd: &IommuHwptInvalidate,
        done: &mut u32,
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_invalidate";
        let parent = match self.objects.get(&cmd.hwpt_id) {
            None => return Err(no_object(cmd.hwpt_id, "HWPT or vIOMMU")),
            Some(Object::Vendor(Vobj::Viommu(v))) => self
                .paging(v.parent)
                .ok_or(no_object(v.parent, "paging HWPT"))?,
            Some(Object::HwptNested(_)) => {
                return Err(IommufdError::not_supported(
                    WHAT,
                    "an SMMUv3 nested HWPT is invalidated through its vIOMMU",
                ))
            }
            Some(o) => {
                return Err(IommufdError::WrongType {
                    id: cmd.hwpt_id,
                    is: o.kind(),
                    what: WHAT,
                })
            }
        };
        if cmd.data_type != IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 {
            return Err(IommufdError::invalid(WHAT, "data type"));
        }
        if cmd.entry_num == 0 {
            return Ok(());
        }
        let known = std::mem::size_of::<IommuViommuArmSmmuv3Invalidate>();
        if (cmd.entry_len as usize) < known {
            return Err(IommufdError::invalid(WHAT, "entry_len below the command"));
        }
        let array = UserArray {
            uptr: cmd.data_uptr,
            entry_len: cmd.entry_len,
            entry_num: cmd.entry_num,
        };
        let vmid = parent.domain.vmid();
        let mut cmds = Vec::new();
        let result = for_each_user_entry(
            self.ops.smmu.frames().memory(),
            array,
            known,
            "iommu_viommu_arm_smmuv3_invalidate",
            |_, bytes| {
                let e: IommuViommuArmSmmuv3Invalidate = read_prefix(bytes, known);
                cmds.push(self.confine(cmd.hwpt_id, vmid, e.cmd)?);
                Ok::<(), IommufdError>(())
            },
        );
        if !cmds.is_empty() {
            parent.domain.issue_guest(&cmds)?;
            *done = cmds.len() as u32;
        }
        result
    }

    /// A VM's command as the SMMU may run it (`arm_vsmmu_validate_user_cmd` and
    /// `arm_vsmmu_convert_user_cmd`): it must decode (no bit outside its fields, IHI 0070
    /// §4) and be one of CMD_TLBI_NSNH_ALL (which becomes CMD_TLBI_NH_ALL),
    /// CMD_TLBI_NH_ALL/ASID/VA/VAA (their VMID replaced by the vIOMMU's), CMD_ATC_INV
    /// (with ATS and a Size up to 52), CMD_CFGI_CD/CD_ALL (their StreamID a vSID of the
    /// vIOMMU, replaced by the device's StreamID); anything else, or an unknown vSID, is
    /// EIO.
    fn confine(&self, viommu: u32, vmid: u16, raw: [u64; 2]) -> Result<Cmd, IommufdError> {
        const WHAT: &str = "vIOMMU command";
        let f = self.ops.smmu.features();
        let cmd =
            Cmd::decode(raw, f).map_err(|e| IommufdError::io(WHAT, format!("{raw:#x?}: {e}")))?;
        let psid = |vsid: u32| {
            self.objects
                .values()
                .find_map(|o| match o {
                    Object::Vendor(Vobj::Vdevice(v))
                        if v.viommu == viommu && v.virt_id == u64::from(vsid) =>
                    {
                        match self.objects.get(&v.dev) {
                            Some(Object::Device(d)) => Some(u32::from(d.sid.rid())),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .ok_or_else(|| IommufdError::io(WHAT, format!("no vDEVICE with vSID {vsid:#x}")))
        };
        Ok(match cmd {
            Cmd::TlbiNsnhAll | Cmd::TlbiNhAll { .. } => Cmd::TlbiNhAll { vmid },
            Cmd::TlbiNhAsid { asid, .. } => Cmd::TlbiNhAsid { vmid, asid },
            Cmd::TlbiNhVa { asid, addr, .. } => Cmd::TlbiNhVa { vmid, asid, addr },
            Cmd::TlbiNhVaa { addr, .. } => Cmd::TlbiNhVaa { vmid, addr },
            Cmd::AtcInv {
                sid,
                ssid,
                global,
                addr,
                size,
            } => {
                if !f.ats || size > 52 {
                    return Err(IommufdError::io(WHAT, "CMD_ATC_INV without ATS or Size"));
                }
                Cmd::AtcInv {
                    sid: psid(sid)?,
                    ssid,
                    global,
                    addr,
                    size,
                }
            }
            Cmd::CfgiCd { sid, ssid, leaf } => Cmd::CfgiCd {
                sid: psid(sid)?,
                ssid,
                leaf,
            },
            Cmd::CfgiCdAll { sid } => Cmd::CfgiCdAll { sid: psid(sid)? },
            other => {
                return Err(IommufdError::io(
                    WHAT,
                    format!("opcode {:#x} is not a VM's", other.opcode()),
                ))
            }
        })
    }

    /// `IOMMU_GET_HW_INFO` of a bound device (`arm_smmu_hw_info`): SMMU_IDR0..5, IIDR and
    /// AIDR as read now, as `iommu_hw_info_arm_smmuv3`, copied into the user buffer up to
    /// `data_len` (a larger buffer's tail zeroed; `data_len` returns the kernel's length),
    /// The physical STE of HWPT `hwpt` for device `dev_id`, and whether it nests.
    fn ste_of(&self, dev_id: u32, hwpt: u32) -> Result<(Option<Ste>, bool), IommufdError> {
        match self.objects.get(&hwpt) {
            Some(Object::HwptPaging(h)) => Ok((Some(h.domain.paging_ste()), false)),
            Some(Object::HwptNested(n)) => {
                let cfg = vste_config(&n.vste);
                let has_vdev = self.objects.values().any(
                    |o| matches!(o, Object::Vendor(Vobj::Vdevice(v)) if v.viommu == n.viommu && v.dev == dev_id),
                );
                if cfg == Some(Config::S1Trans) && !has_vdev {
                    return Err(no_object(n.viommu, "vDEVICE of the device in the vIOMMU"));
                }
                let parent = self
                    .domain_of_viommu(n.viommu)
                    .ok_or(no_object(n.viommu, "vIOMMU"))?;
                let ste = physical_ste(&parent.domain, &n.vste, n.ats, self.ops.smmu.features())?;
                Ok((ste, cfg == Some(Config::S1Trans)))
            }
            _ => Err(no_object(hwpt, "HWPT")),
        }
    }

    /// Points stream `sid` of `dev_id` from HWPT `old` to HWPT `new`. Across stage-2
    /// domains, when the new one refuses the stream, it goes back to the old STE; if that
    /// cannot be rebuilt (its vDEVICE was destroyed meanwhile), the device is left
    /// detached, its stream aborting.
    fn point_stream(
        &mut self,
        dev_id: u32,
        sid: u32,
        old: Option<u32>,
        new: u32,
    ) -> Result<(), IommufdError> {
        let (ste, nested) = self.ste_of(dev_id, new)?;
        let to = self.domain_of(new).ok_or(no_object(new, "HWPT"))?;
        let from = old.and_then(|o| self.domain_of(o)).filter(|&f| f != to);
        let Some(from) = from else {
            return self
                .paging_mut(to)
                .ok_or(no_object(to, "paging HWPT"))?
                .domain
                .set_stream(sid, ste.as_ref(), nested)
                .map_err(Into::into);
        };
        let restore = old.and_then(|o| self.ste_of(dev_id, o).ok());
        if let Some(h) = self.paging_mut(from) {
            h.domain.release(sid);
        }
        let r = match self.paging_mut(to) {
            Some(h) => h.domain.set_stream(sid, ste.as_ref(), nested),
            None => return Err(no_object(to, "paging HWPT")),
        };
        let Err(e) = r else {
            return Ok(());
        };
        let restored = match (restore, self.paging_mut(from)) {
            (Some((ste, nested)), Some(h)) => h.domain.set_stream(sid, ste.as_ref(), nested),
            _ => Ok(()),
        };
        if restore.is_none() || restored.is_err() {
            tracing::error!("smmuv3 iommufd: stream {sid:#x} left detached");
            if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
                d.rid = None;
            }
            self.update_vmaster(dev_id);
            self.update_fault_route(dev_id);
            if let Some(o) = old {
                self.drop_auto(o);
            }
        }
        Err(e.into())
    }
}
