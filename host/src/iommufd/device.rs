//! A VFIO device cdev (`/dev/vfio/devices/vfioN`, `drivers/vfio/device_cdev.c`): the
//! device's file, through which a VMM binds the device to an iommufd
//! (`VFIO_DEVICE_BIND_IOMMUFD`, by fd number) and attaches it to a page table
//! (`VFIO_DEVICE_ATTACH_IOMMUFD_PT` / `DETACH`). Closing the cdev unbinds the device.
//!
//! [`Iommufds`] is the VMM process's table of open `/dev/iommu` files by fd number, which
//! `VFIO_DEVICE_BIND_IOMMUFD` resolves its `iommufd` field through (`fdget`). A file is
//! on the host's VT-d unit ([`IommufdFile`]) or on its SMMUv3 ([`SmmuIommufdFile`]); the
//! cdev drives either through `BindTarget`.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_uapi::iommufd::*;
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};
use vsva_vtd::addr::SourceId;

use super::fault::FaultFile;
use super::smmu::SmmuIommufdFile;
use super::vevent::VeventqFile;
use super::{IommufdError, IommufdFile};
use crate::driver::HostIommu;
use crate::error::HostError;
use crate::smmu::SmmuHost;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Who holds each device of one IOMMU, as VFIO keeps it: a cdev that bound it
/// (`vfio_device`'s `open_count` on the cdev path), or a VFIO type1 container its group
/// joined (the group file open, `group->opened_file`). The two paths exclude each other
/// (`vfio_device_block_group`): a cdev bind of a device a container holds is EBUSY, and so
/// is a container's attach of a device a cdev has bound (`vfio_group_fops_open` while
/// `cdev_device_open_cnt` is not zero). `vfio_df_open` lets a device be opened through one
/// cdev file at a time, so a second bind, to whichever iommufd, is EINVAL until the first
/// cdev unbinds.
#[derive(Debug, Default)]
pub struct OpenDevices {
    held: Mutex<BTreeMap<SourceId, Holder>>,
}

/// Which path holds a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// A VFIO cdev bound it to an iommufd.
    Cdev,
    /// A VFIO type1 container has it attached.
    Container,
}

impl OpenDevices {
    /// Opens device `sid` through a cdev: EBUSY while a type1 container holds it, EINVAL
    /// while a cdev has it open.
    pub(crate) fn open(&self, sid: SourceId) -> Result<(), IommufdError> {
        let mut held = lock(&self.held);
        match held.get(&sid) {
            Some(Holder::Container) => Err(IommufdError::Busy(
                "the device's group is in use by a VFIO type1 container",
            )),
            Some(Holder::Cdev) => Err(IommufdError::invalid(
                "vfio_device_bind_iommufd",
                "the device is open through another cdev",
            )),
            None => {
                held.insert(sid, Holder::Cdev);
                Ok(())
            }
        }
    }

    /// Closes device `sid`'s cdev.
    pub(crate) fn close(&self, sid: SourceId) {
        let mut held = lock(&self.held);
        if held.get(&sid) == Some(&Holder::Cdev) {
            held.remove(&sid);
        }
    }

    /// Claims device `sid` for a type1 container about to attach it: EBUSY while a cdev
    /// has it bound. `Ok(false)` when a container holds it already (the driver refuses
    /// the attach then), `Ok(true)` when this call claimed it.
    pub(crate) fn claim_for_container(&self, sid: SourceId) -> Result<bool, HostError> {
        let mut held = lock(&self.held);
        match held.get(&sid) {
            Some(Holder::Cdev) => Err(HostError::DeviceOpenedByCdev(sid)),
            Some(Holder::Container) => Ok(false),
            None => {
                held.insert(sid, Holder::Container);
                Ok(true)
            }
        }
    }

    /// Gives back a claim of [`OpenDevices::claim_for_container`] (the container detached
    /// the device, or its attach failed).
    pub(crate) fn release_from_container(&self, sid: SourceId) {
        let mut held = lock(&self.held);
        if held.get(&sid) == Some(&Holder::Container) {
            held.remove(&sid);
        }
    }
}

/// What a device cdev binds to: an open `/dev/iommu` (`iommufd_device_bind` and the
/// attach calls of `drivers/iommu/iommufd/device.c`).
pub(crate) trait BindTarget: std::fmt::Debug + Send + Sync {
    /// Binds device `sid`; its device id.
    fn bind_device(&self, sid: SourceId) -> Result<u32, IommufdError>;
    /// Unbinds device `dev_id`: detached from everything, its object removed.
    fn unbind_device(&self, dev_id: u32);
    /// Attaches (or replaces) the RID, or `pasid`, of `dev_id` to `pt_id`; the HWPT id.
    fn attach(&self, dev_id: u32, pasid: Option<u32>, pt_id: u32) -> Result<u32, IommufdError>;
    /// Detaches the RID, or `pasid`, of `dev_id`.
    fn detach(&self, dev_id: u32, pasid: Option<u32>) -> Result<(), IommufdError>;
}

