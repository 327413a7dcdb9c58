//! The iommufd uAPI on the host's SMMUv3: what `drivers/iommu/iommufd/` (`viommu.c`,
//! `hw_pagetable.c`) and `arm-smmu-v3-iommufd.c` do for a VMM whose vSMMU nests the
//! guest's stream table entries over a stage 2 the host owns.
//!
//! The objects, by id in the file's own id space:
//! - IOAS: an IOVA (here, IPA) space the VMM maps its memory into ([`Iopt`]);
//! - paging HWPT: a stage-2 [`SmmuDomain`] (a VMID, a stage-2 table) holding its IOAS's
//!   mappings; with `IOMMU_HWPT_ALLOC_NEST_PARENT` a vIOMMU may be built on it;
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
//!   vDEVICE (other than stage-2 faults and stalls), its StreamID replaced by the vSID.
//!
//! `IOMMU_DESTROY` of a referenced object is EBUSY; every ioctl checks before its first
//! change, so a refused one changes nothing. Not served on this file (ENOTTY):
//! IOAS_COPY, IOAS_IOVA_RANGES, IOAS_ALLOW_IOVAS, IOAS_MAP_FILE, dirty tracking, fault
//! queues.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use vsva_smmuv3::regs::offset;
use vsva_smmuv3::{Cmd, Config, Features, Ste};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{Errno, EventNotifier, UapiError, UapiFile};
use vsva_vtd::{Iova, SourceId};

use super::device::{BindTarget, Iommufds};
use super::iopt::{self, Area, Iopt};
use super::user::{copy_from_user, copy_to_user, for_each_user_entry, UserArray};
use super::vevent::VeventqFile;
use super::IommufdError;
use crate::container::IommuBackend;
use crate::smmu::{SmmuDomain, SmmuHost, VeventSink, IPA_BITS};

/// A paging HWPT: a stage-2 domain holding its IOAS's mappings.
#[derive(Debug)]
struct HwptPaging {
    ioas: u32,
    domain: SmmuDomain,
    nest_parent: bool,
    /// Created by attaching a device to the IOAS itself; destroyed with its last device.
    auto: bool,
}

/// A vIOMMU: the VM's slice of the SMMU over a nest parent (`struct arm_vsmmu`).
#[derive(Debug)]
struct Viommu {
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
struct Vdevice {
    viommu: u32,
    dev: u32,
    virt_id: u64,
}

/// A nested HWPT: the guest's STE words 0 and 1 (checked, EATS cleared) and whether the
/// guest asked for ATS (`struct arm_smmu_nested_domain`).
#[derive(Debug)]
struct HwptNested {
    viommu: u32,
    vste: [u64; 2],
    ats: bool,
}

/// A device bound to the file.
#[derive(Debug)]
struct Device {
    /// Its StreamID.
    sid: u32,
    /// The HWPT its STE comes from.
    hwpt: Option<u32>,
}

#[derive(Debug)]
enum Object {
    Ioas(Iopt),
    HwptPaging(HwptPaging),
    HwptNested(HwptNested),
    Viommu(Viommu),
    Vdevice(Vdevice),
    Veventq { viommu: u32 },
    Device(Device),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Ioas(_) => "IOAS",
            Object::HwptPaging(_) => "paging HWPT",
            Object::HwptNested(_) => "nested HWPT",
            Object::Viommu(_) => "vIOMMU",
            Object::Vdevice(_) => "vDEVICE",
            Object::Veventq { .. } => "vEVENT queue",
            Object::Device(_) => "device",
        }
    }
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
    /// A device and the HWPT of its STE.
    Device {
        /// Its StreamID.
        sid: u32,
        /// The HWPT it is attached to.
        hwpt: Option<u32>,
    },
}

/// One open `/dev/iommu` on an SMMU: its objects.
#[derive(Debug)]
pub struct SmmuCtx {
    smmu: Arc<SmmuHost>,
    objects: BTreeMap<u32, Object>,
    /// The fd table vEVENT queue files are installed in.
    fds: Weak<Iommufds>,
}

/// The handler of one ioctl.
type Handler = fn(&mut SmmuCtx, &Ucmd, &mut [u8]) -> Result<(), IommufdError>;

