//! iommufd on an SMMUv3 host (`vsva host --iommu smmuv3`) served on a socket in this
//! process, and VMMs over real `SOCK_SEQPACKET` connections: each connection one
//! `/dev/iommu` on the host's SMMUv3, its device the host's DMA engine behind the physical
//! SMMUv3 (strict mode) with a StreamID, its RAM a memfd mapped with `IOMMU_IOAS_MAP_FILE`.
//! A nest parent, a vIOMMU, a vDEVICE and a nested HWPT carrying the guest's STE move
//! bytes at guest virtual addresses through the guest's CD table and stage 1 over stage
//! 2; guest commands go through `IOMMU_HWPT_INVALIDATE` on the vIOMMU; stage-1 faults
//! reach the vEVENT queue fd the reply passed. A closed connection leaves nothing (no
//! VMID, its STE aborting, no TLB entry, no object); refused calls change nothing.

mod common;

use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::path::Path;

use common::{settle, Served, WAIT};
use vm_memory::{Bytes, GuestAddress};
use vsva_hw::dma::{CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, Operation};
use vsva_service::client::{FaultQueueFd, RemoteFile, SharedRam};
use vsva_service::protocol::FILE_IOMMUFD;
use vsva_service::{server::HostConfig, server::IommuArch};
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, cmd::Cmd, cmd::TlbiAddr, event::Event,
    event::EventType, features::Features, walk::PageSize,
};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::Wire;
use vsva_uapi::{
    error::Errno, file::arm_smmuv3_commands, file::HwptData, file::IommufdIoctls, file::UapiFile,
    file::UserArray,
};
use vsva_vtd::addr::Pasid;

const RAM: u64 = 8 << 20;
const PAGE: u64 = 4096;
/// The guest's CD table (16 CDs, linear) and its stage-1 tables.
const CD_GPA: u64 = 0x8_0000;
const PT_GPA: u64 = 0x10_0000;
const SRC_GPA: u64 = 0x40_0000;
const DST_GPA: u64 = 0x50_0000;
const COMP_GPA: u64 = 0x60_0000;
/// Where the VMM puts the structures it passes by pointer (never DMA'd).
const SCRATCH_GPA: u64 = RAM - PAGE;
const SRC_GVA: u64 = 0x7f00_1234_0000;
const DST_GVA: u64 = 0x7f00_5678_0000;
const COMP_GVA: u64 = 0x7f00_9abc_0000;
/// A GVA the guest's stage 1 does not map.
const HOLE_GVA: u64 = 0x7f00_0000_0000;
const SSID: u32 = 3;
const ASID: u16 = 0x21;
const VSID: u64 = 0x42;
const RW_EL0: u64 = D::AF | D::AP_EL0 | D::NG;

fn serve() -> Served {
    common::serve(&HostConfig {
        iommu: IommuArch::Smmuv3,
        memory: 256 << 20,
        strict: true,
        ..HostConfig::default()
    })
}

/// A VMM on an iommufd connection to the SMMUv3 host: its RAM shared (`ADD_MEMORY`, for
/// the structures passed by pointer) and mapped at IOVA 0 with `IOMMU_IOAS_MAP_FILE`, its
/// device bound, and a guest process's stage 1 and CD at SSID in guest RAM.
struct Vmm {
    f: RemoteFile,
    ram: SharedRam,
    sid: u32,
    dev_id: u32,
    ioas: u32,
    next_pt: u64,
}

impl Vmm {
    fn new(path: &Path) -> Vmm {
        let f = RemoteFile::connect_kind(path, FILE_IOMMUFD).unwrap();
        let ram = SharedRam::new(RAM).unwrap();
        ram.share(&f).unwrap();
        let (sid, dev_id) = f.device_add_bound().unwrap();
        let mut vmm = Vmm {
            f,
            ram,
            sid: u32::from(sid.rid()),
            dev_id,
            ioas: 0,
            next_pt: PT_GPA + PAGE,
        };
        vmm.ioas = vmm.f.ioas_alloc().unwrap();
        vmm.map_file(vmm.ram.file.as_raw_fd(), 0, RAM, 0).unwrap();
        let cd = ContextDescriptor::new(PT_GPA, 16, ASID);
        let mut s1 = TableBuilder::stage1(&cd.s1_config(&Features::VSVA).unwrap());
        for (gva, gpa, n) in [
            (SRC_GVA, SRC_GPA, 2),
            (DST_GVA, DST_GPA, 2),
            (COMP_GVA, COMP_GPA, 1),
        ] {
            for i in 0..n {
                let mut next = vmm.next_pt;
                let mut frames = || {
                    next += PAGE;
                    Some(next - PAGE)
                };
                s1.map(
                    &*vmm.ram.mem,
                    &mut frames,
                    gva + i * PAGE,
                    gpa + i * PAGE,
                    PageSize::Size4K,
                    RW_EL0,
                )
                .unwrap();
                vmm.next_pt = next;
            }
        }
        for (i, w) in cd.encode().iter().enumerate() {
            vmm.write(
                CD_GPA + u64::from(SSID) * 64 + 8 * i as u64,
                &w.to_le_bytes(),
            );
        }
        vmm
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.ram.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.ram.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b
    }

