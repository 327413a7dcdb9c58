//! The vSMMU's host calls over iommufd on an SMMUv3 host, in the sequence QEMU's
//! `smmuv3-accel` and Linux's `arm-smmu-v3-iommufd.c` expect of a VMM:
//! - one IOAS holding guest RAM (IPA = IOVA); with the first passthrough device, a
//!   nest-parent paging HWPT of it (`IOMMU_HWPT_ALLOC_NEST_PARENT`: the VM's stage 2), an
//!   `IOMMU_VIOMMU_TYPE_ARM_SMMUV3` vIOMMU over that parent and its vEVENT queue
//!   (`IOMMU_VEVENTQ_TYPE_ARM_SMMUV3`);
//! - per device ([`SmmuIommufdDevice`]): its VFIO cdev bound to the iommufd, its STE on
//!   the nest parent, a vDEVICE whose virtual StreamID is the guest's StreamID;
//! - a guest STE: a nested HWPT under the vIOMMU carrying STE words 0 and 1
//!   (`IOMMU_HWPT_DATA_ARM_SMMUV3`, the fields a VM may set, IHI 0070 §5.2), attached to
//!   the device over the one before (the kernel's replace), which is then destroyed;
//! - guest commands that invalidate stage 1, the CD cache or the ATC: arrays of 16-byte
//!   commands given to `IOMMU_HWPT_INVALIDATE` on the vIOMMU, which replaces the VMID and
//!   turns vSIDs into StreamIDs; the answer's `entry_num` says how many were carried out;
//! - events of the VM's streams: read from the vEVENT queue (header and 32-byte record,
//!   StreamID already the vSID);
//! - page requests: a fault queue made with the vIOMMU, named by every nested HWPT
//!   (`IOMMU_HWPT_FAULT_ID_VALID`); its groups are read with their devices and the guest's
//!   CMD_PRI_RESP goes back with the group's cookie (the same [`FaultQueue`] as the
//!   virtual VT-d's).

use std::fmt;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use vsva_smmuv3::ste::Config;
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{
    error::Errno, file::arm_smmuv3_commands, file::HwptData, file::IommufdIoctls, file::UapiFile,
    file::UserArray,
};

use vsva_uapi::request::{PageRequest, PageResponse};
use vsva_vtd::addr::SourceId;

use crate::iommufd::{invalidate_arrays, FaultQueue, UserBuffer};
use crate::viommu::lock;

/// Depth of the vEVENT queue.
const VEVENTQ_DEPTH: u32 = 64;
/// Size of a vEVENT header.
const HEADER: usize = size_of::<IommufdVeventHeader>();
/// Size of an SMMUv3 vEVENT.
const EVENT: usize = size_of::<IommuVeventArmSmmuv3>();

// The STE fields a VM may set in a nested HWPT (IHI 0070 §5.2; Linux's
// `STRTAB_STE_0_NESTING_ALLOWED` and `STRTAB_STE_1_NESTING_ALLOWED`).
const STE0_V: u64 = 1;
const STE0_CFG_SHIFT: u32 = 1;
/// V, Config, S1Fmt, S1ContextPtr, S1CDMax.
const STE0_ALLOWED: u64 = STE0_V
    | 0b111 << STE0_CFG_SHIFT
    | 0b11 << 4
    | (((1 << 52) - 1) & !((1 << 6) - 1))
    | 0b1_1111 << 59;
/// S1DSS, S1CIR, S1COR, S1CSH, S1STALLD, EATS.
const STE1_ALLOWED: u64 = 0b11 | 0b11 << 2 | 0b11 << 4 | 0b11 << 6 | 1 << 27 | 0b11 << 28;

/// The STE words of a nested HWPT that aborts every transaction (V = 0).
pub const VSTE_ABORT: [u64; 2] = [0, 0];
/// The STE words of a nested HWPT that bypasses stage 1 (stage 2 alone).
pub const VSTE_BYPASS: [u64; 2] = [STE0_V | (Config::Bypass as u64) << STE0_CFG_SHIFT, 0];

/// Words 0 and 1 of a guest STE as a nested HWPT carries them: the fields a VM may set.
pub fn nested_ste(words: &[u64; 8]) -> [u64; 2] {
    [words[0] & STE0_ALLOWED, words[1] & STE1_ALLOWED]
}

