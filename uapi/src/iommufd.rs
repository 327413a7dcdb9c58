//! The iommufd uAPI (`/dev/iommu`, Linux 6.2 onwards, `include/uapi/linux/iommufd.h`) and
//! the VFIO device cdev ioctls that bind a device to an iommufd and attach it to a page
//! table (`include/uapi/linux/vfio.h`).
//!
//! Layouts are the bindgen structures of `iommufd-bindings` and `vfio-bindings` (their
//! const assertions pin every offset to the kernel headers); this module gives them the
//! field-wise [`Wire`] encoding, computes the ioctl numbers from `IOMMUFD_CMD_*`, and keeps
//! the one copy of the kernel's argument size rules ([`Ucmd`]), as `iommufd_fops_ioctl` and
//! `copy_struct_from_user` apply them:
//! - the caller's `size` (the first `u32`) below the ioctl's minimum (`offsetofend` of its
//!   last mandatory field): `-EINVAL`;
//! - larger than the structure this kernel knows, with a non-zero byte past it: `-E2BIG`;
//!   with only zero bytes past it: read as if `size` were the known size;
//! - smaller than the known size but at least the minimum: the missing tail reads as zero;
//! - what the handler writes back covers `min(size, sizeof)` bytes (`iommufd_ucmd_respond`).
//!
//! Unknown flag bits and non-zero reserved fields are each handler's check, `-EOPNOTSUPP`
//! ([`UapiError::NotSupported`]).

use std::mem::{offset_of, size_of};

use iommufd_bindings as b;
use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_detach_iommufd_pt,
};

use crate::error::UapiError;
use crate::vfio::{io, VFIO_BASE, VFIO_TYPE};
use crate::wire::{peek_u32, read_prefix, wire_fields, Wire};

const fn iommufd_io(nr: u32) -> u32 {
    io(b::IOMMUFD_TYPE as u32, nr)
}

/// `IOMMU_DESTROY`: [`IommuDestroy`].
pub const IOMMU_DESTROY: u32 = iommufd_io(b::IOMMUFD_CMD_DESTROY);
/// `IOMMU_IOAS_ALLOC`: [`IommuIoasAlloc`].
pub const IOMMU_IOAS_ALLOC: u32 = iommufd_io(b::IOMMUFD_CMD_IOAS_ALLOC);
/// `IOMMU_IOAS_ALLOW_IOVAS`: [`IommuIoasAllowIovas`].
pub const IOMMU_IOAS_ALLOW_IOVAS: u32 = iommufd_io(b::IOMMUFD_CMD_IOAS_ALLOW_IOVAS);
/// `IOMMU_IOAS_COPY`: [`IommuIoasCopy`].
pub const IOMMU_IOAS_COPY: u32 = iommufd_io(b::IOMMUFD_CMD_IOAS_COPY);
/// `IOMMU_IOAS_IOVA_RANGES`: [`IommuIoasIovaRanges`].
pub const IOMMU_IOAS_IOVA_RANGES: u32 = iommufd_io(b::IOMMUFD_CMD_IOAS_IOVA_RANGES);
/// `IOMMU_IOAS_MAP`: [`IommuIoasMap`].
pub const IOMMU_IOAS_MAP: u32 = iommufd_io(b::IOMMUFD_CMD_IOAS_MAP);
/// `IOMMU_IOAS_UNMAP`: [`IommuIoasUnmap`].
pub const IOMMU_IOAS_UNMAP: u32 = iommufd_io(b::IOMMUFD_CMD_IOAS_UNMAP);
/// `IOMMU_OPTION`: `struct iommu_option`.
pub const IOMMU_OPTION: u32 = iommufd_io(b::IOMMUFD_CMD_OPTION);
/// `IOMMU_VFIO_IOAS`: `struct iommu_vfio_ioas`.
pub const IOMMU_VFIO_IOAS: u32 = iommufd_io(b::IOMMUFD_CMD_VFIO_IOAS);
/// `IOMMU_HWPT_ALLOC`: [`IommuHwptAlloc`].
pub const IOMMU_HWPT_ALLOC: u32 = iommufd_io(b::IOMMUFD_CMD_HWPT_ALLOC);
/// `IOMMU_GET_HW_INFO`: [`IommuHwInfo`].
pub const IOMMU_GET_HW_INFO: u32 = iommufd_io(b::IOMMUFD_CMD_GET_HW_INFO);
/// `IOMMU_HWPT_SET_DIRTY_TRACKING`: `struct iommu_hwpt_set_dirty_tracking`.
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u32 = iommufd_io(b::IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING);
/// `IOMMU_HWPT_GET_DIRTY_BITMAP`: `struct iommu_hwpt_get_dirty_bitmap`.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u32 = iommufd_io(b::IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
/// `IOMMU_HWPT_INVALIDATE`: [`IommuHwptInvalidate`].
pub const IOMMU_HWPT_INVALIDATE: u32 = iommufd_io(b::IOMMUFD_CMD_HWPT_INVALIDATE);
/// `IOMMU_FAULT_QUEUE_ALLOC`: [`IommuFaultAlloc`].
pub const IOMMU_FAULT_QUEUE_ALLOC: u32 = iommufd_io(b::IOMMUFD_CMD_FAULT_QUEUE_ALLOC);
/// `IOMMU_IOAS_MAP_FILE`: [`IommuIoasMapFile`].
pub const IOMMU_IOAS_MAP_FILE: u32 = iommufd_io(b::IOMMUFD_CMD_IOAS_MAP_FILE);
/// `IOMMU_VIOMMU_ALLOC`: `struct iommu_viommu_alloc`.
pub const IOMMU_VIOMMU_ALLOC: u32 = iommufd_io(b::IOMMUFD_CMD_VIOMMU_ALLOC);
/// `IOMMU_VDEVICE_ALLOC`: `struct iommu_vdevice_alloc`.
pub const IOMMU_VDEVICE_ALLOC: u32 = iommufd_io(b::IOMMUFD_CMD_VDEVICE_ALLOC);