/// One row of the ioctl table (`struct iommufd_ioctl_op`).
struct IoctlOp {
    ucmd: Ucmd,
    handler: Handler,
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
                eats: vsva_smmuv3::Eats::Abort,
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

impl SmmuCtx {
    /// The ioctls this file serves: the argument's size and minimum size, the handler.
    const IOCTLS: &'static [IoctlOp] = &[
        IoctlOp {
            ucmd: UCMD_DESTROY,
            handler: SmmuCtx::do_destroy,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_ALLOC,
            handler: SmmuCtx::do_ioas_alloc,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_MAP,
            handler: SmmuCtx::do_ioas_map,
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
    ];

    /// Performs one ioctl on its argument bytes.
    pub fn ioctl(&mut self, cmd: u32, arg: &mut [u8]) -> Result<(), IommufdError> {
        let op = Self::IOCTLS
            .iter()
            .find(|op| op.ucmd.cmd == cmd)
            .ok_or(IommufdError::UnknownIoctl(cmd))?;
        (op.handler)(self, &op.ucmd, arg)
    }

    /// The objects, by id.
    pub fn objects(&self) -> BTreeMap<u32, SmmuObjectState> {
        self.objects
            .iter()
            .map(|(&id, o)| {
                let s = match o {
                    Object::Ioas(i) => SmmuObjectState::Ioas(
                        i.areas().map(|a| (a.iova, a.length, a.hpa)).collect(),
                    ),
                    Object::HwptPaging(h) => SmmuObjectState::HwptPaging {
                        ioas: h.ioas,
                        nest_parent: h.nest_parent,
                        vmid: h.domain.vmid(),
                    },
                    Object::HwptNested(n) => SmmuObjectState::HwptNested {
                        viommu: n.viommu,
                        vste: n.vste,
                    },
                    Object::Viommu(v) => SmmuObjectState::Viommu { parent: v.parent },
                    Object::Veventq { viommu } => SmmuObjectState::Veventq { viommu: *viommu },
                    Object::Vdevice(v) => SmmuObjectState::Vdevice {
                        viommu: v.viommu,
                        dev: v.dev,
                        virt_id: v.virt_id,
                    },
                    Object::Device(d) => SmmuObjectState::Device {
                        sid: d.sid,
                        hwpt: d.hwpt,
                    },
                };
                (id, s)
            })
            .collect()
    }

    /// The lowest free id from 1 (`xa_alloc` with `XA_FLAGS_ALLOC1`).
    fn next_id(&self) -> Result<u32, IommufdError> {
        let mut id = 1u32;
        for &used in self.objects.keys() {
            if used != id {
                break;
            }
            id = id
                .checked_add(1)
                .ok_or(IommufdError::NoSpace("object ids"))?;
        }
        Ok(id)
    }

    fn iopt(&self, id: u32) -> Result<&Iopt, IommufdError> {
        match self.objects.get(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(no_object(id, "IOAS")),
        }
    }

    fn iopt_mut(&mut self, id: u32) -> Result<&mut Iopt, IommufdError> {
        match self.objects.get_mut(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(no_object(id, "IOAS")),
        }
    }

    fn device(&self, id: u32) -> Result<&Device, IommufdError> {
        match self.objects.get(&id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(no_object(id, "device")),
        }
    }

    fn paging(&self, id: u32) -> Option<&HwptPaging> {
        match self.objects.get(&id) {
            Some(Object::HwptPaging(h)) => Some(h),
            _ => None,
        }
    }

    fn paging_mut(&mut self, id: u32) -> Option<&mut HwptPaging> {
        match self.objects.get_mut(&id) {
            Some(Object::HwptPaging(h)) => Some(h),
            _ => None,
        }
    }

    /// How many objects reference `id`.
    fn users(&self, id: u32) -> usize {
        self.objects
            .values()
            .filter(|o| match o {
                Object::HwptPaging(h) => h.ioas == id,
                Object::Viommu(v) => v.parent == id,
                Object::Vdevice(v) => v.viommu == id,
                Object::Veventq { viommu } => *viommu == id,
                Object::HwptNested(n) => n.viommu == id,
                Object::Device(d) => d.hwpt == Some(id),
                Object::Ioas(_) => false,
            })
            .count()
    }

