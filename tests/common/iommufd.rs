//! The iommufd calls of the tests that drive `/dev/iommu` over the socket
//! (`tests/host.rs`, `tests/iommufd_socket.rs`), as a VMM makes them.

use std::path::Path;

use vsva_service::protocol::FILE_IOMMUFD;
use vsva_service::{client::RemoteFile, client::SharedRam};
use vsva_uapi::iommufd::{
    IommuDestroy, IommuIoasAlloc, VfioDeviceAttachIommufdPt, IOMMU_DESTROY, IOMMU_IOAS_ALLOC,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
};
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, file::UapiFile};

/// One ioctl with `v` as its argument; the argument as the host left it.
pub fn io<T: Wire>(f: &dyn UapiFile, cmd: u32, v: &T) -> Result<T, Errno> {
    let mut b = v.to_bytes();
    f.ioctl(cmd, &mut b)?;
    Ok(read_prefix(&b, b.len()))
}

/// An iommufd connection to the host at `path` with `bytes` of VMM RAM shared on it.
pub fn connect(path: &Path, bytes: u64) -> (RemoteFile, SharedRam) {
    let f = RemoteFile::connect_kind(path, FILE_IOMMUFD).unwrap();
    let ram = SharedRam::new(bytes).unwrap();
    ram.share(&f).unwrap();
    (f, ram)
}

/// `IOMMU_IOAS_ALLOC`: the new IOAS's id.
pub fn ioas_alloc(f: &dyn UapiFile) -> u32 {
    io(
        f,
        IOMMU_IOAS_ALLOC,
        &IommuIoasAlloc {
            size: 12,
            ..Default::default()
        },
    )
    .unwrap()
    .out_ioas_id
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of the connection's device to `pt_id` (at `pasid` with
/// `VFIO_DEVICE_ATTACH_PASID` in `flags`); the argument as the host left it.
pub fn attach_pt(
    f: &dyn UapiFile,
    flags: u32,
    pt_id: u32,
    pasid: u32,
) -> Result<VfioDeviceAttachIommufdPt, Errno> {
    io(
        f,
        VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        &VfioDeviceAttachIommufdPt {
            argsz: 16,
            flags,
            pt_id,
            pasid,
        },
    )
}

/// `IOMMU_DESTROY` of object `id`.
pub fn destroy(f: &dyn UapiFile, id: u32) -> Result<(), Errno> {
    io(f, IOMMU_DESTROY, &IommuDestroy { size: 8, id }).map(drop)
}

/// The device fills 64 bytes at `iova` (no PASID: through the IOAS).
pub fn fill_iova(f: &RemoteFile, iova: u64, pattern: u64) {
    let desc = vsva_hw::dma::Descriptor {
        pasid: None,
        privileged: false,
        block_on_fault: false,
        completion: vsva_hw::dma::CompletionRequest::None,
        op: vsva_hw::dma::Operation::Fill {
            pattern,
            dst: iova,
            size: 64,
        },
    };
    f.device_write(0, &desc.encode()).unwrap();
    f.device_run().unwrap();
}