/// `IOMMU_VEVENTQ_ALLOC`: [`IommuVeventqAlloc`].
pub const IOMMU_VEVENTQ_ALLOC: u32 = iommufd_io(b::IOMMUFD_CMD_VEVENTQ_ALLOC);

/// `VFIO_DEVICE_BIND_IOMMUFD` (device cdev): [`VfioDeviceBindIommufd`].
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = io(VFIO_TYPE, VFIO_BASE + 18);
/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (device cdev): [`VfioDeviceAttachIommufdPt`].
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = io(VFIO_TYPE, VFIO_BASE + 19);
/// `VFIO_DEVICE_DETACH_IOMMUFD_PT` (device cdev): [`VfioDeviceDetachIommufdPt`].
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = io(VFIO_TYPE, VFIO_BASE + 20);
/// `VFIO_DEVICE_ATTACH_PASID`: attach (or replace) at `pasid` rather than the RID.
pub const VFIO_DEVICE_ATTACH_PASID: u32 = vfio_bindings::bindings::vfio::VFIO_DEVICE_ATTACH_PASID;
/// `VFIO_DEVICE_DETACH_PASID`: detach `pasid` rather than the RID.
pub const VFIO_DEVICE_DETACH_PASID: u32 = vfio_bindings::bindings::vfio::VFIO_DEVICE_DETACH_PASID;

/// `IOMMU_IOAS_MAP_FIXED_IOVA`: map at the given IOVA rather than one the kernel picks.
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
/// `IOMMU_IOAS_MAP_WRITEABLE`: DMA may write.
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
/// `IOMMU_IOAS_MAP_READABLE`: DMA may read.
pub const IOMMU_IOAS_MAP_READABLE: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
/// Every `IOMMU_IOAS_MAP` flag.
pub const IOMMU_IOAS_MAP_FLAGS: u32 =
    IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;

/// `IOMMU_HWPT_ALLOC_NEST_PARENT`: a paging HWPT nested HWPTs may use as their stage 2.
pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 =
    b::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT;
/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: a paging HWPT that can track dirty pages.
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 =
    b::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
/// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE`: the flag of `IOMMU_HWPT_SET_DIRTY_TRACKING`.
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 =
    b::iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`: read the dirty bits without clearing them.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 =
    b::iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR;
/// `IOMMU_HWPT_FAULT_ID_VALID`: `fault_id` names the fault queue of the HWPT.
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = b::iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID;
/// `IOMMU_HWPT_ALLOC_PASID`: the HWPT may be attached at a PASID (and, as a RID domain,
/// lets the device's PASIDs be attached).
pub const IOMMU_HWPT_ALLOC_PASID: u32 = b::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID;

/// `IOMMU_HWPT_DATA_NONE`: a paging HWPT built from an IOAS.
pub const IOMMU_HWPT_DATA_NONE: u32 = b::iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE;
/// `IOMMU_HWPT_DATA_VTD_S1`: a nested HWPT with [`IommuHwptVtdS1`] data.
pub const IOMMU_HWPT_DATA_VTD_S1: u32 = b::iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1;
/// `IOMMU_HWPT_DATA_ARM_SMMUV3`: a nested HWPT under an SMMUv3 vIOMMU with
/// [`IommuHwptArmSmmuv3`] data (the guest's STE).
pub const IOMMU_HWPT_DATA_ARM_SMMUV3: u32 = b::iommu_hwpt_data_type_IOMMU_HWPT_DATA_ARM_SMMUV3;

/// `IOMMU_VIOMMU_TYPE_DEFAULT`: reserved, never allocated.
pub const IOMMU_VIOMMU_TYPE_DEFAULT: u32 = b::iommu_viommu_type_IOMMU_VIOMMU_TYPE_DEFAULT;
/// `IOMMU_VIOMMU_TYPE_ARM_SMMUV3`: a vSMMUv3 over a nest parent.
pub const IOMMU_VIOMMU_TYPE_ARM_SMMUV3: u32 = b::iommu_viommu_type_IOMMU_VIOMMU_TYPE_ARM_SMMUV3;
/// `IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3`: an array of
/// [`IommuViommuArmSmmuv3Invalidate`] given to `IOMMU_HWPT_INVALIDATE` with a vIOMMU id.
pub const IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3: u32 =
    b::iommu_hwpt_invalidate_data_type_IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3;
/// `IOMMU_VEVENTQ_TYPE_DEFAULT`: reserved, never allocated.
pub const IOMMU_VEVENTQ_TYPE_DEFAULT: u32 = b::iommu_veventq_type_IOMMU_VEVENTQ_TYPE_DEFAULT;
/// `IOMMU_VEVENTQ_TYPE_ARM_SMMUV3`: [`IommuVeventArmSmmuv3`] events.
pub const IOMMU_VEVENTQ_TYPE_ARM_SMMUV3: u32 = b::iommu_veventq_type_IOMMU_VEVENTQ_TYPE_ARM_SMMUV3;
/// `IOMMU_VEVENTQ_FLAG_LOST_EVENTS`: a header with no event after it: events were lost.
pub const IOMMU_VEVENTQ_FLAG_LOST_EVENTS: u32 =
    b::iommu_veventq_flag_IOMMU_VEVENTQ_FLAG_LOST_EVENTS;
/// `IOMMU_HW_INFO_TYPE_ARM_SMMUV3`: [`IommuHwInfoArmSmmuv3`] data.
pub const IOMMU_HW_INFO_TYPE_ARM_SMMUV3: u32 = b::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3;

/// `IOMMU_VTD_S1_SRE`: supervisor requests allowed.
pub const IOMMU_VTD_S1_SRE: u64 = b::iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_SRE as u64;
/// `IOMMU_VTD_S1_EAFE`: extended access flag enabled.
pub const IOMMU_VTD_S1_EAFE: u64 = b::iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_EAFE as u64;
/// `IOMMU_VTD_S1_WPE`: write protect enabled (supervisor writes honour read-only pages).
pub const IOMMU_VTD_S1_WPE: u64 = b::iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_WPE as u64;

/// `IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`: an array of [`IommuHwptVtdS1Invalidate`].
pub const IOMMU_HWPT_INVALIDATE_DATA_VTD_S1: u32 =
    b::iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1;
/// `IOMMU_VTD_INV_FLAGS_LEAF`: only leaf entries changed.
pub const IOMMU_VTD_INV_FLAGS_LEAF: u32 =
    b::iommu_hwpt_vtd_s1_invalidate_flags_IOMMU_VTD_INV_FLAGS_LEAF;

/// `IOMMU_HW_INFO_TYPE_INTEL_VTD`: [`IommuHwInfoVtd`] data.
pub const IOMMU_HW_INFO_TYPE_INTEL_VTD: u32 = b::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD;
/// `IOMMU_HW_INFO_TYPE_DEFAULT`: whatever the device's IOMMU reports.
pub const IOMMU_HW_INFO_TYPE_DEFAULT: u32 = b::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_DEFAULT;
/// `IOMMU_HW_INFO_FLAG_INPUT_TYPE`: `in_data_type` names the type asked for.
pub const IOMMU_HW_INFO_FLAG_INPUT_TYPE: u32 =
    b::iommufd_hw_info_flags_IOMMU_HW_INFO_FLAG_INPUT_TYPE;
/// `IOMMU_HW_CAP_DIRTY_TRACKING`.
pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 =
    b::iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING as u64;
/// `IOMMU_HW_CAP_PCI_PASID_EXEC`.
pub const IOMMU_HW_CAP_PCI_PASID_EXEC: u64 =
    b::iommufd_hw_capabilities_IOMMU_HW_CAP_PCI_PASID_EXEC as u64;
/// `IOMMU_HW_CAP_PCI_PASID_PRIV`.
pub const IOMMU_HW_CAP_PCI_PASID_PRIV: u64 =
    b::iommufd_hw_capabilities_IOMMU_HW_CAP_PCI_PASID_PRIV as u64;

/// `IOMMU_PGFAULT_FLAGS_PASID_VALID`.
pub const IOMMU_PGFAULT_FLAGS_PASID_VALID: u32 =
    b::iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID;
/// `IOMMU_PGFAULT_FLAGS_LAST_PAGE`.
pub const IOMMU_PGFAULT_FLAGS_LAST_PAGE: u32 =
    b::iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE;
/// `IOMMU_PGFAULT_PERM_READ`.
pub const IOMMU_PGFAULT_PERM_READ: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ;
/// `IOMMU_PGFAULT_PERM_WRITE`.
pub const IOMMU_PGFAULT_PERM_WRITE: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_WRITE;
/// `IOMMU_PGFAULT_PERM_EXEC`.
pub const IOMMU_PGFAULT_PERM_EXEC: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_EXEC;
/// `IOMMU_PGFAULT_PERM_PRIV`.
pub const IOMMU_PGFAULT_PERM_PRIV: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_PRIV;
/// `IOMMUFD_PAGE_RESP_SUCCESS`.
pub const IOMMUFD_PAGE_RESP_SUCCESS: u32 = b::iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS;
/// `IOMMUFD_PAGE_RESP_INVALID`.
pub const IOMMUFD_PAGE_RESP_INVALID: u32 = b::iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID;

/// `struct iommu_destroy`.
pub type IommuDestroy = b::iommu_destroy;
wire_fields!(IommuDestroy { size: u32, id: u32 });
/// `struct iommu_ioas_alloc`.
pub type IommuIoasAlloc = b::iommu_ioas_alloc;
wire_fields!(IommuIoasAlloc {
    size: u32,
    flags: u32,
    out_ioas_id: u32
});
/// `struct iommu_iova_range`: `[start, last]`, inclusive.
pub type IommuIovaRange = b::iommu_iova_range;
wire_fields!(IommuIovaRange {
    start: u64,
    last: u64
});
/// `struct iommu_ioas_iova_ranges`.
pub type IommuIoasIovaRanges = b::iommu_ioas_iova_ranges;
wire_fields!(IommuIoasIovaRanges {
    size: u32,
    ioas_id: u32,
    num_iovas: u32,
    __reserved: u32,
    allowed_iovas: u64,
    out_iova_alignment: u64
});
/// `struct iommu_ioas_allow_iovas`.
pub type IommuIoasAllowIovas = b::iommu_ioas_allow_iovas;
wire_fields!(IommuIoasAllowIovas {
    size: u32,
    ioas_id: u32,
    num_iovas: u32,
    __reserved: u32,
    allowed_iovas: u64
});
/// `struct iommu_ioas_map`.
pub type IommuIoasMap = b::iommu_ioas_map;
wire_fields!(IommuIoasMap {
    size: u32,
    flags: u32,
    ioas_id: u32,
    __reserved: u32,
    user_va: u64,
    length: u64,
    iova: u64
});
/// `struct iommu_ioas_map_file`.
pub type IommuIoasMapFile = b::iommu_ioas_map_file;
wire_fields!(IommuIoasMapFile {
    size: u32,
    flags: u32,
    ioas_id: u32,
    fd: i32,
    start: u64,
    length: u64,
    iova: u64
});
/// `struct iommu_ioas_copy`.
pub type IommuIoasCopy = b::iommu_ioas_copy;
wire_fields!(IommuIoasCopy {
    size: u32,
    flags: u32,
    dst_ioas_id: u32,
    src_ioas_id: u32,
    length: u64,
    dst_iova: u64,
    src_iova: u64
});
/// `struct iommu_ioas_unmap`.
pub type IommuIoasUnmap = b::iommu_ioas_unmap;
wire_fields!(IommuIoasUnmap {
    size: u32,
    ioas_id: u32,
    iova: u64,
    length: u64
});
/// `struct iommu_hwpt_alloc`.
pub type IommuHwptAlloc = b::iommu_hwpt_alloc;
wire_fields!(IommuHwptAlloc {
    size: u32,
    flags: u32,
    dev_id: u32,
    pt_id: u32,
    out_hwpt_id: u32,
    __reserved: u32,
    data_type: u32,
    data_len: u32,
    data_uptr: u64,
    fault_id: u32,
    __reserved2: u32
});
/// `struct iommu_hwpt_set_dirty_tracking`.
pub type IommuHwptSetDirtyTracking = b::iommu_hwpt_set_dirty_tracking;
wire_fields!(IommuHwptSetDirtyTracking {
    size: u32,
    flags: u32,
    hwpt_id: u32,
    __reserved: u32
});
/// `struct iommu_hwpt_get_dirty_bitmap`: the bitmap at `data` has one bit per `page_size`
/// bytes of `[iova, iova + length)`, from `iova`, in little-endian 64-bit words.
pub type IommuHwptGetDirtyBitmap = b::iommu_hwpt_get_dirty_bitmap;
wire_fields!(IommuHwptGetDirtyBitmap {
    size: u32,
    hwpt_id: u32,
    flags: u32,
    __reserved: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    data: u64
});
/// `struct iommu_hwpt_vtd_s1`: the guest's first-level table of a nested HWPT.
pub type IommuHwptVtdS1 = b::iommu_hwpt_vtd_s1;
wire_fields!(IommuHwptVtdS1 {
    flags: u64,
    pgtbl_addr: u64,
    addr_width: u32,
    __reserved: u32
});
/// `struct iommu_hwpt_invalidate`.
pub type IommuHwptInvalidate = b::iommu_hwpt_invalidate;
wire_fields!(IommuHwptInvalidate {
    size: u32,
    hwpt_id: u32,
    data_uptr: u64,
    data_type: u32,
    entry_len: u32,
    entry_num: u32,
    __reserved: u32
});
/// `struct iommu_hwpt_vtd_s1_invalidate`: one entry of a VT-d stage-1 invalidation array.
pub type IommuHwptVtdS1Invalidate = b::iommu_hwpt_vtd_s1_invalidate;
wire_fields!(IommuHwptVtdS1Invalidate {
    addr: u64,
    npages: u64,
    flags: u32,
    __reserved: u32
});
/// `struct iommu_hw_info_vtd`.
pub type IommuHwInfoVtd = b::iommu_hw_info_vtd;
wire_fields!(IommuHwInfoVtd {
    flags: u32,
    __reserved: u32,
    cap_reg: u64,
    ecap_reg: u64
});
/// `struct iommu_hwpt_arm_smmuv3`: words 0 and 1 of the guest's STE.
pub type IommuHwptArmSmmuv3 = b::iommu_hwpt_arm_smmuv3;
wire_fields!(IommuHwptArmSmmuv3 { ste: [u64; 2] });
/// `struct iommu_viommu_arm_smmuv3_invalidate`: one 16-byte SMMUv3 command.
pub type IommuViommuArmSmmuv3Invalidate = b::iommu_viommu_arm_smmuv3_invalidate;
wire_fields!(IommuViommuArmSmmuv3Invalidate { cmd: [u64; 2] });
/// `struct iommu_hw_info_arm_smmuv3`: SMMU_IDR0..5, SMMU_IIDR and SMMU_AIDR.
pub type IommuHwInfoArmSmmuv3 = b::iommu_hw_info_arm_smmuv3;
wire_fields!(IommuHwInfoArmSmmuv3 {
    flags: u32,
    __reserved: u32,
    idr: [u32; 6],
    iidr: u32,
    aidr: u32
});
/// `struct iommu_viommu_alloc`.
pub type IommuViommuAlloc = b::iommu_viommu_alloc;
wire_fields!(IommuViommuAlloc {
    size: u32,
    flags: u32,
    type_: u32,
    dev_id: u32,
    hwpt_id: u32,
    out_viommu_id: u32,
    data_len: u32,
    __reserved: u32,
    data_uptr: u64
});
/// `struct iommu_vdevice_alloc`.
pub type IommuVdeviceAlloc = b::iommu_vdevice_alloc;
wire_fields!(IommuVdeviceAlloc {
    size: u32,
    viommu_id: u32,
    dev_id: u32,
    out_vdevice_id: u32,
    virt_id: u64
});
/// `struct iommu_veventq_alloc`.
pub type IommuVeventqAlloc = b::iommu_veventq_alloc;
wire_fields!(IommuVeventqAlloc {
    size: u32,
    flags: u32,
    viommu_id: u32,
    type_: u32,
    veventq_depth: u32,
    out_veventq_id: u32,
    out_veventq_fd: u32,
    __reserved: u32
});
/// `struct iommufd_vevent_header`: before each event read from a vEVENT queue.
pub type IommufdVeventHeader = b::iommufd_vevent_header;
wire_fields!(IommufdVeventHeader {
    flags: u32,
    sequence: u32
});
/// `struct iommu_vevent_arm_smmuv3`: an SMMUv3 event record, StreamID = the vSID.
pub type IommuVeventArmSmmuv3 = b::iommu_vevent_arm_smmuv3;
wire_fields!(IommuVeventArmSmmuv3 { evt: [u64; 4] });
/// `struct iommu_fault_alloc`.
pub type IommuFaultAlloc = b::iommu_fault_alloc;
wire_fields!(IommuFaultAlloc {
    size: u32,
    flags: u32,
    out_fault_id: u32,
    out_fault_fd: u32
});
/// `struct iommu_hwpt_pgfault`: one record read from a fault queue file.
pub type IommuHwptPgfault = b::iommu_hwpt_pgfault;
wire_fields!(IommuHwptPgfault {
    flags: u32,
    dev_id: u32,
    pasid: u32,
    grpid: u32,
    perm: u32,
    __reserved: u32,
    addr: u64,
    length: u32,
    cookie: u32
});
/// `struct iommu_hwpt_page_response`: one response written to a fault queue file.
pub type IommuHwptPageResponse = b::iommu_hwpt_page_response;
wire_fields!(IommuHwptPageResponse {
    cookie: u32,
    code: u32
});

/// `struct iommu_hw_info`; `data_type` is the union of `in_data_type` (with
/// [`IOMMU_HW_INFO_FLAG_INPUT_TYPE`]) and `out_data_type`, both a `u32` at offset 24.
pub type IommuHwInfo = b::iommu_hw_info;

/// The `u32` of the `in_data_type`/`out_data_type` union of [`IommuHwInfo`].
pub fn hw_info_data_type(info: &IommuHwInfo) -> u32 {
    // SAFETY: both members of the union are `u32` at the same offset, so every bit
    // pattern is a valid value of either.
    unsafe { info.__bindgen_anon_1.out_data_type }
}

/// An [`IommuHwInfo`] with every field zero except those given.
pub fn hw_info(size: u32, flags: u32, dev_id: u32, data_type: u32) -> IommuHwInfo {
    IommuHwInfo {
        size,
        flags,
        dev_id,
        data_len: 0,
        data_uptr: 0,
        __bindgen_anon_1: b::iommu_hw_info__bindgen_ty_1 {
            in_data_type: data_type,
        },
        out_max_pasid_log2: 0,
        __reserved: [0; 3],
        out_capabilities: 0,
    }
}

impl Wire for IommuHwInfo {
    fn read(b: &[u8]) -> Self {
        let mut info = hw_info(
            u32::read(&b[offset_of!(IommuHwInfo, size)..]),
            u32::read(&b[offset_of!(IommuHwInfo, flags)..]),
            u32::read(&b[offset_of!(IommuHwInfo, dev_id)..]),
            u32::read(&b[offset_of!(IommuHwInfo, __bindgen_anon_1)..]),
        );
        info.data_len = u32::read(&b[offset_of!(IommuHwInfo, data_len)..]);
        info.data_uptr = u64::read(&b[offset_of!(IommuHwInfo, data_uptr)..]);
        info.out_max_pasid_log2 = u8::read(&b[offset_of!(IommuHwInfo, out_max_pasid_log2)..]);
        info.__reserved = <[u8; 3]>::read(&b[offset_of!(IommuHwInfo, __reserved)..]);
        info.out_capabilities = u64::read(&b[offset_of!(IommuHwInfo, out_capabilities)..]);
        info
    }
    fn write(&self, b: &mut [u8]) {
        self.size.write(&mut b[offset_of!(IommuHwInfo, size)..]);
        self.flags.write(&mut b[offset_of!(IommuHwInfo, flags)..]);
        self.dev_id.write(&mut b[offset_of!(IommuHwInfo, dev_id)..]);
        self.data_len
            .write(&mut b[offset_of!(IommuHwInfo, data_len)..]);
        self.data_uptr
            .write(&mut b[offset_of!(IommuHwInfo, data_uptr)..]);
        hw_info_data_type(self).write(&mut b[offset_of!(IommuHwInfo, __bindgen_anon_1)..]);
        self.out_max_pasid_log2
            .write(&mut b[offset_of!(IommuHwInfo, out_max_pasid_log2)..]);
        self.__reserved
            .write(&mut b[offset_of!(IommuHwInfo, __reserved)..]);
        self.out_capabilities
            .write(&mut b[offset_of!(IommuHwInfo, out_capabilities)..]);
    }
}

/// `struct vfio_device_bind_iommufd` (device cdev).
pub type VfioDeviceBindIommufd = vfio_device_bind_iommufd;
wire_fields!(VfioDeviceBindIommufd {
    argsz: u32,
    flags: u32,
    iommufd: i32,
    out_devid: u32,
    token_uuid_ptr: u64
});
/// `struct vfio_device_attach_iommufd_pt` (device cdev).
pub type VfioDeviceAttachIommufdPt = vfio_device_attach_iommufd_pt;
wire_fields!(VfioDeviceAttachIommufdPt {
    argsz: u32,
    flags: u32,
    pt_id: u32,
    pasid: u32
});
/// `struct vfio_device_detach_iommufd_pt` (device cdev).
pub type VfioDeviceDetachIommufdPt = vfio_device_detach_iommufd_pt;
wire_fields!(VfioDeviceDetachIommufdPt {
    argsz: u32,
    flags: u32,
    pasid: u32
});

/// One iommufd ioctl's argument as `iommufd_ioctl_ops` describes it
/// (`IOCTL_OP(ioctl, handler, struct, last)`): the structure's size and the minimum size
/// a caller may pass, `offsetofend(struct, last)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ucmd {
    /// The ioctl number.
    pub cmd: u32,
    /// The ioctl's name.
    pub name: &'static str,
    /// `sizeof` the structure this kernel knows.
    pub size: usize,
    /// The smallest `size` a caller may pass.
    pub min_size: usize,
}