/// What a vEVENT queue gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vevent {
    /// An SMMUv3 event record of a stream of the vIOMMU, StreamID = the vSID.
    Event([u64; 4]),
    /// Events were lost after the queue filled (`IOMMU_VEVENTQ_FLAG_LOST_EVENTS`).
    Lost,
}

/// The objects made with the first device: nest parent, vIOMMU, vEVENT queue, fault
/// queue.
struct Viommu {
    parent: u32,
    id: u32,
    veventq_id: u32,
    veventq_fd: i32,
    veventq: Arc<dyn UapiFile>,
    fault: FaultQueue,
}

/// One VM's `/dev/iommu` on an SMMUv3 host: its IOAS of guest RAM, its vIOMMU, and the
/// buffer its pointer arguments go through.
pub struct SmmuIommufd {
    file: Arc<dyn UapiFile>,
    fd: i32,
    ioas: u32,
    /// Serialises the use of the buffer (a structure written, then the ioctl reading it).
    scratch: Mutex<UserBuffer>,
    viommu: Mutex<Option<Viommu>>,
}

impl fmt::Debug for SmmuIommufd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmmuIommufd")
            .field("fd", &self.fd)
            .field("ioas", &self.ioas)
            .field("viommu", &self.viommu_id())
            .finish_non_exhaustive()
    }
}

impl SmmuIommufd {
    /// An IOAS (`IOMMU_IOAS_ALLOC`) on the open iommufd `file` (fd number `fd`).
    pub fn open(file: Arc<dyn UapiFile>, fd: i32, scratch: UserBuffer) -> Result<Arc<Self>, Errno> {
        let ioas = file.ioas_alloc()?;
        Ok(Arc::new(SmmuIommufd {
            file,
            fd,
            ioas,
            scratch: Mutex::new(scratch),
            viommu: Mutex::new(None),
        }))
    }

    /// `/dev/iommu` itself.
    pub fn file(&self) -> Arc<dyn UapiFile> {
        self.file.clone()
    }

    /// The IOAS id.
    pub fn ioas(&self) -> u32 {
        self.ioas
    }

    /// The vIOMMU id, once a device made it.
    pub fn viommu_id(&self) -> Option<u32> {
        lock(&self.viommu).as_ref().map(|v| v.id)
    }

    /// The nest-parent HWPT, once a device made it.
    pub fn parent(&self) -> Option<u32> {
        lock(&self.viommu).as_ref().map(|v| v.parent)
    }

    /// The vEVENT queue's fd number, once a device made it.
    pub fn veventq_fd(&self) -> Option<i32> {
        lock(&self.viommu).as_ref().map(|v| v.veventq_fd)
    }

    /// The fault queue's fd number, once a device made it.
    pub fn fault_fd(&self) -> Option<i32> {
        lock(&self.viommu).as_ref().map(|v| v.fault.fd())
    }

    /// `IOMMU_IOAS_MAP` of the VMM's memory at `user_va` at IOVA `iova`, readable and
    /// writeable (guest RAM at its IPA).
    pub fn map(&self, user_va: u64, length: u64, iova: u64) -> Result<(), Errno> {
        self.file
            .ioas_map(self.ioas, IOMMU_IOAS_MAP_FLAGS, user_va, length, iova)
            .map(drop)
    }

    /// Binds the device of VFIO cdev `cdev` (`VFIO_DEVICE_BIND_IOMMUFD`), attaches its STE
    /// to the nest parent (stage 2 alone) and gives it the virtual StreamID `vsid` in the
    /// vIOMMU (`IOMMU_VDEVICE_ALLOC`). The first device also makes the nest parent, the
    /// vIOMMU, its vEVENT queue and a fault queue, whose fd numbers `open_fd` resolves to
    /// their files (EBADF if it does not). On failure what this call made is destroyed (closing the cdev
    /// unbinds the device).
    pub fn attach_device(
        self: &Arc<Self>,
        cdev: Arc<dyn UapiFile>,
        vsid: u32,
        open_fd: &dyn Fn(i32) -> Option<Arc<dyn UapiFile>>,
    ) -> Result<Arc<SmmuIommufdDevice>, Errno> {
        let dev_id = cdev.device_bind_iommufd(self.fd)?;
        self.attach_bound(cdev, dev_id, vsid, open_fd)
    }