/// An open file of the table.
#[derive(Debug, Clone)]
enum Open {
    Iommufd(Arc<IommufdFile>),
    Smmu(Arc<SmmuIommufdFile>),
    Fault(Arc<FaultFile>),
    Vevent(Arc<VeventqFile>),
}

/// A process's open `/dev/iommu` files and fault queue files, by fd number.
#[derive(Debug, Default)]
pub struct Iommufds {
    files: Mutex<BTreeMap<i32, Open>>,
}

impl Iommufds {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Iommufds::default())
    }

    fn install(&self, file: Open) -> i32 {
        let mut files = lock(&self.files);
        let mut fd = 3;
        while files.contains_key(&fd) {
            fd += 1;
        }
        files.insert(fd, file);
        fd
    }

    /// Opens `/dev/iommu` on `unit`: the lowest free fd number from 3 and the file, which
    /// installs its fault queue files in this table.
    pub fn open(self: &Arc<Self>, unit: &Arc<HostIommu>) -> (i32, Arc<IommufdFile>) {
        let file = IommufdFile::open_in(unit, Arc::downgrade(self));
        (self.install(Open::Iommufd(file.clone())), file)
    }

    /// Opens `/dev/iommu` on the SMMU `smmu`: the lowest free fd number from 3 and the
    /// file.
    pub fn open_smmu(self: &Arc<Self>, smmu: &Arc<SmmuHost>) -> (i32, Arc<SmmuIommufdFile>) {
        let file = SmmuIommufdFile::open_in(smmu, Arc::downgrade(self));
        (self.install(Open::Smmu(file.clone())), file)
    }

    /// Installs a vEVENT queue file; its fd number.
    pub(crate) fn install_veventq(&self, file: Arc<VeventqFile>) -> i32 {
        self.install(Open::Vevent(file))
    }

    /// The vEVENT queue file open at `fd`.
    pub fn veventq(&self, fd: i32) -> Option<Arc<VeventqFile>> {
        match lock(&self.files).get(&fd) {
            Some(Open::Vevent(f)) => Some(f.clone()),
            _ => None,
        }
    }

    /// Installs a fault queue file; its fd number.
    pub(crate) fn install_fault(&self, file: Arc<FaultFile>) -> i32 {
        self.install(Open::Fault(file))
    }

    /// Closes fd `fd`; a file lives on while something else holds it (a device bound to
    /// an iommufd, a HWPT using a fault queue).
    pub fn close(&self, fd: i32) {
        lock(&self.files).remove(&fd);
    }

    /// The iommufd open at `fd` (`iommufd_ctx_from_fd`): EBADF when nothing is open
    /// there, EBADFD for another kind of file.
    fn get(&self, fd: i32) -> Result<Arc<dyn BindTarget>, IommufdError> {
        match lock(&self.files).get(&fd) {
            Some(Open::Iommufd(f)) => Ok(f.clone()),
            Some(Open::Smmu(f)) => Ok(f.clone()),
            Some(Open::Fault(_) | Open::Vevent(_)) => Err(IommufdError::NotIommufd(fd)),
            None => Err(IommufdError::BadFd(fd)),
        }
    }

    /// The fault queue file open at `fd`.
    pub fn fault(&self, fd: i32) -> Option<Arc<FaultFile>> {
        match lock(&self.files).get(&fd) {
            Some(Open::Fault(f)) => Some(f.clone()),
            _ => None,
        }
    }
}

/// The iommufd a device is bound to and its device id there.
#[derive(Debug)]
struct Binding {
    file: Arc<dyn BindTarget>,
    dev_id: u32,
}

/// One device's VFIO cdev.
#[derive(Debug)]
pub struct VfioDeviceFile {
    sid: SourceId,
    fds: Arc<Iommufds>,
    bound: Mutex<Option<Binding>>,
}

fn fail(what: &str, e: IommufdError) -> Errno {
    tracing::debug!("{what}: {e}");
    Errno::from(&e)
}

impl VfioDeviceFile {
    /// Opens the cdev of the device at `sid`, whose process resolves iommufd fd numbers
    /// through `fds`.
    pub fn open(sid: SourceId, fds: Arc<Iommufds>) -> Self {
        VfioDeviceFile {
            sid,
            fds,
            bound: Mutex::new(None),
        }
    }

    /// The device's requester id.
    pub fn sid(&self) -> SourceId {
        self.sid
    }

    /// The device id in the iommufd it is bound to.
    pub fn dev_id(&self) -> Option<u32> {
        lock(&self.bound).as_ref().map(|b| b.dev_id)
    }