macro_rules! ucmd {
    ($cmd:ident, $ty:ty, $last:ident : $lty:ty) => {
        Ucmd {
            cmd: $cmd,
            name: stringify!($cmd),
            size: size_of::<$ty>(),
            min_size: offset_of!($ty, $last) + size_of::<$lty>(),
        }
    };
}

/// `IOMMU_DESTROY`, minimum up to `id`.
pub const UCMD_DESTROY: Ucmd = ucmd!(IOMMU_DESTROY, IommuDestroy, id: u32);
/// `IOMMU_IOAS_ALLOC`, minimum up to `out_ioas_id`.
pub const UCMD_IOAS_ALLOC: Ucmd = ucmd!(IOMMU_IOAS_ALLOC, IommuIoasAlloc, out_ioas_id: u32);
/// `IOMMU_IOAS_ALLOW_IOVAS`, minimum up to `allowed_iovas`.
pub const UCMD_IOAS_ALLOW_IOVAS: Ucmd =
    ucmd!(IOMMU_IOAS_ALLOW_IOVAS, IommuIoasAllowIovas, allowed_iovas: u64);
/// `IOMMU_IOAS_COPY`, minimum up to `src_iova`.
pub const UCMD_IOAS_COPY: Ucmd = ucmd!(IOMMU_IOAS_COPY, IommuIoasCopy, src_iova: u64);
/// `IOMMU_IOAS_IOVA_RANGES`, minimum up to `out_iova_alignment`.
pub const UCMD_IOAS_IOVA_RANGES: Ucmd =
    ucmd!(IOMMU_IOAS_IOVA_RANGES, IommuIoasIovaRanges, out_iova_alignment: u64);