    /// Puts `bytes` in the VMM's scratch page; their address in this process.
    fn user(&self, bytes: &[u8]) -> u64 {
        self.write(SCRATCH_GPA, bytes);
        self.ram.addr() + SCRATCH_GPA
    }

    /// An ioctl on the connection with `v`, which gets what the host wrote back.
    fn call<T: Wire>(&self, cmd: u32, v: &mut T) -> Result<(), Errno> {
        let mut bytes = v.to_bytes();
        let r = self.f.ioctl(cmd, &mut bytes);
        *v = T::read(&bytes);
        r.map(|_| ())
    }

    fn map_file(&self, fd: i32, start: u64, length: u64, iova: u64) -> Result<(), Errno> {
        self.f
            .ioas_map_file(self.ioas, IOMMU_IOAS_MAP_FLAGS, fd, start, length, iova)
            .map(drop)
    }

    fn attach(&self, pt_id: u32) -> Result<(), Errno> {
        self.f.device_attach_pt(pt_id, None).map(drop)
    }

    fn hwpt_alloc(&self, flags: u32, pt_id: u32, data: Option<&[u8]>) -> Result<u32, Errno> {
        let data = data.map_or(HwptData::NONE, |d| HwptData {
            len: d.len() as u32,
            ..HwptData::arm_smmuv3(self.user(d))
        });
        self.f.hwpt_alloc(self.dev_id, pt_id, flags, data, 0)
    }

    fn nested(&self, viommu: u32, vste: [u64; 2]) -> Result<u32, Errno> {
        let data = IommuHwptArmSmmuv3 { ste: vste }.to_bytes();
        self.hwpt_alloc(0, viommu, Some(&data))
    }

    fn viommu(&self, hwpt_id: u32, type_: u32) -> Result<u32, Errno> {
        self.f.viommu_alloc(self.dev_id, hwpt_id, type_)
    }

    fn vdevice(&self, viommu_id: u32, virt_id: u64) -> Result<u32, Errno> {
        self.f.vdevice_alloc(viommu_id, self.dev_id, virt_id)
    }

    /// `IOMMU_VEVENTQ_ALLOC`: the queue's id and its fd, taken from the connection.
    fn veventq(&self, viommu_id: u32, depth: u32) -> Result<(u32, FaultQueueFd), Errno> {
        let (id, fd) = self
            .f
            .veventq_alloc(viommu_id, IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, depth)?;
        let fd = self.f.take_fd(fd).expect("the fd given");
        Ok((id, FaultQueueFd(fd)))
    }

    fn destroy(&self, id: u32) -> Result<(), Errno> {
        self.f.destroy(id)
    }

    /// `IOMMU_HWPT_INVALIDATE` of `cmds` through `viommu`: the result and `entry_num`.
    fn invalidate(&self, viommu: u32, cmds: &[[u64; 2]]) -> (Result<(), Errno>, u32) {
        let uptr = self.user(&arm_smmuv3_commands(cmds));
        self.f
            .hwpt_invalidate(viommu, UserArray::arm_smmuv3(uptr, cmds.len() as u32))
    }