    /// [`SmmuIommufd::attach_device`] for a device bound already, as device `dev_id`
    /// (over `vsva host`, `DEVICE_ADD` binds it; `cdev` is then the connection, which
    /// takes the cdev's attach and detach ioctls).
    pub fn attach_bound(
        self: &Arc<Self>,
        cdev: Arc<dyn UapiFile>,
        dev_id: u32,
        vsid: u32,
        open_fd: &dyn Fn(i32) -> Option<Arc<dyn UapiFile>>,
    ) -> Result<Arc<SmmuIommufdDevice>, Errno> {
        let mut viommu = lock(&self.viommu);
        let made = viommu.is_none();
        if made {
            *viommu = Some(self.make_viommu(dev_id, open_fd)?);
        }
        let Some(v) = viommu.as_ref() else {
            return Err(Errno::EIO);
        };
        let (parent, viommu_id) = (v.parent, v.id);
        let undo = |viommu: &mut Option<Viommu>| {
            if made {
                if let Some(v) = viommu.take() {
                    self.destroy_viommu(v);
                }
            }
        };
        if let Err(e) = cdev.device_attach_pt(parent, None) {
            undo(&mut viommu);
            return Err(e);
        }
        let vdevice = match self.file.vdevice_alloc(viommu_id, dev_id, vsid.into()) {
            Ok(id) => id,
            Err(e) => {
                let _ = cdev.device_detach_pt(None);
                undo(&mut viommu);
                return Err(e);
            }
        };
        Ok(Arc::new(SmmuIommufdDevice {
            fd: self.clone(),
            cdev,
            dev_id,
            vsid,
            vdevice,
            nested: Mutex::new(None),
        }))
    }