/// `IOMMU_IOAS_MAP`, minimum up to `iova`.
pub const UCMD_IOAS_MAP: Ucmd = ucmd!(IOMMU_IOAS_MAP, IommuIoasMap, iova: u64);
/// `IOMMU_IOAS_MAP_FILE`, minimum up to `iova`.
pub const UCMD_IOAS_MAP_FILE: Ucmd = ucmd!(IOMMU_IOAS_MAP_FILE, IommuIoasMapFile, iova: u64);
/// `IOMMU_IOAS_UNMAP`, minimum up to `length`.
pub const UCMD_IOAS_UNMAP: Ucmd = ucmd!(IOMMU_IOAS_UNMAP, IommuIoasUnmap, length: u64);
/// `IOMMU_HWPT_ALLOC`, minimum up to `__reserved` (the 6.6 layout: data and fault id are
/// optional tails).
pub const UCMD_HWPT_ALLOC: Ucmd = ucmd!(IOMMU_HWPT_ALLOC, IommuHwptAlloc, __reserved: u32);
/// `IOMMU_HWPT_SET_DIRTY_TRACKING`, minimum up to `__reserved`.
pub const UCMD_HWPT_SET_DIRTY_TRACKING: Ucmd = ucmd!(
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    IommuHwptSetDirtyTracking,
    __reserved: u32
);
/// `IOMMU_HWPT_GET_DIRTY_BITMAP`, minimum up to `data`.
pub const UCMD_HWPT_GET_DIRTY_BITMAP: Ucmd =
    ucmd!(IOMMU_HWPT_GET_DIRTY_BITMAP, IommuHwptGetDirtyBitmap, data: u64);