    /// A memmove of `len` bytes by the device at device addresses, with `ssid`; the
    /// completion status (the record at device address `comp.0`, guest physical `comp.1`).
    fn memmove(
        &self,
        ssid: Option<u32>,
        src: u64,
        dst: u64,
        len: u32,
        comp: (u64, u64),
    ) -> CompletionStatus {
        self.write(comp.1, &[0; 32]);
        let d = Descriptor {
            pasid: ssid.map(|p| Pasid::new(p).unwrap()),
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::Always(comp.0),
            op: Operation::Memmove {
                src,
                dst,
                size: len,
            },
        };
        self.f.device_write(0, &d.encode()).unwrap();
        self.f.device_run().unwrap();
        CompletionRecord::from_bytes(&self.read(comp.1, 32).try_into().unwrap())
            .map_or(CompletionStatus::None, |r| r.status)
    }

    /// `data` copied by the device from SRC to DST at guest virtual addresses (SSID), or
    /// at guest physical ones (no SubstreamID: the STE's S1DSS bypass); whether the bytes
    /// arrived.
    fn copy(&self, data: &[u8], virt: bool) -> bool {
        self.write(SRC_GPA, data);
        self.write(DST_GPA, &vec![0; data.len()]);
        let st = if virt {
            self.memmove(
                Some(SSID),
                SRC_GVA,
                DST_GVA,
                data.len() as u32,
                (COMP_GVA, COMP_GPA),
            )
        } else {
            self.memmove(
                None,
                SRC_GPA,
                DST_GPA,
                data.len() as u32,
                (COMP_GPA, COMP_GPA),
            )
        };
        st == CompletionStatus::Success && self.read(DST_GPA, data.len()) == data
    }
}

fn errno<T>(e: i32) -> Result<T, Errno> {
    Err(Errno::new(e))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The guest's STE words: stage 1 through the CD table at CD_GPA (16 CDs, linear),
/// S1DSS bypass, write-back cacheable inner shareable table walks, EATS full (the host's
/// device uses ATS).
fn vste_s1() -> [u64; 2] {
    [
        1 | 0b101 << 1 | CD_GPA | 4 << 59,
        1 | 1 << 2 | 1 << 4 | 3 << 6 | 1 << 28,
    ]
}

fn tlbi_nh_va(asid: u16, va: u64) -> [u64; 2] {
    Cmd::TlbiNhVa {
        vmid: 0,
        asid,
        addr: TlbiAddr {
            addr: va,
            leaf: true,
            ..TlbiAddr::default()
        },
    }
    .encode()
}

/// Word 0 of an STE: V=1 Config=abort, no S1ContextPtr.
fn aborts(ste: Option<[u64; 8]>) -> bool {
    ste.is_some_and(|s| s[0] & 0xf == 1 && s[0] & 0x000f_ffff_ffff_ffc0 == 0)
}

/// Word 0 of an STE: V=1 Config=nested (0b111).
fn nests(ste: Option<[u64; 8]>) -> bool {
    ste.is_some_and(|s| s[0] & 0xf == 0xf)
}

/// The next vEVENT the queue gives, waiting at most [`WAIT`] for the host's interrupt
/// thread: its header and record.
fn next_vevent(q: &FaultQueueFd) -> (IommufdVeventHeader, Option<Event>) {
    assert!(q.wait_readable(WAIT), "no vEVENT within {WAIT:?}");
    let mut buf = [0u8; 256];
    let n = q.read(&mut buf).unwrap();
    let h = IommufdVeventHeader::read(&buf);
    if h.flags & IOMMU_VEVENTQ_FLAG_LOST_EVENTS != 0 {
        assert_eq!(n, 8, "a lost-events header alone");
        return (h, None);
    }
    assert_eq!(n, 8 + 32, "one event a read");
    let e = IommuVeventArmSmmuv3::read(&buf[8..]);
    (h, Some(Event::decode(e.evt).unwrap()))
}

/// The VMM's set-up on its connection: nest parent (the RID's STE on it), vIOMMU, vEVENT
/// queue, vDEVICE with [`VSID`], a nested HWPT with the guest's STE attached.
struct Nested {
    parent: u32,
    viommu: u32,
    veventq: u32,
    queue: FaultQueueFd,
    nested: u32,
}

fn nest(vmm: &Vmm) -> Nested {
    let parent = vmm
        .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vmm.ioas, None)
        .unwrap();
    vmm.attach(parent).unwrap();
    let viommu = vmm.viommu(parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3).unwrap();
    let (veventq, queue) = vmm.veventq(viommu, 4).unwrap();
    vmm.vdevice(viommu, VSID).unwrap();
    let nested = vmm.nested(viommu, vste_s1()).unwrap();
    vmm.attach(nested).unwrap();
    Nested {
        parent,
        viommu,
        veventq,
        queue,
        nested,
    }
}

