//! The kinds of uAPI file a connection can open. The server is generic over them: a kind
//! opens a file and names the user addresses its ioctls carry, which the server translates
//! from the client's address space to the host's before the file sees them (as the kernel
//! resolves a user pointer in the caller's `mm`).

use std::mem::size_of;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use vsva_host::driver::{HostIommu, VtdDomain};
use vsva_host::iommufd::map_file::MemoryFiles;
use vsva_host::smmu::{SmmuDomain, SmmuHost};
use vsva_host::{
    container::Container, container::IommuBackend, file::ContainerFile, pasid::PasidAllocator,
};
use vsva_uapi::vfio::{VfioIommuType1DmaMap, VFIO_IOMMU_MAP_DMA};
use vsva_uapi::{error::Errno, file::UapiFile};
use vsva_vtd::addr::SourceId;

use crate::protocol::FILE_VFIO_CONTAINER;

/// A user address inside an ioctl argument: 8 little-endian bytes at `at`, naming `len`
/// bytes of the caller's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRange {
    /// Offset of the address in the argument.
    pub at: usize,
    /// Bytes the address names.
    pub len: u64,
    /// Whether an address naming no bytes that lies in no window reaches the file as 0
    /// rather than failing with `EFAULT` (iommufd: the kernel dereferences only the bytes
    /// the argument's count covers, so a probe with a count of 0 takes any pointer).
    pub empty_ok: bool,
}

/// How an ioctl names a memory file the frame carries (`SCM_RIGHTS`): the host maps it
/// through [`ServedFile::map_file`] (`IOMMU_IOAS_MAP_FILE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileArg {
    /// Offset of the i32 fd number (the client sends the file open there).
    pub fd_at: usize,
}

/// What one open file holds, for the host's `STATE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// DMA mappings.
    pub dma_mappings: u64,
    /// Bound PASIDs.
    pub binds: u64,
    /// Page request groups waiting for a page response.
    pub page_requests: u64,
    /// Fault records queued and not read yet.
    pub faults_unread: u64,
}

/// An open file as the host serves it: the uAPI calls, and the host-side operations the
/// file's kind supports.
pub trait ServedFile: UapiFile {
    /// What the file holds.
    fn holdings(&self) -> Holdings;

    /// An ioctl, and the file descriptor it gives the caller, if any (the kind's table
    /// names the field that says where it is).
    fn ioctl_giving_fd(&self, cmd: u32, arg: &mut [u8]) -> Result<(usize, Option<OwnedFd>), Errno> {
        self.ioctl(cmd, arg).map(|n| (n, None))
    }

    /// `IOMMU_IOAS_MAP_FILE` of the memory file the request carried (`None`: it carried
    /// none), its pages host memory through `files` (the connection's). `ENOTTY` for a
    /// kind that maps no files.
    fn map_file(
        &self,
        arg: &mut [u8],
        file: Option<OwnedFd>,
        files: &mut dyn MemoryFiles,
    ) -> Result<usize, Errno> {
        let _ = (arg, file, files);
        Err(Errno::ENOTTY)
    }

    /// Attaches the passthrough device `sid` to the file, as `VFIO_GROUP_SET_CONTAINER`
    /// does for the device's group (or binds it, for an iommufd); returns the bytes the
    /// `DEVICE_ADD` reply carries. `ENODEV` for a file kind without devices.
    fn attach_device(&self, sid: SourceId) -> Result<Vec<u8>, Errno> {
        let _ = sid;
        Err(Errno::ENODEV)
    }
}

impl<B: IommuBackend + Send + 'static> ServedFile for ContainerFile<B> {
    fn holdings(&self) -> Holdings {
        let c = self.lock();
        let state = c.state();
        Holdings {
            dma_mappings: state.dma.len() as u64,
            binds: state.bound.len() as u64,
            page_requests: c.pending_page_requests().len() as u64,
            faults_unread: c.unread_faults() as u64,
        }
    }

    /// Attaches the device to the container's domain; the reply carries nothing.
    fn attach_device(&self, sid: SourceId) -> Result<Vec<u8>, Errno> {
        self.lock()
            .attach_device(sid)
            .map(|()| Vec::new())
            .map_err(|e| Errno::from(&e))
    }
}

/// A kind of uAPI file the host serves.
pub trait FileKind: Send + Sync {
    /// The kind's number in `HELLO`.
    fn id(&self) -> u32;

    /// Opens a new file of this kind (a new container, with its own PASID set).
    fn open(&self) -> Result<Arc<dyn ServedFile>, Errno>;

    /// The user address the ioctl `cmd` with argument `arg` carries, if any. An argument
    /// too short to hold it is `EINVAL`, and an ioctl the kind does not serve `ENOTTY`, so
    /// that the file never sees an untranslated one.
    fn user_range(&self, cmd: u32, arg: &[u8]) -> Result<Option<UserRange>, Errno>;

    /// How the ioctl `cmd` names a memory file, if it does.
    fn file_arg(&self, cmd: u32) -> Option<FileArg> {
        let _ = cmd;
        None
    }
}

/// The host IOMMU driver whose domains back the containers.
#[derive(Clone)]
pub enum Domains {
    /// The host VT-d driver's unit: each container a [`VtdDomain`] (a domain id).
    Vtd(Arc<HostIommu>),
    /// The host SMMUv3 driver: each container an [`SmmuDomain`] (a VMID and its stage 2;
    /// `VFIO_IOMMU_ATTACH_PASID_TABLE` nests the guest's CD table over it).
    Smmu(Arc<SmmuHost>),
}

/// VFIO type1 containers over a host IOMMU driver: each is a nesting-capable container of
/// its own domain, with a PASID set of `quota` PASIDs from the host's allocator.
pub struct VfioContainerKind {
    /// The host driver the containers' domains come from.
    pub domains: Domains,
    /// The host's PASID space.
    pub pasids: Arc<Mutex<PasidAllocator>>,
    /// PASIDs each container may hold.
    pub quota: u32,
}

impl FileKind for VfioContainerKind {
    fn id(&self) -> u32 {
        FILE_VFIO_CONTAINER
    }

    fn open(&self) -> Result<Arc<dyn ServedFile>, Errno> {
        fn refused(e: impl std::fmt::Display) -> Errno {
            tracing::warn!("opening a container: {e}");
            Errno::ENOSPC
        }
        Ok(match &self.domains {
            Domains::Vtd(unit) => {
                let domain = VtdDomain::new(unit).map_err(refused)?;
                let container =
                    Container::new(self.pasids.clone(), self.quota, domain).map_err(refused)?;
                Arc::new(ContainerFile::new(container))
            }
            Domains::Smmu(host) => {
                let domain = SmmuDomain::new(host).map_err(refused)?;
                let container =
                    Container::new(self.pasids.clone(), self.quota, domain).map_err(refused)?;
                Arc::new(ContainerFile::new(container))
            }
        })
    }

    /// `VFIO_IOMMU_MAP_DMA`'s `vaddr` (offset 8) naming `size` (offset 24) bytes.
    fn user_range(&self, cmd: u32, arg: &[u8]) -> Result<Option<UserRange>, Errno> {
        if cmd != VFIO_IOMMU_MAP_DMA {
            return Ok(None);
        }
        if arg.len() < size_of::<VfioIommuType1DmaMap>() {
            return Err(Errno::EINVAL);
        }
        let size = u64::from_le_bytes(arg[24..32].try_into().expect("8 bytes"));
        Ok(Some(UserRange {
            at: 8,
            len: size,
            empty_ok: false,
        }))
    }
}