/// `IOMMU_HWPT_INVALIDATE`, minimum up to `__reserved`.
pub const UCMD_HWPT_INVALIDATE: Ucmd =
    ucmd!(IOMMU_HWPT_INVALIDATE, IommuHwptInvalidate, __reserved: u32);
/// `IOMMU_GET_HW_INFO`, minimum up to `__reserved` (`out_capabilities` is an optional
/// tail).
pub const UCMD_GET_HW_INFO: Ucmd = ucmd!(IOMMU_GET_HW_INFO, IommuHwInfo, __reserved: [u8; 3]);
/// `IOMMU_FAULT_QUEUE_ALLOC`, minimum up to `out_fault_fd`.
pub const UCMD_FAULT_QUEUE_ALLOC: Ucmd =
    ucmd!(IOMMU_FAULT_QUEUE_ALLOC, IommuFaultAlloc, out_fault_fd: u32);

/// `IOMMU_VIOMMU_ALLOC`, minimum up to `out_viommu_id` (the data tail is optional).
pub const UCMD_VIOMMU_ALLOC: Ucmd = ucmd!(IOMMU_VIOMMU_ALLOC, IommuViommuAlloc, out_viommu_id: u32);
/// `IOMMU_VDEVICE_ALLOC`, minimum up to `virt_id`.
pub const UCMD_VDEVICE_ALLOC: Ucmd = ucmd!(IOMMU_VDEVICE_ALLOC, IommuVdeviceAlloc, virt_id: u64);
/// `IOMMU_VEVENTQ_ALLOC`, minimum up to `__reserved`.
pub const UCMD_VEVENTQ_ALLOC: Ucmd = ucmd!(IOMMU_VEVENTQ_ALLOC, IommuVeventqAlloc, __reserved: u32);