    /// The paging HWPT whose domain a HWPT's streams use: itself, or a nested HWPT's
    /// vIOMMU's nest parent.
    fn domain_of(&self, hwpt: u32) -> Option<u32> {
        match self.objects.get(&hwpt)? {
            Object::HwptPaging(_) => Some(hwpt),
            Object::HwptNested(n) => match self.objects.get(&n.viommu)? {
                Object::Viommu(v) => Some(v.parent),
                _ => None,
            },
            _ => None,
        }
    }

    // ----- Handlers -----

    /// `IOMMU_DESTROY`: ENOENT for an unknown id, EBUSY for an object another references
    /// or a device (its cdev owns it).
    fn do_destroy(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let cmd: IommuDestroy = u.copy_in(arg)?;
        let id = cmd.id;
        match self.objects.get(&id) {
            None => return Err(no_object(id, "object")),
            Some(Object::Device(_)) => {
                return Err(IommufdError::Busy(
                    "a device is destroyed by closing its cdev",
                ))
            }
            Some(_) if self.users(id) > 0 => {
                return Err(IommufdError::Busy("the object is in use"))
            }
            Some(_) => {}
        }
        self.remove_object(id);
        Ok(())
    }

    /// Removes an object no other references (a paging HWPT's reservation goes with it, a
    /// vEVENT queue leaves its vIOMMU, a vDEVICE's stream stops reporting to it).
    fn remove_object(&mut self, id: u32) {
        match self.objects.remove(&id) {
            Some(Object::HwptPaging(h)) => {
                if let Ok(iopt) = self.iopt_mut(h.ioas) {
                    iopt.unreserve(id);
                }
            }
            Some(Object::Veventq { viommu }) => {
                if let Some(Object::Viommu(v)) = self.objects.get(&viommu) {
                    v.events.set(None);
                }
            }
            Some(Object::Vdevice(v)) => self.update_vmaster(v.dev),
            _ => {}
        }
    }