    /// `VFIO_DEVICE_BIND_IOMMUFD` (`vfio_df_ioctl_bind_iommufd`): `argsz` must cover
    /// `out_devid`, flags must be 0 (the VF token is not offered) and `iommufd` not
    /// negative (EINVAL), an open fd (EBADF) of an iommufd (EBADFD); a bound cdev is
    /// EINVAL, and so is a device another cdev has bound (`vfio_df_open`), whichever
    /// iommufd it is bound to; a device a VFIO type1 container holds is EBUSY
    /// (`vfio_device_block_group`; checked once the iommufd names the IOMMU, so a bad fd
    /// is EBADF first). Writes back `out_devid`.
    fn bind(&self, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "vfio_device_bind_iommufd";
        let req: VfioDeviceBindIommufd = copy_vfio_arg(arg, BIND_IOMMUFD_MINSZ, WHAT)?;
        if req.flags != 0 || req.iommufd < 0 {
            return Err(IommufdError::invalid(WHAT, "flags or iommufd"));
        }
        let mut bound = lock(&self.bound);
        if bound.is_some() {
            return Err(IommufdError::invalid(WHAT, "the device is bound already"));
        }
        let file = self.fds.get(req.iommufd)?;
        let dev_id = file.bind_device(self.sid)?;
        *bound = Some(Binding { file, dev_id });
        let at = offset_of!(VfioDeviceBindIommufd, out_devid);
        arg[at..at + 4].copy_from_slice(&dev_id.to_le_bytes());
        Ok(())
    }

    fn binding(&self) -> Result<(Arc<dyn BindTarget>, u32), IommufdError> {
        lock(&self.bound)
            .as_ref()
            .map(|b| (b.file.clone(), b.dev_id))
            .ok_or_else(|| IommufdError::invalid("VFIO device", "not bound to an iommufd"))
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: flags other than ATTACH_PASID and a PASID flag
    /// whose `argsz` does not cover `pasid` are EINVAL. Like `vfio_iommufd_physical_
    /// pasid_attach_ioas`, attaching an attached PASID (or RID) replaces its page table.
    /// Writes back the HWPT id in `pt_id`.
    fn attach(&self, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "vfio_device_attach_iommufd_pt";
        let req: VfioDeviceAttachIommufdPt = copy_vfio_arg(arg, ATTACH_IOMMUFD_PT_MINSZ, WHAT)?;
        if req.flags & !VFIO_DEVICE_ATTACH_PASID != 0 {
            return Err(IommufdError::invalid(WHAT, "unknown flags"));
        }
        let pasid = req.flags & VFIO_DEVICE_ATTACH_PASID != 0;
        if pasid && (req.argsz as usize) < size_of::<VfioDeviceAttachIommufdPt>() {
            return Err(IommufdError::invalid(WHAT, "argsz does not cover pasid"));
        }
        let (file, dev_id) = self.binding()?;
        let hwpt = file.attach(dev_id, pasid.then_some(req.pasid), req.pt_id)?;
        let at = offset_of!(VfioDeviceAttachIommufdPt, pt_id);
        arg[at..at + 4].copy_from_slice(&hwpt.to_le_bytes());
        Ok(())
    }

    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT`.
    fn detach(&self, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "vfio_device_detach_iommufd_pt";
        let req: VfioDeviceDetachIommufdPt = copy_vfio_arg(arg, DETACH_IOMMUFD_PT_MINSZ, WHAT)?;
        if req.flags & !VFIO_DEVICE_DETACH_PASID != 0 {
            return Err(IommufdError::invalid(WHAT, "unknown flags"));
        }
        let pasid = req.flags & VFIO_DEVICE_DETACH_PASID != 0;
        if pasid && (req.argsz as usize) < size_of::<VfioDeviceDetachIommufdPt>() {
            return Err(IommufdError::invalid(WHAT, "argsz does not cover pasid"));
        }
        let (file, dev_id) = self.binding()?;
        file.detach(dev_id, pasid.then_some(req.pasid))
    }
}

impl Drop for VfioDeviceFile {
    /// Closing the cdev unbinds the device (`vfio_df_unbind_iommufd`).
    fn drop(&mut self) {
        if let Some(b) = lock(&self.bound).take() {
            b.file.unbind_device(b.dev_id);
        }
    }
}

impl UapiFile for VfioDeviceFile {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        let r = match cmd {
            VFIO_DEVICE_BIND_IOMMUFD => self.bind(arg),
            VFIO_DEVICE_ATTACH_IOMMUFD_PT => self.attach(arg),
            VFIO_DEVICE_DETACH_IOMMUFD_PT => self.detach(arg),
            _ => Err(IommufdError::UnknownIoctl(cmd)),
        };
        r.map(|()| 0).map_err(|e| fail("VFIO device ioctl", e))
    }

    /// The cdev's regions are not modelled.
    fn read(&self, _buf: &mut [u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// The cdev's regions are not modelled.
    fn write(&self, _buf: &[u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// Nothing is queued on a device cdev.
    fn set_event_notifier(&self, _notifier: Option<Arc<dyn EventNotifier>>) {}
}