impl Ucmd {
    /// Copies the argument in as `iommufd_fops_ioctl` does: `-EFAULT` when the buffer
    /// ends before `size` or before the bytes `size` covers, `-EINVAL` for a `size` below
    /// the minimum, `-E2BIG` for non-zero bytes past the known structure; the structure
    /// is read over zeroes from `min(size, sizeof)` bytes.
    pub fn copy_in<T: Wire>(&self, arg: &[u8]) -> Result<T, UapiError> {
        debug_assert_eq!(size_of::<T>(), self.size, "{}", self.name);
        let size = peek_u32(arg, 0, self.name)?;
        let len = size as usize;
        if len < self.min_size {
            return Err(UapiError::ArgszTooSmall {
                what: self.name,
                argsz: size,
                min: self.min_size,
            });
        }
        if arg.len() < len {
            return Err(UapiError::BufferTooShort {
                what: self.name,
                len: arg.len(),
                need: len,
            });
        }
        if len > self.size && arg[self.size..len].iter().any(|&b| b != 0) {
            return Err(UapiError::TrailingBytes {
                what: self.name,
                size,
                known: self.size,
            });
        }
        Ok(read_prefix(arg, len))
    }

    /// Writes `value` back over the caller's argument, `min(size, sizeof)` bytes, as
    /// `iommufd_ucmd_respond` does (the argument passed [`Ucmd::copy_in`]).
    pub fn respond<T: Wire>(&self, value: &T, arg: &mut [u8]) {
        let size = peek_u32(arg, 0, self.name).map_or(0, |s| s as usize);
        let n = size.min(self.size).min(arg.len());
        let image = value.to_bytes();
        arg[..n].copy_from_slice(&image[..n]);
    }
}

/// Checks a VFIO device cdev argument as `vfio_df_ioctl_*` does: `argsz` (the first
/// `u32`) must cover `minsz` (`-EINVAL`) and the buffer the bytes it reads (`-EFAULT`);
/// the structure is read from `min(argsz, sizeof)` bytes over zeroes.
pub fn copy_vfio_arg<T: Wire>(
    arg: &[u8],
    minsz: usize,
    what: &'static str,
) -> Result<T, UapiError> {
    crate::wire::read_with_argsz(arg, minsz, what)
}

/// The `minsz` of `VFIO_DEVICE_BIND_IOMMUFD`: up to `out_devid`.
pub const BIND_IOMMUFD_MINSZ: usize =
    offset_of!(VfioDeviceBindIommufd, out_devid) + size_of::<u32>();
/// The `minsz` of `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: up to `pt_id` (`pasid` is read only
/// with [`VFIO_DEVICE_ATTACH_PASID`], then `argsz` must cover it).
pub const ATTACH_IOMMUFD_PT_MINSZ: usize =
    offset_of!(VfioDeviceAttachIommufdPt, pt_id) + size_of::<u32>();