    /// The nest parent of the IOAS, the vIOMMU over it, its vEVENT queue and the fault
    /// queue, made for device `dev_id`; on failure nothing is left.
    fn make_viommu(
        &self,
        dev_id: u32,
        open_fd: &dyn Fn(i32) -> Option<Arc<dyn UapiFile>>,
    ) -> Result<Viommu, Errno> {
        let parent = self.file.hwpt_alloc(
            dev_id,
            self.ioas,
            IOMMU_HWPT_ALLOC_NEST_PARENT,
            HwptData::NONE,
            0,
        )?;
        let id = match self
            .file
            .viommu_alloc(dev_id, parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
        {
            Ok(id) => id,
            Err(e) => {
                let _ = self.file.destroy(parent);
                return Err(e);
            }
        };
        let queue = self
            .file
            .veventq_alloc(id, IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, VEVENTQ_DEPTH)
            .and_then(|(qid, qfd)| {
                let file = open_fd(qfd);
                if file.is_none() {
                    let _ = self.file.destroy(qid);
                }
                Ok(((qid, qfd), file.ok_or(Errno::EBADF)?))
            });
        let made = queue.and_then(|(q, veventq)| {
            FaultQueue::alloc(&*self.file, open_fd)
                .inspect_err(|_| {
                    let _ = self.file.destroy(q.0);
                })
                .map(|fault| (q, veventq, fault))
        });
        match made {
            Ok(((veventq_id, veventq_fd), veventq, fault)) => Ok(Viommu {
                parent,
                id,
                veventq_id,
                veventq_fd,
                veventq,
                fault,
            }),
            Err(e) => {
                let _ = self.file.destroy(id);
                let _ = self.file.destroy(parent);
                Err(e)
            }
        }
    }

    fn destroy_viommu(&self, v: Viommu) {
        for id in [v.fault.id(), v.veventq_id, v.id, v.parent] {
            if let Err(e) = self.file.destroy(id) {
                tracing::warn!("vSMMU iommufd: destroying object {id}: {e}");
            }
        }
    }

    /// `IOMMU_HWPT_INVALIDATE` of `cmds` on the vIOMMU, as one array (as many as the
    /// buffer needs): `Ok(())`, or the index of the command the host refused and its
    /// errno (those before it were carried out, those after it were not). ENOENT without
    /// a vIOMMU.
    pub fn invalidate(&self, cmds: &[[u64; 2]]) -> Result<(), (usize, Errno)> {
        let Some(viommu) = self.viommu_id() else {
            return Err((0, Errno::ENOENT));
        };
        invalidate_arrays(
            &*self.file,
            &lock(&self.scratch),
            viommu,
            cmds,
            arm_smmuv3_commands,
            UserArray::arm_smmuv3,
        )
    }

    /// Every whole page request group queued on the fault queue (nothing before the first
    /// device), as `FaultQueue::read_page_requests` reads them.
    pub fn read_page_requests(&self) -> Result<Vec<(SourceId, PageRequest)>, Errno> {
        match lock(&self.viommu).as_ref() {
            Some(v) => v.fault.read_page_requests(),
            None => Ok(Vec::new()),
        }
    }

    /// The guest's answer to a group of device `sid`, as [`FaultQueue::respond`] sends it
    /// (ENOENT before the first device).
    pub(crate) fn respond(&self, sid: SourceId, resp: &PageResponse) -> Result<(), Errno> {
        match lock(&self.viommu).as_ref() {
            Some(v) => v.fault.respond(sid, resp),
            None => Err(Errno::ENOENT),
        }
    }

    /// Everything queued on the vEVENT queue (nothing before the first device). A record
    /// cut short is EIO.
    pub fn read_events(&self) -> Result<Vec<Vevent>, Errno> {
        let Some(queue) = lock(&self.viommu).as_ref().map(|v| v.veventq.clone()) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut buf = [0u8; (HEADER + EVENT) * 16];
        loop {
            let n = match queue.read(&mut buf) {
                Ok(0) | Err(Errno::EAGAIN) => return Ok(out),
                Ok(n) => n,
                Err(e) => return Err(e),
            };
            let mut at = 0;
            while at < n {
                let head = buf.get(at..at + HEADER).ok_or(Errno::EIO)?;
                let h: IommufdVeventHeader = read_prefix(head, HEADER);
                at += HEADER;
                if h.flags & IOMMU_VEVENTQ_FLAG_LOST_EVENTS != 0 {
                    out.push(Vevent::Lost);
                    continue;
                }
                let data = buf.get(at..at + EVENT).ok_or(Errno::EIO)?;
                let e: IommuVeventArmSmmuv3 = read_prefix(data, EVENT);
                out.push(Vevent::Event(e.evt));
                at += EVENT;
            }
        }
    }
}

impl Drop for SmmuIommufd {
    /// The vEVENT queue, vIOMMU, nest parent and IOAS go (every device has gone: each
    /// holds this).
    fn drop(&mut self) {
        if let Some(v) = lock(&self.viommu).take() {
            self.destroy_viommu(v);
        }
        let _ = self.file.destroy(self.ioas);
    }
}

/// One passthrough device on the VM's iommufd: its cdev, device id, vDEVICE, and the
/// nested HWPT its STE comes from with the STE words it carries.
pub struct SmmuIommufdDevice {
    fd: Arc<SmmuIommufd>,
    cdev: Arc<dyn UapiFile>,
    dev_id: u32,
    vsid: u32,
    vdevice: u32,
    nested: Mutex<Option<(u32, [u64; 2])>>,
}

impl fmt::Debug for SmmuIommufdDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmmuIommufdDevice")
            .field("dev_id", &self.dev_id)
            .field("vsid", &self.vsid)
            .field("vdevice", &self.vdevice)
            .field("nested", &*lock(&self.nested))
            .finish_non_exhaustive()
    }
}

impl SmmuIommufdDevice {
    /// The VM's iommufd.
    pub fn iommufd(&self) -> &Arc<SmmuIommufd> {
        &self.fd
    }

    /// The device id in the iommufd.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The virtual StreamID of its vDEVICE.
    pub fn vsid(&self) -> u32 {
        self.vsid
    }

    /// The vDEVICE id.
    pub fn vdevice(&self) -> u32 {
        self.vdevice
    }

    /// The device's page requests come from host device `sid` (what the fault queue's
    /// records name it by).
    pub(crate) fn serve_page_requests(&self, sid: SourceId) {
        if let Some(v) = lock(&self.fd.viommu).as_ref() {
            v.fault.add_device(self.dev_id, sid);
        }
    }