    /// Points the SMMU's event reporting for device `dev_id`'s stream at the vIOMMU of its
    /// nested HWPT, with its vSID, when it has a vDEVICE there; clears it otherwise.
    fn update_vmaster(&self, dev_id: u32) {
        let Ok(dev) = self.device(dev_id) else {
            return;
        };
        let vmaster = dev.hwpt.and_then(|h| {
            let Some(Object::HwptNested(n)) = self.objects.get(&h) else {
                return None;
            };
            let Some(Object::Viommu(viommu)) = self.objects.get(&n.viommu) else {
                return None;
            };
            self.objects.values().find_map(|o| match o {
                Object::Vdevice(v) if v.viommu == n.viommu && v.dev == dev_id => {
                    let sink: Arc<dyn VeventSink> = viommu.events.clone();
                    Some((sink, v.virt_id as u32))
                }
                _ => None,
            })
        });
        self.smmu.set_vmaster(dev.sid, vmaster);
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
        let Some(Object::Viommu(viommu)) = self.objects.get(&cmd.viommu_id) else {
            return Err(no_object(cmd.viommu_id, "vIOMMU"));
        };
        let events = viommu.events.clone();
        let taken = self
            .objects
            .values()
            .any(|o| matches!(o, Object::Veventq { viommu } if *viommu == cmd.viommu_id));
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
            Object::Veventq {
                viommu: cmd.viommu_id,
            },
        );
        cmd.out_veventq_id = id;
        cmd.out_veventq_fd = fd as u32;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_ALLOC`: flags must be 0 (EOPNOTSUPP).
    fn do_ioas_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasAlloc = u.copy_in(arg)?;
        if cmd.flags != 0 {
            return Err(IommufdError::not_supported("iommu_ioas_alloc", "flags"));
        }
        let id = self.next_id()?;
        self.objects.insert(id, Object::Ioas(Iopt::default()));
        cmd.out_ioas_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_MAP`: the area [`iopt::map_area`] checks, mapped into the stage 2 of
    /// every paging HWPT of the IOAS (all or none); the IOVA written back.
    fn do_ioas_map(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasMap = u.copy_in(arg)?;
        let area = iopt::map_area(self.iopt(cmd.ioas_id)?, self.smmu.frames().memory(), &cmd)?;
        let hwpts: Vec<u32> = self.hwpts_of(cmd.ioas_id);
        let mut done = Vec::new();
        for &h in &hwpts {
            let Some(hwpt) = self.paging_mut(h) else {
                continue;
            };
            if let Err(e) =
                hwpt.domain
                    .map_pages(area.iova, area.hpa, area.length, area.read, area.write)
            {
                for d in done {
                    if let Some(hwpt) = self.paging_mut(d) {
                        hwpt.domain.unmap_dma(Iova(area.iova), area.length);
                    }
                }
                return Err(e.into());
            }
            done.push(h);
        }
        self.iopt_mut(cmd.ioas_id)?.insert(area);
        cmd.iova = area.iova;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// The paging HWPTs built from IOAS `ioas`.
    fn hwpts_of(&self, ioas: u32) -> Vec<u32> {
        self.objects
            .iter()
            .filter_map(|(&id, o)| match o {
                Object::HwptPaging(h) if h.ioas == ioas => Some(id),
                _ => None,
            })
            .collect()
    }

    /// `IOMMU_IOAS_UNMAP`: every area inside `[iova, +length)` (ENOENT for none or for a
    /// cut one), `0, U64_MAX` every area, removed from every stage 2 with its TLB
    /// invalidation; `length` returns the bytes unmapped.
    fn do_ioas_unmap(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasUnmap = u.copy_in(arg)?;
        let all = cmd.iova == 0 && cmd.length == u64::MAX;
        if !all && (cmd.iova == u64::MAX || cmd.length == u64::MAX) {
            return Err(IommufdError::Overflow("iommu_ioas_unmap"));
        }
        let plan = self.iopt(cmd.ioas_id)?.unmap_plan(cmd.iova, cmd.length)?;
        let hwpts = self.hwpts_of(cmd.ioas_id);
        let mut unmapped = 0u64;
        for a in &plan {
            for &h in &hwpts {
                if let Some(hwpt) = self.paging_mut(h) {
                    hwpt.domain.unmap_dma(Iova(a.iova), a.length);
                }
            }
            self.iopt_mut(cmd.ioas_id)?.remove(a.iova);
            unmapped += a.length;
        }
        cmd.length = unmapped;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_HWPT_ALLOC`. From an IOAS, a paging HWPT (a stage-2 domain); from a vIOMMU,
    /// a nested HWPT; from anything else EINVAL (a paging HWPT: EOPNOTSUPP, the SMMU
    /// nests only through a vIOMMU). `data_type` and `data_len` must agree (EINVAL), the
    /// device must be bound (ENOENT).
    fn do_hwpt_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_alloc";
        let mut cmd: IommuHwptAlloc = u.copy_in(arg)?;
        if cmd.__reserved != 0 {
            return Err(IommufdError::not_supported(WHAT, "reserved field"));
        }
        if (cmd.data_type == IOMMU_HWPT_DATA_NONE) != (cmd.data_len == 0) {
            return Err(IommufdError::invalid(
                WHAT,
                "data_type and data_len disagree",
            ));
        }
        self.device(cmd.dev_id)?;
        let id = match self.objects.get(&cmd.pt_id) {
            None => return Err(no_object(cmd.pt_id, "page table")),
            Some(Object::Ioas(_)) => self.alloc_paging(cmd.pt_id, cmd.flags, cmd.data_type)?,
            Some(Object::Viommu(_)) => self.alloc_nested(&cmd)?,
            Some(Object::HwptPaging(_)) => {
                return Err(IommufdError::not_supported(
                    WHAT,
                    "an SMMUv3 nests through a vIOMMU",
                ))
            }
            Some(o) => {
                return Err(IommufdError::WrongType {
                    id: cmd.pt_id,
                    is: o.kind(),
                    what: WHAT,
                })
            }
        };
        cmd.out_hwpt_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// A paging HWPT: flags NEST_PARENT only (needs stage 1 and stage 2, IDR0.S1P and
    /// S2P), no data (EOPNOTSUPP otherwise).
    fn alloc_paging(&mut self, ioas: u32, flags: u32, data_type: u32) -> Result<u32, IommufdError> {
        const WHAT: &str = "paging HWPT";
        if flags & !IOMMU_HWPT_ALLOC_NEST_PARENT != 0 {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("flags {flags:#x}"),
            ));
        }
        if data_type != IOMMU_HWPT_DATA_NONE {
            return Err(IommufdError::not_supported(WHAT, "driver data"));
        }
        let f = self.smmu.features();
        let nest_parent = flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0;
        if nest_parent && !(f.s1p && f.s2p) {
            return Err(IommufdError::not_supported(WHAT, "no nesting (S1P, S2P)"));
        }
        let id = self.build_paging(ioas, false)?;
        if let Some(h) = self.paging_mut(id) {
            h.nest_parent = nest_parent;
        }
        Ok(id)
    }

    /// A new paging HWPT of `ioas`: a stage-2 domain, the IPAs beyond its size reserved,
    /// the IOAS's mappings replayed; on failure nothing is left.
    fn build_paging(&mut self, ioas: u32, auto: bool) -> Result<u32, IommufdError> {
        let id = self.next_id()?;
        let mut domain = SmmuDomain::new(&self.smmu)?;
        let iopt = self.iopt_mut(ioas)?;
        iopt.reserve(id, 1u64 << IPA_BITS, u64::MAX)?;
        let areas: Vec<Area> = iopt.areas().copied().collect();
        for a in &areas {
            if let Err(e) = domain.map_pages(a.iova, a.hpa, a.length, a.read, a.write) {
                if let Ok(i) = self.iopt_mut(ioas) {
                    i.unreserve(id);
                }
                // The domain and its mappings go when it drops.
                return Err(e.into());
            }
        }
        self.objects.insert(
            id,
            Object::HwptPaging(HwptPaging {
                ioas,
                domain,
                nest_parent: false,
                auto,
            }),
        );
        Ok(id)
    }

    /// A nested HWPT under vIOMMU `cmd.pt_id` (`arm_vsmmu_alloc_domain_nested`): flags
    /// other than FAULT_ID_VALID EOPNOTSUPP, and no fault queue exists on this file, so
    /// FAULT_ID_VALID is ENOENT; data of type ARM_SMMUV3 (NONE: EINVAL, another:
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
        let known = std::mem::size_of::<IommuHwptArmSmmuv3>();
        let len = cmd.data_len as usize;
        if len < known {
            return Err(IommufdError::invalid(
                WHAT,
                "data_len below iommu_hwpt_arm_smmuv3",
            ));
        }
        let bytes = copy_from_user(self.smmu.frames().memory(), cmd.data_uptr, len)?;
        if bytes[known..].iter().any(|&b| b != 0) {
            return Err(UapiError::TrailingBytes {
                what: WHAT,
                size: cmd.data_len,
                known,
            }
            .into());
        }
        if cmd.flags & IOMMU_HWPT_FAULT_ID_VALID != 0 {
            return Err(no_object(cmd.fault_id, "fault queue"));
        }
        let data: IommuHwptArmSmmuv3 = read_prefix(&bytes, known);
        let (vste, ats) = validate_vste(data.ste)?;
        let parent = self
            .domain_of_viommu(cmd.pt_id)
            .ok_or(no_object(cmd.pt_id, "vIOMMU"))?;
        physical_ste(&parent.domain, &vste, ats, self.smmu.features())?;
        let id = self.next_id()?;
        self.objects.insert(
            id,
            Object::HwptNested(HwptNested {
                viommu: cmd.pt_id,
                vste,
                ats,
            }),
        );
        Ok(id)
    }

    fn domain_of_viommu(&self, viommu: u32) -> Option<&HwptPaging> {
        match self.objects.get(&viommu)? {
            Object::Viommu(v) => self.paging(v.parent),
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
        let f = self.smmu.features();
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
            Object::Viommu(Viommu {
                parent: cmd.hwpt_id,
                events: Arc::default(),
            }),
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
            Some(Object::Viommu(_)) => {}
            _ => return Err(no_object(cmd.viommu_id, "vIOMMU")),
        }
        self.device(cmd.dev_id)?;
        let taken = self.objects.values().any(|o| {
            matches!(o, Object::Vdevice(v) if v.viommu == cmd.viommu_id
                && (v.virt_id == cmd.virt_id || v.dev == cmd.dev_id))
        });
        if taken {
            return Err(IommufdError::Exists("vDEVICE"));
        }
        let id = self.next_id()?;
        self.objects.insert(
            id,
            Object::Vdevice(Vdevice {
                viommu: cmd.viommu_id,
                dev: cmd.dev_id,
                virt_id: cmd.virt_id,
            }),
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
    /// `entry_num` returns how many were. `entry_num` 0 probes the type.
    fn do_hwpt_invalidate(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuHwptInvalidate = u.copy_in(arg)?;
        let mut done = 0u32;
        let result = self.invalidate_array(&cmd, &mut done);
        cmd.entry_num = done;
        u.respond(&cmd, arg);
        result
    }

    fn invalidate_array(
        &self,
        cmd: &IommuHwptInvalidate,
        done: &mut u32,
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_invalidate";
        if cmd.__reserved != 0 {
            return Err(IommufdError::not_supported(WHAT, "reserved field"));
        }
        if cmd.entry_num != 0 && (cmd.data_uptr == 0 || cmd.entry_len == 0) {
            return Err(IommufdError::invalid(
                WHAT,
                "entries without a pointer or length",
            ));
        }
        let parent = match self.objects.get(&cmd.hwpt_id) {
            None => return Err(no_object(cmd.hwpt_id, "HWPT or vIOMMU")),
            Some(Object::Viommu(v)) => self
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
            self.smmu.frames().memory(),
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
        let f = self.smmu.features();
        let cmd =
            Cmd::decode(raw, f).map_err(|e| IommufdError::io(WHAT, format!("{raw:#x?}: {e}")))?;
        let psid = |vsid: u32| {
            self.objects
                .values()
                .find_map(|o| match o {
                    Object::Vdevice(v) if v.viommu == viommu && v.virt_id == u64::from(vsid) => {
                        match self.objects.get(&v.dev) {
                            Some(Object::Device(d)) => Some(d.sid),
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
    /// type ARM_SMMUV3 (an input type other than DEFAULT or ARM_SMMUV3, unknown flags or
    /// reserved bytes: EOPNOTSUPP), the SubstreamID width as `out_max_pasid_log2`, no
    /// capabilities (dirty tracking is not offered on the SMMU file).
    fn do_get_hw_info(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hw_info";
        let mut cmd: IommuHwInfo = u.copy_in(arg)?;
        if cmd.flags & !IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0 || cmd.__reserved != [0; 3] {
            return Err(IommufdError::not_supported(WHAT, "flags or reserved"));
        }
        self.device(cmd.dev_id)?;
        let asked = hw_info_data_type(&cmd);
        if cmd.flags & IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0
            && asked != IOMMU_HW_INFO_TYPE_DEFAULT
            && asked != IOMMU_HW_INFO_TYPE_ARM_SMMUV3
        {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("data type {asked}"),
            ));
        }
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
        let image = data.to_bytes();
        let mut out = vec![0u8; cmd.data_len as usize];
        let n = out.len().min(image.len());
        out[..n].copy_from_slice(&image[..n]);
        copy_to_user(self.smmu.frames().memory(), cmd.data_uptr, &out)?;
        let data_uptr = cmd.data_uptr;
        cmd = hw_info(
            cmd.size,
            cmd.flags,
            cmd.dev_id,
            IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
        );
        cmd.data_uptr = data_uptr;
        cmd.data_len = image.len() as u32;
        cmd.out_max_pasid_log2 = self.smmu.features().ssid_bits;
        u.respond(&cmd, arg);
        Ok(())
    }

    // ----- Devices (called by the device cdev) -----

    fn bind_device(&mut self, sid: SourceId) -> Result<u32, IommufdError> {
        let sid = u32::from(sid.rid());
        if self
            .objects
            .values()
            .any(|o| matches!(o, Object::Device(d) if d.sid == sid))
        {
            return Err(IommufdError::Busy("the device is bound already"));
        }
        let id = self.next_id()?;
        self.objects
            .insert(id, Object::Device(Device { sid, hwpt: None }));
        Ok(id)
    }

    /// Unbinds a device: detached, its vDEVICEs gone with it (the kernel's tombstone: a
    /// later `IOMMU_DESTROY` of their ids is ENOENT), its object removed.
    fn unbind_device(&mut self, dev_id: u32) {
        if self.detach(dev_id).is_err() {
            return;
        }
        self.objects
            .retain(|_, o| !matches!(o, Object::Vdevice(v) if v.dev == dev_id));
        self.objects.remove(&dev_id);
    }

    /// Attaches (or replaces) device `dev_id`'s STE to `pt_id` (`arm_smmu_attach_dev`,
    /// `arm_smmu_attach_dev_nested`): an IOAS (an automatic paging HWPT of it found or
    /// made) or a paging HWPT: stage 2 alone; a nested HWPT: the STE
    /// [`physical_ste`] builds, which for a translating guest STE needs a vDEVICE of the
    /// device in the HWPT's vIOMMU (ENOENT). Anything else EINVAL. Within one stage-2
    /// domain the STE is rewritten in place; across domains the stream leaves the old one
    /// (aborting meanwhile) and, if the new one refuses it, goes back. Returns the HWPT
    /// id; a refused attach leaves the device where it was.
    fn attach(&mut self, dev_id: u32, pt_id: u32) -> Result<u32, IommufdError> {
        const WHAT: &str = "attach";
        let dev = self.device(dev_id)?;
        let (sid, old) = (dev.sid, dev.hwpt);
        let mut made = None;
        let hwpt = match self.objects.get(&pt_id) {
            None => return Err(no_object(pt_id, "page table")),
            Some(Object::Ioas(_)) => {
                let found = self.objects.iter().find_map(|(&id, o)| match o {
                    Object::HwptPaging(h) if h.ioas == pt_id && h.auto => Some(id),
                    _ => None,
                });
                match found {
                    Some(id) => id,
                    None => {
                        let id = self.build_paging(pt_id, true)?;
                        made = Some(id);
                        id
                    }
                }
            }
            Some(Object::HwptPaging(_) | Object::HwptNested(_)) => pt_id,
            Some(o) => {
                return Err(IommufdError::WrongType {
                    id: pt_id,
                    is: o.kind(),
                    what: WHAT,
                })
            }
        };
        let result = self.point_stream(dev_id, sid, old, hwpt);
        if let Err(e) = result {
            if let Some(id) = made {
                self.remove_object(id);
            }
            return Err(e);
        }
        if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
            d.hwpt = Some(hwpt);
        }
        self.update_vmaster(dev_id);
        if let Some(o) = old.filter(|&o| o != hwpt) {
            self.drop_auto(o);
        }
        Ok(hwpt)
    }

    /// The physical STE of HWPT `hwpt` for device `dev_id`, and whether it nests.
    fn ste_of(&self, dev_id: u32, hwpt: u32) -> Result<(Option<Ste>, bool), IommufdError> {
        match self.objects.get(&hwpt) {
            Some(Object::HwptPaging(h)) => Ok((Some(h.domain.s2_ste()), false)),
            Some(Object::HwptNested(n)) => {
                let cfg = vste_config(&n.vste);
                let has_vdev = self.objects.values().any(
                    |o| matches!(o, Object::Vdevice(v) if v.viommu == n.viommu && v.dev == dev_id),
                );
                if cfg == Some(Config::S1Trans) && !has_vdev {
                    return Err(no_object(n.viommu, "vDEVICE of the device in the vIOMMU"));
                }
                let parent = self
                    .domain_of_viommu(n.viommu)
                    .ok_or(no_object(n.viommu, "vIOMMU"))?;
                let ste = physical_ste(&parent.domain, &n.vste, n.ats, self.smmu.features())?;
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
                d.hwpt = None;
            }
            self.update_vmaster(dev_id);
            if let Some(o) = old {
                self.drop_auto(o);
            }
        }
        Err(e.into())
    }

    /// Destroys an automatic HWPT no device uses any more.
    fn drop_auto(&mut self, id: u32) {
        let auto = matches!(self.objects.get(&id), Some(Object::HwptPaging(h)) if h.auto);
        if auto && self.users(id) == 0 {
            self.remove_object(id);
        }
    }

    /// Detaches device `dev_id` (ENOENT for an unknown device; one not attached is left
    /// alone): its stream aborts.
    fn detach(&mut self, dev_id: u32) -> Result<(), IommufdError> {
        let dev = self.device(dev_id)?;
        let (sid, hwpt) = (dev.sid, dev.hwpt);
        let Some(h) = hwpt else {
            return Ok(());
        };
        if let Some(p) = self.domain_of(h).and_then(|d| self.paging_mut(d)) {
            p.domain.release(sid);
        }
        if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
            d.hwpt = None;
        }
        self.update_vmaster(dev_id);
        self.drop_auto(h);
        Ok(())
    }
}

impl Drop for SmmuCtx {
    /// Closing the file destroys every object: devices detach, then the rest goes (each
    /// stage-2 domain invalidates its VMID and frees its tables).
    fn drop(&mut self) {
        let devices: Vec<u32> = self
            .objects
            .iter()
            .filter_map(|(&id, o)| matches!(o, Object::Device(_)).then_some(id))
            .collect();
        for d in devices {
            self.unbind_device(d);
        }
    }
}

/// One open `/dev/iommu` on an SMMU.
#[derive(Debug)]
pub struct SmmuIommufdFile {
    ctx: Mutex<SmmuCtx>,
}

impl SmmuIommufdFile {
    /// Opens `/dev/iommu` on the SMMU `smmu`, outside any fd table (it cannot hand out
    /// vEVENT queue fds: `IOMMU_VEVENTQ_ALLOC` is EMFILE).
    pub fn open(smmu: &Arc<SmmuHost>) -> Arc<Self> {
        Self::open_in(smmu, Weak::new())
    }

    /// Opens `/dev/iommu` on the SMMU `smmu` in the fd table `fds`.
    pub(crate) fn open_in(smmu: &Arc<SmmuHost>, fds: Weak<Iommufds>) -> Arc<Self> {
        Arc::new(SmmuIommufdFile {
            ctx: Mutex::new(SmmuCtx {
                smmu: smmu.clone(),
                objects: BTreeMap::new(),
                fds,
            }),
        })
    }

    /// The context, for the host side (diagnostics, tests).
    pub fn lock(&self) -> MutexGuard<'_, SmmuCtx> {
        self.ctx.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl BindTarget for SmmuIommufdFile {
    fn bind_device(&self, sid: SourceId) -> Result<u32, IommufdError> {
        self.lock().bind_device(sid)
    }

    fn unbind_device(&self, dev_id: u32) {
        self.lock().unbind_device(dev_id);
    }

    /// A PASID attach is EOPNOTSUPP: on the SMMU the guest owns the CD table, whose
    /// SubstreamIDs come with the nested STE.
    fn attach(&self, dev_id: u32, pasid: Option<u32>, pt_id: u32) -> Result<u32, IommufdError> {
        if pasid.is_some() {
            return Err(IommufdError::not_supported(
                "PASID attach",
                "the guest's CD table holds the SubstreamIDs",
            ));
        }
        self.lock().attach(dev_id, pt_id)
    }

    fn detach(&self, dev_id: u32, pasid: Option<u32>) -> Result<(), IommufdError> {
        if pasid.is_some() {
            return Err(IommufdError::not_supported(
                "PASID detach",
                "the guest's CD table holds the SubstreamIDs",
            ));
        }
        self.lock().detach(dev_id)
    }
}

impl UapiFile for SmmuIommufdFile {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        self.lock().ioctl(cmd, arg).map(|()| 0).map_err(|e| {
            tracing::debug!("smmuv3 iommufd ioctl: {e}");
            Errno::from(&e)
        })
    }

    /// `/dev/iommu` has no `read`.
    fn read(&self, _buf: &mut [u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// `/dev/iommu` has no `write`.
    fn write(&self, _buf: &[u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// Nothing is queued on `/dev/iommu` itself.
    fn set_event_notifier(&self, _notifier: Option<Arc<dyn EventNotifier>>) {}
}