/// The `minsz` of `VFIO_DEVICE_DETACH_IOMMUFD_PT`: up to `flags` (`pasid` is read only
/// with [`VFIO_DEVICE_DETACH_PASID`]).
pub const DETACH_IOMMUFD_PT_MINSZ: usize =
    offset_of!(VfioDeviceDetachIommufdPt, flags) + size_of::<u32>();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // `_IO(';', nr)`: the values the iommufd and vfio-ioctls crates assert.
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC, 15233);
        assert_eq!(IOMMU_IOAS_MAP, 15237);
        assert_eq!(IOMMU_IOAS_UNMAP, 15238);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
        assert_eq!(IOMMU_HWPT_INVALIDATE, 0x3b8d);
        assert_eq!(IOMMU_FAULT_QUEUE_ALLOC, 0x3b8e);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(IOMMU_VIOMMU_ALLOC, 0x3b90);
        assert_eq!(IOMMU_VDEVICE_ALLOC, 0x3b91);
        assert_eq!(IOMMU_VEVENTQ_ALLOC, 0x3b93);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 15222);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT, 0x3b78);
    }

    #[test]
    fn sizes_and_minimums_match_the_kernel_table() {
        let rows = [
            (UCMD_DESTROY, 8, 8),
            (UCMD_IOAS_ALLOC, 12, 12),
            (UCMD_IOAS_ALLOW_IOVAS, 24, 24),
            (UCMD_IOAS_COPY, 40, 40),
            (UCMD_IOAS_IOVA_RANGES, 32, 32),
            (UCMD_IOAS_MAP, 40, 40),
            (UCMD_IOAS_MAP_FILE, 40, 40),
            (UCMD_IOAS_UNMAP, 24, 24),
            (UCMD_HWPT_ALLOC, 48, 24),
            (UCMD_HWPT_INVALIDATE, 32, 32),
            (UCMD_GET_HW_INFO, 40, 32),
            (UCMD_FAULT_QUEUE_ALLOC, 16, 16),
            (UCMD_HWPT_SET_DIRTY_TRACKING, 16, 16),
            (UCMD_HWPT_GET_DIRTY_BITMAP, 48, 48),
            (UCMD_VIOMMU_ALLOC, 40, 24),
            (UCMD_VDEVICE_ALLOC, 24, 24),
            (UCMD_VEVENTQ_ALLOC, 32, 32),
        ];
        for (u, size, min) in rows {
            assert_eq!((u.size, u.min_size), (size, min), "{}", u.name);
        }
        assert_eq!(size_of::<IommuHwptVtdS1>(), 24);
        assert_eq!(size_of::<IommuHwptVtdS1Invalidate>(), 24);
        assert_eq!(size_of::<IommuHwInfoVtd>(), 24);
        assert_eq!(size_of::<IommuHwInfoArmSmmuv3>(), 40);
        assert_eq!(size_of::<IommuHwptArmSmmuv3>(), 16);
        assert_eq!(size_of::<IommuViommuArmSmmuv3Invalidate>(), 16);
        assert_eq!(size_of::<IommuHwptPgfault>(), 40);
        assert_eq!(size_of::<IommuHwptPageResponse>(), 8);
        assert_eq!(size_of::<VfioDeviceBindIommufd>(), 24);
        assert_eq!(
            (
                BIND_IOMMUFD_MINSZ,
                ATTACH_IOMMUFD_PT_MINSZ,
                DETACH_IOMMUFD_PT_MINSZ
            ),
            (16, 12, 8)
        );
    }

    #[test]
    fn ucmd_size_rules() {
        let u = UCMD_IOAS_MAP;
        let map = IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_READABLE,
            ioas_id: 3,
            user_va: 0x1000,
            length: 0x2000,
            iova: 0x4000,
            ..Default::default()
        };
        let mut bytes = map.to_bytes();
        assert_eq!(u.copy_in::<IommuIoasMap>(&bytes).unwrap(), map);
        // One byte short of the minimum: EINVAL.
        bytes[0] = 39;
        assert_eq!(
            Errno::from(&u.copy_in::<IommuIoasMap>(&bytes).unwrap_err()),
            Errno::EINVAL
        );
        // One byte more, zero: the same as the exact size.
        bytes[0] = 41;
        bytes.push(0);
        assert_eq!(
            u.copy_in::<IommuIoasMap>(&bytes).unwrap(),
            IommuIoasMap { size: 41, ..map }
        );
        // One byte more, non-zero: E2BIG.
        bytes[40] = 1;
        assert_eq!(
            Errno::from(&u.copy_in::<IommuIoasMap>(&bytes).unwrap_err()),
            Errno::E2BIG
        );
        // A size the buffer does not hold: EFAULT.
        assert_eq!(
            Errno::from(&u.copy_in::<IommuIoasMap>(&bytes[..40]).unwrap_err()),
            Errno::EFAULT
        );
        assert_eq!(
            Errno::from(&u.copy_in::<IommuIoasMap>(&[]).unwrap_err()),
            Errno::EFAULT
        );
    }

    #[test]
    fn optional_tails_read_as_zero_and_respond_covers_size_only() {
        let u = UCMD_HWPT_ALLOC;
        let full = IommuHwptAlloc {
            size: 24,
            flags: IOMMU_HWPT_ALLOC_NEST_PARENT,
            pt_id: 7,
            data_type: 9,
            fault_id: 4,
            ..Default::default()
        };
        let mut bytes = full.to_bytes();
        let got: IommuHwptAlloc = u.copy_in(&bytes).unwrap();
        assert_eq!((got.pt_id, got.data_type, got.fault_id), (7, 0, 0));
        let out = IommuHwptAlloc {
            out_hwpt_id: 5,
            data_type: 0xdead,
            ..got
        };
        u.respond(&out, &mut bytes);
        let back: IommuHwptAlloc = read_prefix(&bytes, 48);
        assert_eq!(back.out_hwpt_id, 5);
        assert_eq!(back.data_type, 9, "bytes past size are not written");
    }

    #[test]
    fn hw_info_round_trips_through_its_union() {
        let mut info = hw_info(40, IOMMU_HW_INFO_FLAG_INPUT_TYPE, 2, 1);
        info.out_max_pasid_log2 = 20;
        info.out_capabilities = IOMMU_HW_CAP_PCI_PASID_EXEC;
        let bytes = info.to_bytes();
        assert_eq!(&bytes[24..28], &1u32.to_le_bytes());
        assert_eq!(bytes[28], 20);
        let back = IommuHwInfo::read(&bytes);
        assert_eq!(hw_info_data_type(&back), 1);
        assert_eq!(back.out_capabilities, IOMMU_HW_CAP_PCI_PASID_EXEC);
        assert_eq!(back.to_bytes(), bytes);
    }

    use crate::error::Errno;
}