#[test]
fn an_smmu_iommufd_over_the_socket_nests_moves_bytes_reports_events_and_leaves_nothing() {
    let served = serve();
    let smmu = served.service.smmu().unwrap().clone();
    let probe = RemoteFile::connect_kind(&served.path, FILE_IOMMUFD).unwrap();
    let before = probe.host_state().unwrap();
    let a = Vmm::new(&served.path);
    let b = Vmm::new(&served.path);
    assert_ne!(a.sid, b.sid);
    assert!(aborts(smmu.ste(a.sid)), "bound, attached to nothing");
    // The memfd mapped is the shared RAM's: found by its inode, no second window.
    let mapped = probe.host_state().unwrap();
    assert_eq!(mapped.windows, before.windows + 2);
    assert_eq!(mapped.dma_mappings, before.dma_mappings + 2);
    assert_eq!(mapped.domain_ids, before.domain_ids, "no stage 2 yet");

    let na = nest(&a);
    let nb = nest(&b);
    assert!(nests(smmu.ste(a.sid)), "{:x?}", smmu.ste(a.sid));
    assert!(nests(smmu.ste(b.sid)));
    let held = probe.host_state().unwrap();
    assert_eq!(held.domain_ids, before.domain_ids + 2, "a VMID each");
    assert_eq!(held.devices, before.devices + 2, "a stream each");
    assert_eq!(held.binds, before.binds + 2, "a guest STE each");
    let vmid_a = smmu
        .owned_streams()
        .into_iter()
        .find(|&(s, _)| s == a.sid)
        .unwrap()
        .1;

    // Bytes at guest virtual addresses (the guest's CD and stage 1 over stage 2), and at
    // guest physical ones without a SubstreamID.
    for (vmm, seed) in [(&a, 1u8), (&b, 2u8)] {
        assert!(vmm.copy(&pattern(6000, seed), true));
        assert!(vmm.copy(&pattern(3000, seed + 7), false));
    }
    assert!(smmu.hardware().tlb_entries_of(vmid_a) > 0);

    // Guest commands through the vIOMMU: a TLBI_NH_VA is carried out; a command a VM may
    // not give (CMD_CFGI_ALL) ends the array there, the one before it carried out.
    let tlbi = tlbi_nh_va(ASID, DST_GVA);
    assert_eq!(a.invalidate(na.viommu, &[tlbi]), (Ok(()), 1));
    let (r, done) = a.invalidate(na.viommu, &[tlbi, Cmd::CFGI_ALL.encode(), tlbi]);
    assert_eq!((r, done), (Err(Errno::new(libc::EIO)), 1));
    assert!(a.copy(&pattern(4096, 5), true));

    // A guest process reads a GVA its stage 1 does not map: F_TRANSLATION reaches A's
    // vEVENT queue with A's vSID, B's queue gets nothing.
    let st = a.memmove(Some(SSID), HOLE_GVA, DST_GVA, 64, (COMP_GVA, COMP_GPA));
    assert_ne!(st, CompletionStatus::Success);
    let (h, e) = next_vevent(&na.queue);
    let e = e.unwrap();
    assert_eq!((h.flags, h.sequence), (0, 0));
    assert_eq!(e.event_type, EventType::Translation);
    assert_eq!(
        (e.sid, e.ssid, e.input_addr),
        (VSID as u32, Some(SSID), HOLE_GVA)
    );
    let mut buf = [0u8; 64];
    assert_eq!(nb.queue.read(&mut buf), Err(Errno::EAGAIN));

    // Referenced objects stay; destroying the queue object ends its fd (EOF); another can
    // be made.
    for busy in [na.parent, na.viommu, na.nested] {
        assert_eq!(a.destroy(busy), Err(Errno::EBUSY));
    }
    a.destroy(na.veventq).unwrap();
    assert!(na.queue.wait_readable(WAIT));
    assert_eq!(na.queue.read(&mut buf), Ok(0));
    let (_, again) = a.veventq(na.viommu, 4).unwrap();

    // A closes its connection without undoing anything: its STE aborts, its VMID and TLB
    // entries go, its queue fd reads EOF; B's stream is as it was and still moves bytes.
    let b_ste = smmu.ste(b.sid);
    let (a_sid, with_a) = (a.sid, probe.host_state().unwrap());
    drop(a);
    let after = settle(&probe, |s| s.connections == with_a.connections - 1);
    assert_eq!(after.domain_ids, before.domain_ids + 1);
    assert_eq!(after.devices, before.devices + 1);
    assert_eq!(after.binds, before.binds + 1);
    assert!(aborts(smmu.ste(a_sid)), "{:x?}", smmu.ste(a_sid));
    assert!(!smmu.vmids().contains(&vmid_a));
    assert_eq!(smmu.hardware().tlb_entries_of(vmid_a), 0);
    assert!(again.wait_readable(WAIT));
    assert_eq!(again.read(&mut buf), Ok(0));
    assert_eq!(smmu.ste(b.sid), b_ste);
    assert!(b.copy(&pattern(5000, 9), true));

    drop(nb);
    drop(b);
    let left = settle(&probe, |s| s.holds_as(&before));
    assert!(left.holds_as(&before), "{left:?} vs {before:?}");
    assert_eq!(left.strict_violations, 0);
    drop(probe);
    drop(smmu);
    let report = served.finish();
    assert!(report.clean(), "{report}");
}