    /// The nested HWPT the device's STE comes from and its STE words (`None`: the nest
    /// parent, stage 2 alone).
    pub fn nested(&self) -> Option<(u32, [u64; 2])> {
        *lock(&self.nested)
    }

    /// Makes the device's STE the guest STE words `vste`: a nested HWPT carrying them
    /// (`IOMMU_HWPT_ALLOC` under the vIOMMU, its page requests to the fault queue),
    /// attached over the current one, which is then destroyed. Nothing is done when the words are those attached; a refused
    /// allocation or attach leaves the device as it was.
    pub fn set_vste(&self, vste: [u64; 2]) -> Result<(), Errno> {
        let mut nested = lock(&self.nested);
        if nested.is_some_and(|(_, v)| v == vste) {
            return Ok(());
        }
        let (viommu, fault_id) = lock(&self.fd.viommu)
            .as_ref()
            .map(|v| (v.id, v.fault.id()))
            .ok_or(Errno::ENOENT)?;
        let hwpt = {
            let scratch = lock(&self.fd.scratch);
            let data_uptr = scratch.put(&IommuHwptArmSmmuv3 { ste: vste }.to_bytes())?;
            self.fd.file.hwpt_alloc(
                self.dev_id,
                viommu,
                IOMMU_HWPT_FAULT_ID_VALID,
                HwptData::arm_smmuv3(data_uptr),
                fault_id,
            )?
        };
        if let Err(e) = self.cdev.device_attach_pt(hwpt, None) {
            let _ = self.fd.file.destroy(hwpt);
            return Err(e);
        }
        if let Some((old, _)) = nested.replace((hwpt, vste)) {
            if let Err(e) = self.fd.file.destroy(old) {
                tracing::warn!("vSMMU iommufd: destroying replaced HWPT {old}: {e}");
            }
        }
        Ok(())
    }

    /// Attaches the device's STE to the nest parent (stage 2 alone) and destroys its
    /// nested HWPT.
    pub fn stage2(&self) -> Result<(), Errno> {
        let mut nested = lock(&self.nested);
        let Some((hwpt, _)) = *nested else {
            return Ok(());
        };
        let parent = self.fd.parent().ok_or(Errno::ENOENT)?;
        self.cdev.device_attach_pt(parent, None)?;
        *nested = None;
        self.fd.file.destroy(hwpt)
    }
}

impl Drop for SmmuIommufdDevice {
    /// The STE is detached, then its nested HWPT and the vDEVICE are destroyed.
    fn drop(&mut self) {
        let _ = self.cdev.device_detach_pt(None);
        if let Some(v) = lock(&self.fd.viommu).as_ref() {
            v.fault.remove_device(self.dev_id);
        }
        if let Some((hwpt, _)) = lock(&self.nested).take() {
            let _ = self.fd.file.destroy(hwpt);
        }
        let _ = self.fd.file.destroy(self.vdevice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_smmuv3::{features::Features, ste::Ste};

    #[test]
    fn nested_ste_keeps_only_the_fields_a_vm_may_set() {
        let f = Features::VSVA;
        let mut ste = Ste::new(Config::S1Trans);
        ste.s1_context_ptr = 0x8_0000;
        ste.s1cdmax = 4;
        ste.s1csh = 3;
        ste.s2vmid = 7;
        let words = ste.encode();
        let v = nested_ste(&words);
        assert_eq!(
            v,
            [words[0], words[1]],
            "V, Config, S1ContextPtr, S1CDMax, S1CSH kept"
        );
        let back = Ste::decode(&[v[0], v[1], 0, 0, 0, 0, 0, 0], &f).unwrap();
        assert_eq!(
            (back.s1_context_ptr, back.s1cdmax, back.s1csh),
            (0x8_0000, 4, 3)
        );
        let mut bad = words;
        bad[0] |= 0b111_1111 << 52;
        bad[1] |= 1 << 8 | 1 << 30;
        assert_eq!(
            nested_ste(&bad),
            v,
            "fields outside the allowed ones dropped"
        );
        assert_eq!(VSTE_BYPASS[0] >> 1 & 0b111, 0b100);
    }
}