#[test]
fn refused_smmu_iommufd_calls_over_the_socket_change_nothing() {
    let served = serve();
    let smmu = served.service.smmu().unwrap().clone();
    let probe = RemoteFile::connect_kind(&served.path, FILE_IOMMUFD).unwrap();
    let before = probe.host_state().unwrap();
    let a = Vmm::new(&served.path);
    let na = nest(&a);
    let ste = smmu.ste(a.sid);
    let held = probe.host_state().unwrap();
    let unchanged = |what: &str| {
        assert_eq!(probe.host_state().unwrap(), held, "{what}");
        assert_eq!(smmu.ste(a.sid), ste, "{what}");
    };

    // Not on the SMMU file's table (BIND is DEVICE_ADD's): ENOTTY before the file sees
    // them.
    for cmd in [VFIO_DEVICE_BIND_IOMMUFD, IOMMU_OPTION] {
        assert_eq!(
            a.f.ioctl(cmd, &mut [0u8; 64]),
            errno(libc::ENOTTY),
            "{cmd:#x}"
        );
        unchanged("an unserved ioctl");
    }
    // Dirty tracking reaches the file, which refuses it on a stage-2 (nest-parent) HWPT.
    let set = IommuHwptSetDirtyTracking {
        size: 16,
        flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
        hwpt_id: na.parent,
        __reserved: 0,
    };
    assert_eq!(
        a.f.ioctl(IOMMU_HWPT_SET_DIRTY_TRACKING, &mut set.to_bytes()),
        errno(libc::EOPNOTSUPP)
    );
    unchanged("dirty tracking on a stage 2");
    // Arguments too short for their own fields.
    for cmd in [
        IOMMU_VIOMMU_ALLOC,
        IOMMU_VDEVICE_ALLOC,
        IOMMU_VEVENTQ_ALLOC,
        IOMMU_HWPT_ALLOC,
        IOMMU_HWPT_INVALIDATE,
    ] {
        // No size at all (EFAULT where the kernel reads it), a size below the minimum.
        assert!(a.f.ioctl(cmd, &mut []).is_err(), "{cmd:#x}");
        for len in [4usize, 8] {
            let r = a.f.ioctl(cmd, &mut vec![0u8; len]);
            assert_eq!(r, errno(libc::EINVAL), "{cmd:#x} of {len} bytes");
            unchanged("a short argument");
        }
    }
    // Pointers outside the connection's windows: EFAULT, the file never sees them.
    let outside = 0x1000;
    let mut alloc = IommuHwptAlloc {
        size: size_of::<IommuHwptAlloc>() as u32,
        dev_id: a.dev_id,
        pt_id: na.viommu,
        data_type: IOMMU_HWPT_DATA_ARM_SMMUV3,
        data_len: 16,
        data_uptr: outside,
        ..Default::default()
    };
    assert_eq!(a.call(IOMMU_HWPT_ALLOC, &mut alloc), errno(libc::EFAULT));
    assert_eq!(alloc.data_uptr, outside, "the client's pointer back");
    let mut inv = IommuHwptInvalidate {
        size: size_of::<IommuHwptInvalidate>() as u32,
        hwpt_id: na.viommu,
        data_uptr: outside,
        data_type: IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
        entry_len: 16,
        entry_num: 2,
        __reserved: 0,
    };
    assert_eq!(a.call(IOMMU_HWPT_INVALIDATE, &mut inv), errno(libc::EFAULT));
    let mut viommu = IommuViommuAlloc {
        size: size_of::<IommuViommuAlloc>() as u32,
        type_: IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
        dev_id: a.dev_id,
        hwpt_id: na.parent,
        data_len: 8,
        data_uptr: outside,
        ..Default::default()
    };
    assert_eq!(a.call(IOMMU_VIOMMU_ALLOC, &mut viommu), errno(libc::EFAULT));
    unchanged("pointers outside the windows");

    // The file's own refusals, with Linux's errnos.
    assert_eq!(
        a.viommu(na.parent, IOMMU_VIOMMU_TYPE_DEFAULT),
        errno(libc::EOPNOTSUPP)
    );
    assert_eq!(
        a.viommu(a.ioas, IOMMU_VIOMMU_TYPE_ARM_SMMUV3),
        errno(libc::ENOENT)
    );
    assert_eq!(a.vdevice(na.viommu, VSID), errno(libc::EEXIST));
    assert_eq!(a.veventq(na.viommu, 4).err(), Some(Errno::EEXIST));
    assert_eq!(a.veventq(na.viommu, 0).err(), Some(Errno::EINVAL));
    assert_eq!(a.veventq(na.parent, 4).err(), Some(Errno::ENOENT));
    // A field a VM may not set (STE word 1 bit 40), a Config a VM may not ask (stage 2).
    let mut vste = vste_s1();
    vste[1] |= 1 << 40;
    assert_eq!(a.nested(na.viommu, vste), errno(libc::EIO));
    assert_eq!(a.nested(na.viommu, [1 | 0b110 << 1, 0]), errno(libc::EIO));
    assert_eq!(a.nested(na.parent, vste_s1()), errno(libc::EOPNOTSUPP));
    // Invalidation arrays: an entry shorter than a command, the wrong data type, through a
    // nested HWPT.
    inv.data_uptr = a.user(&[0; 32]);
    inv.entry_len = 8;
    assert_eq!(a.call(IOMMU_HWPT_INVALIDATE, &mut inv), errno(libc::EINVAL));
    inv.entry_len = 16;
    inv.data_type = IOMMU_HWPT_INVALIDATE_DATA_VTD_S1;
    assert_eq!(a.call(IOMMU_HWPT_INVALIDATE, &mut inv), errno(libc::EINVAL));
    inv.data_type = IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3;
    inv.hwpt_id = na.nested;
    assert_eq!(
        a.call(IOMMU_HWPT_INVALIDATE, &mut inv),
        errno(libc::EOPNOTSUPP)
    );
    // A vIOMMU is no page table to attach to; the attachment stays.
    assert_eq!(a.attach(na.viommu), errno(libc::EINVAL));
    // IOAS_MAP_FILE: no such fd, a file that is not a memfd, a range beyond the memfd.
    let dir = std::env::temp_dir().join(format!("vsva-smmu-ifd-file-{}", std::process::id()));
    std::fs::write(&dir, [0u8; 8192]).unwrap();
    let regular = std::fs::File::open(&dir).unwrap();
    assert_eq!(a.map_file(-1, 0, PAGE, 0x100_0000), errno(libc::EBADF));
    assert_eq!(
        a.map_file(regular.as_raw_fd(), 0, PAGE, 0x100_0000),
        errno(libc::EINVAL)
    );
    assert_eq!(
        a.map_file(a.ram.file.as_raw_fd(), RAM - PAGE, 2 * PAGE, 0x100_0000),
        errno(libc::EINVAL)
    );
    drop(regular);
    let _ = std::fs::remove_file(&dir);
    unchanged("the file's refusals");
    // And the VM still moves bytes at its guest virtual addresses.
    assert!(a.copy(&pattern(4096, 3), true));

    drop(na);
    drop(a);
    let left = settle(&probe, |s| s.holds_as(&before));
    assert!(left.holds_as(&before), "{left:?} vs {before:?}");
    drop(probe);
    drop(smmu);
    assert!(served.finish().clean());
}
