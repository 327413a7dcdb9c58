//! The iommufd ioctls that pass file descriptors, over a real `vsva host` process.
//!
//! `IOMMU_FAULT_QUEUE_ALLOC` gives the client a file descriptor (SCM_RIGHTS) it reads
//! whole page request groups from and writes page responses to, by cookie; refused calls
//! change nothing, the queues a connection may hold are bounded, and a killed client's
//! queue and groups are released.
//!
//! `IOMMU_IOAS_MAP_FILE`: the memfd travels with the request and the host maps the file's
//! own pages: the VMM's shared RAM is found by its inode, of another memfd the range mapped
//! becomes host memory until its area is unmapped, and the device's DMA lands in the file.
//! Bad fds and bad offsets are refused with the kernel's errnos and change nothing.
//!
//! Issue 12: a VM cannot use another VM's iommufd objects. Each connection is its own
//! `/dev/iommu`, whose ids name its own objects only (the kernel's per-file `xarray` of
//! objects): the ids of VM A's device, IOAS, HWPTs and fault queue, and on SMMUv3 its
//! vIOMMU, vDEVICE and vEVENT queue, are unknown to VM B (ENOENT) in every ioctl that names
//! an object, over the call ring and over the socket, and nothing of A or of the host
//! changes: the host's `STATE` is as before each refused call, and A's objects are all
//! there, in use, and move A's bytes.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vsva_service::protocol::{HostState, FILE_IOMMUFD};
use vsva_service::{client::RemoteFile, client::SharedRam, client::Transport};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, file::UapiFile};
use vsva_vtd::{
    addr::Pasid, builder::FrameSource, builder::MapFlags, builder::PageTableBuilder,
    builder::TableFormat, flpte::FlPagingMode, walk::PageSize,
};

mod common;
#[path = "common/rerun.rs"]
mod rerun;
use common::{settle, start_host, stop_clean, wait_exit, WAIT};
#[path = "common/iommufd.rs"]
mod iommufd;
use iommufd::{attach_pt, connect, destroy, fill_iova, io, ioas_alloc};
use rerun::spawn_ready;

const RAM: u64 = 4 << 20;
const HOST_MEMORY: &str = "256M";
const PAGE: u64 = 4096;
/// Guest RAM the guest's first-level tables are built in.
const GUEST_PT: (u64, u64) = (0x80000, 0xa0000);
/// Where structures passed by pointer are put.
const SCRATCH: u64 = RAM - PAGE;
const GVA: u64 = 0x4000_0000;
/// The guest page the faulting GVA gets once the VMM answers.
const TARGET: u64 = 0x20000;
const PASID: u32 = 9;
const RECORD: usize = std::mem::size_of::<IommuHwptPgfault>();

struct GuestFrames(u64);

impl FrameSource for GuestFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        (self.0 < GUEST_PT.1).then(|| {
            self.0 += PAGE;
            self.0 - PAGE
        })
    }

    fn free_table(&mut self, _frame: u64) {}
}

/// A VMM on an iommufd connection: its RAM mapped at IOVA 0 in an IOAS, its device's RID
/// on a nest-parent HWPT, a fault queue, and PASID 9 attached to a nested HWPT whose guest
/// first-level table maps nothing yet.
struct Vmm {
    f: RemoteFile,
    ram: SharedRam,
    tables: PageTableBuilder,
    frames: GuestFrames,
    dev_id: u32,
    fault_id: u32,
    queue: Arc<dyn UapiFile>,
    queue_fd: std::os::fd::OwnedFd,
}

fn fault_alloc(f: &RemoteFile, flags: u32) -> Result<IommuFaultAlloc, Errno> {
    io(
        f,
        IOMMU_FAULT_QUEUE_ALLOC,
        &IommuFaultAlloc {
            size: 16,
            flags,
            ..Default::default()
        },
    )
}

fn vmm(path: &Path) -> Vmm {
    let (f, ram) = connect(path, RAM);
    let (_, dev_id) = f.device_add_bound().unwrap();
    let ioas = ioas_alloc(&f);
    let rw = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
    io(
        &f,
        IOMMU_IOAS_MAP,
        &IommuIoasMap {
            size: 40,
            flags: rw,
            ioas_id: ioas,
            __reserved: 0,
            user_va: ram.addr(),
            length: RAM,
            iova: 0,
        },
    )
    .unwrap();
    let parent = io(
        &f,
        IOMMU_HWPT_ALLOC,
        &IommuHwptAlloc {
            size: 48,
            flags: IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID,
            dev_id,
            pt_id: ioas,
            ..Default::default()
        },
    )
    .unwrap()
    .out_hwpt_id;
    attach_pt(&f, 0, parent, 0).unwrap();
    let out = fault_alloc(&f, 0).unwrap();
    let queue_fd = f.take_fd(out.out_fault_fd as i32).expect("the fault fd");
    let queue: Arc<dyn UapiFile> = Arc::new(vsva_service::client::FaultQueueFd(
        queue_fd.try_clone().unwrap(),
    ));
    let mut frames = GuestFrames(GUEST_PT.0);
    let tables = PageTableBuilder::new(
        TableFormat::FirstLevel(FlPagingMode::FourLevel),
        &*ram.mem,
        &mut frames,
    )
    .unwrap();
    let s1 = IommuHwptVtdS1 {
        flags: 0,
        pgtbl_addr: tables.root(),
        addr_width: 48,
        __reserved: 0,
    };
    ram.mem
        .write_slice(&s1.to_bytes(), GuestAddress(SCRATCH))
        .unwrap();
    let nested = io(
        &f,
        IOMMU_HWPT_ALLOC,
        &IommuHwptAlloc {
            size: 48,
            flags: IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_FAULT_ID_VALID,
            dev_id,
            pt_id: parent,
            data_type: IOMMU_HWPT_DATA_VTD_S1,
            data_len: s1.to_bytes().len() as u32,
            data_uptr: ram.addr() + SCRATCH,
            fault_id: out.out_fault_id,
            ..Default::default()
        },
    )
    .unwrap()
    .out_hwpt_id;
    attach_pt(&f, VFIO_DEVICE_ATTACH_PASID, nested, PASID).unwrap();
    Vmm {
        f,
        ram,
        tables,
        frames,
        dev_id,
        fault_id: out.out_fault_id,
        queue,
        queue_fd,
    }
}

impl Vmm {
    /// The device writes 8 bytes at `gva` through PASID 9, waiting on a page request if
    /// the page is missing; returns the descriptors waiting for a page response.
    fn dma(&self, gva: u64) -> u64 {
        let desc = vsva_hw::dma::Descriptor {
            pasid: Some(Pasid::new(PASID).unwrap()),
            privileged: false,
            block_on_fault: true,
            completion: vsva_hw::dma::CompletionRequest::None,
            op: vsva_hw::dma::Operation::Fill {
                pattern: 0x4242_4242_4242_4242,
                dst: gva,
                size: 8,
            },
        };
        self.f.device_write(0, &desc.encode()).unwrap();
        self.f.device_run().unwrap()
    }

    fn map(&mut self, gva: u64, gpa: u64) {
        let flags = MapFlags::READ | MapFlags::WRITE | MapFlags::USER;
        self.tables
            .map(
                &*self.ram.mem,
                &mut self.frames,
                gva,
                gpa,
                PageSize::Size4K,
                flags,
            )
            .unwrap();
    }
}

/// Waits (bounded) until `fd` is readable.
fn readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: WAIT.as_secs() as i64,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

/// A page request round trip through the fault fd the host passed: the device faults on a
/// page its guest has not mapped, the VMM reads the whole group (one record, the cookie),
/// maps the page and writes the response; the device's retried DMA lands in the VMM's RAM.
/// Refused allocations change nothing; a connection holds at most four queues.
#[test]
fn a_page_request_round_trip_through_the_passed_fault_fd() {
    let host = start_host("faultq", HOST_MEMORY, &[]);
    let (probe, empty) = host.probe().unwrap();
    let mut v = vmm(host.socket());
    let set_up = probe.host_state().unwrap();
    assert_eq!((set_up.page_requests, set_up.faults_unread), (0, 0));

    // Refused: unknown flags (EOPNOTSUPP), nothing made.
    assert_eq!(fault_alloc(&v.f, 1).unwrap_err(), Errno::EOPNOTSUPP);
    assert_eq!(probe.host_state().unwrap(), set_up);
    // Three more queues fit; the fifth is EMFILE and changes nothing.
    let extra: Vec<IommuFaultAlloc> = (0..3).map(|_| fault_alloc(&v.f, 0).unwrap()).collect();
    assert_eq!(fault_alloc(&v.f, 0).unwrap_err(), Errno::new(libc::EMFILE));
    // A destroyed queue's fd reads end-of-file; its room is free again.
    let gone = v.f.take_fd(extra[0].out_fault_fd as i32).unwrap();
    destroy(&v.f, extra[0].out_fault_id).unwrap();
    assert!(readable(gone.as_fd()));
    assert_eq!(rustix::io::read(&gone, &mut [0u8; RECORD]), Ok(0));
    fault_alloc(&v.f, 0).unwrap();
    // A queue with a HWPT using it is busy.
    assert_eq!(destroy(&v.f, v.fault_id).unwrap_err(), Errno::EBUSY);

    let mut rec = [0u8; RECORD * 4];
    assert_eq!(v.queue.read(&mut rec).unwrap_err(), Errno::EAGAIN);
    // The device writes a page its guest has not mapped: it asks and waits.
    let missing = GVA + 4 * PAGE;
    assert_eq!(v.dma(missing), 1);
    assert!(readable(v.queue_fd.as_fd()), "no page request arrived");
    assert_eq!(v.queue.read(&mut rec).unwrap(), RECORD, "one whole group");
    let fault: IommuHwptPgfault = read_prefix(&rec, RECORD);
    assert_eq!(
        (fault.dev_id, fault.pasid, fault.addr),
        (v.dev_id, PASID, missing)
    );
    assert_eq!(
        fault.flags,
        IOMMU_PGFAULT_FLAGS_PASID_VALID | IOMMU_PGFAULT_FLAGS_LAST_PAGE
    );
    assert!(fault.perm & IOMMU_PGFAULT_PERM_WRITE != 0);
    assert_eq!(v.queue.read(&mut rec).unwrap_err(), Errno::EAGAIN);
    let waiting = probe.host_state().unwrap();
    assert_eq!((waiting.page_requests, waiting.faults_unread), (1, 0));
    // Fault records ride with `DEVICE_RUN` only on a container: refused here, unrun.
    assert_eq!(v.f.device_run_taking_records(), Err(Errno::EINVAL));
    assert_eq!(probe.host_state().unwrap(), waiting);

    // A response with an unknown cookie answers nothing; the group's own cookie does.
    let response = |cookie| {
        IommuHwptPageResponse {
            cookie,
            code: IOMMUFD_PAGE_RESP_SUCCESS,
        }
        .to_bytes()
    };
    assert_eq!(v.queue.write(&response(fault.cookie + 1)).unwrap(), 8);
    v.map(missing, TARGET);
    assert_eq!(v.queue.write(&response(fault.cookie)).unwrap(), 8);
    let deadline = std::time::Instant::now() + WAIT;
    while v.f.device_run().unwrap() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the device's DMA was never retried"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut got = [0u8; 8];
    v.ram
        .mem
        .read_slice(&mut got, GuestAddress(TARGET))
        .unwrap();
    assert_eq!(got, [0x42; 8], "the retried DMA landed in the VMM's RAM");
    let answered = probe.host_state().unwrap();
    assert_eq!((answered.page_requests, answered.faults_unread), (0, 0));

    // Closing the connection releases everything, the queues' fds read end-of-file.
    let Vmm {
        f, ram, queue_fd, ..
    } = v;
    drop(f);
    drop(ram);
    assert!(readable(queue_fd.as_fd()));
    assert_eq!(rustix::io::read(&queue_fd, &mut [0u8; RECORD]), Ok(0));
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

/// The client process: sets up the fault queue, leaves its device waiting on a page
/// request it does not answer, says "ready" and waits to be killed.
#[test]
fn fault_client_process() {
    let Ok(path) = std::env::var("VSVA_TEST_FAULT_CLIENT") else {
        return;
    };
    let v = vmm(Path::new(&path));
    assert_eq!(v.dma(GVA), 1);
    assert!(readable(v.queue_fd.as_fd()));
    println!("ready");
    loop {
        std::thread::park();
    }
}

fn spawn_fault_client(path: &Path) -> Child {
    spawn_ready(
        "fault_client_process",
        "VSVA_TEST_FAULT_CLIENT",
        path,
        Stdio::inherit(),
    )
}

/// A client killed with its fault fd open and a page request group unanswered: the host
/// releases the queue, the group, the device and everything else it held.
#[test]
fn a_client_killed_with_an_open_fault_fd_is_cleaned_up() {
    let host = start_host("faultkill", HOST_MEMORY, &[]);
    let (probe, empty) = host.probe().unwrap();
    let mut child = spawn_fault_client(host.socket());
    let held = probe.host_state().unwrap();
    assert_eq!(held.connections, 2);
    assert_eq!(held.page_requests + held.faults_unread, 1, "{held:?}");
    assert!(held.windows == 1 && held.devices == 1, "{held:?}");
    child.kill().unwrap();
    wait_exit(&mut child);
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

/// Bytes of each memfd `IOMMU_IOAS_MAP_FILE` is given.
const FILE: u64 = 64 << 10;

fn memfd(sealing: bool) -> std::fs::File {
    use rustix::fs::MemfdFlags;
    let mut flags = MemfdFlags::CLOEXEC;
    if sealing {
        flags |= MemfdFlags::ALLOW_SEALING;
    }
    let f = std::fs::File::from(rustix::fs::memfd_create("vsva-map-file", flags).unwrap());
    f.set_len(FILE).unwrap();
    f
}

/// MAP_FILE of the shared RAM memfd and of another memfd, each with the device's DMA
/// landing in the file (of the other, only the range mapped is held, an unmap releases it,
/// and the map works on once the fd passed is closed); every refusal leaves the host's
/// STATE as it was; unmapped and closed, the host is as before.
#[test]
fn map_file_maps_the_file_s_own_pages_and_refuses_bad_fds_and_offsets() {
    let host = start_host("mapfile", "256M", &[]);
    let (probe, empty) = host.probe().unwrap();
    let (f, ram) = connect(host.socket(), RAM);
    f.device_add_bound().unwrap();
    let ioas = ioas_alloc(&f);
    attach_pt(&f, 0, ioas, 0).unwrap();
    let rw = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
    let map = |fd: i32, start: u64, length: u64, iova: u64| IommuIoasMapFile {
        size: 40,
        flags: rw,
        ioas_id: ioas,
        fd,
        start,
        length,
        iova,
    };
    let state = || probe.host_state().unwrap();
    let refused = |m: IommuIoasMapFile, want: Errno| {
        let before: HostState = state();
        assert_eq!(io(&f, IOMMU_IOAS_MAP_FILE, &m).unwrap_err(), want, "{m:?}");
        assert_eq!(
            state(),
            before,
            "a refused MAP_FILE changed the host: {m:?}"
        );
    };

    // The VMM's RAM memfd, shared already: found by its inode, no new window.
    let shared = state();
    let out = io(
        &f,
        IOMMU_IOAS_MAP_FILE,
        &map(ram.file.as_raw_fd(), 1 << 20, 1 << 20, 4 << 20),
    )
    .unwrap();
    assert_eq!(
        (out.fd, out.start, out.iova),
        (ram.file.as_raw_fd(), 1 << 20, 4 << 20),
        "the client gets its own fields back"
    );
    let mapped = state();
    assert_eq!(
        (mapped.windows, mapped.dma_mappings),
        (shared.windows, shared.dma_mappings + 1)
    );
    fill_iova(&f, (4 << 20) + 0x1000, 0x1111_1111_1111_1111);
    let mut got = [0u8; 64];
    ram.mem
        .read_slice(&mut got, GuestAddress((1 << 20) + 0x1000))
        .unwrap();
    assert_eq!(got, [0x11; 64], "the DMA landed in the shared file's page");

    // Another memfd: the pages of the range mapped (not the whole file) are host memory
    // of their own; the DMA lands in the file, also once the client closed the fd it
    // passed.
    let other = memfd(true);
    let passed = other.try_clone().unwrap();
    io(
        &f,
        IOMMU_IOAS_MAP_FILE,
        &map(passed.as_raw_fd(), 0x2000, 0x4000, 8 << 20),
    )
    .unwrap();
    drop(passed);
    let adopted = state();
    assert_eq!(
        (adopted.windows, adopted.window_bytes),
        (mapped.windows + 1, mapped.window_bytes + 0x4000)
    );
    fill_iova(&f, (8 << 20) + 0x1000, 0x2222_2222_2222_2222);
    let mut got = [0u8; 64];
    other.read_exact_at(&mut got, 0x3000).unwrap();
    assert_eq!(got, [0x22; 64], "the DMA landed in the other file");
    // The same file again holds the pages of its own range.
    io(
        &f,
        IOMMU_IOAS_MAP_FILE,
        &map(other.as_raw_fd(), 0x8000, 0x1000, 12 << 20),
    )
    .unwrap();
    let again = state();
    assert_eq!(
        (again.windows, again.window_bytes),
        (adopted.windows + 1, adopted.window_bytes + 0x1000)
    );
    // Unmapping an area releases its pages (and nothing else).
    let unmap = |iova: u64, length: u64| IommuIoasUnmap {
        size: 24,
        ioas_id: ioas,
        iova,
        length,
    };
    io(&f, IOMMU_IOAS_UNMAP, &unmap(12 << 20, 0x1000)).unwrap();
    let after = state();
    assert_eq!(
        (after.windows, after.window_bytes, after.dma_mappings),
        (adopted.windows, adopted.window_bytes, adopted.dma_mappings),
        "the unmap released the second map's pages"
    );

    // Refused, nothing changed: no fd (EBADF), a range that wraps (EOVERFLOW), beyond
    // the file, unaligned, not a memfd, a memfd that cannot be sealed (EINVAL); and a
    // fresh memfd whose map fails (no access, unknown IOAS) takes no window.
    refused(map(-1, 0, 0x1000, 16 << 20), Errno::EBADF);
    refused(map(9999, 0, 0x1000, 16 << 20), Errno::EBADF);
    refused(
        map(other.as_raw_fd(), u64::MAX - 0xfff, 0x2000, 16 << 20),
        Errno::new(libc::EOVERFLOW),
    );
    refused(
        map(other.as_raw_fd(), FILE, 0x1000, 16 << 20),
        Errno::EINVAL,
    );
    refused(
        map(ram.file.as_raw_fd(), RAM - 0x1000, 0x2000, 16 << 20),
        Errno::EINVAL,
    );
    refused(
        map(other.as_raw_fd(), 0x800, 0x1000, 16 << 20),
        Errno::EINVAL,
    );
    let dir = std::env::temp_dir().join(format!("vsva-map-file-{}", std::process::id()));
    let plain = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dir)
        .unwrap();
    plain.set_len(FILE).unwrap();
    refused(map(plain.as_raw_fd(), 0, 0x1000, 16 << 20), Errno::EINVAL);
    drop(plain);
    let _ = std::fs::remove_file(&dir);
    let unsealable = memfd(false);
    refused(
        map(unsealable.as_raw_fd(), 0, 0x1000, 16 << 20),
        Errno::EINVAL,
    );
    let fresh = memfd(true);
    refused(
        IommuIoasMapFile {
            flags: IOMMU_IOAS_MAP_FIXED_IOVA,
            ..map(fresh.as_raw_fd(), 0, 0x1000, 16 << 20)
        },
        Errno::EINVAL,
    );
    refused(
        IommuIoasMapFile {
            ioas_id: 999,
            ..map(fresh.as_raw_fd(), 0, 0x1000, 16 << 20)
        },
        Errno::ENOENT,
    );
    // Over an IOVA mapped already: the map's own EEXIST.
    refused(map(fresh.as_raw_fd(), 0, 0x1000, 8 << 20), Errno::EEXIST);

    // Unmapped, closed: the host is as it was.
    io(&f, IOMMU_IOAS_UNMAP, &unmap(0, u64::MAX)).unwrap();
    let unmapped = state();
    assert_eq!(unmapped.dma_mappings, 0);
    assert_eq!(
        (unmapped.windows, unmapped.window_bytes),
        (shared.windows, shared.window_bytes),
        "the file's pages went with their area"
    );
    drop(f);
    drop(ram);
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

/// IOASes VM A allocates before anything else, so that the ids of its own objects lie
/// above every id VM B holds.
const SPARE: u32 = 4;

/// A VMM on an iommufd connection, its RAM shared.
struct Vm {
    f: RemoteFile,
    ram: SharedRam,
}

impl Vm {
    fn connect(path: &Path, transport: Transport) -> Vm {
        let f = RemoteFile::connect_with(path, FILE_IOMMUFD, transport).unwrap();
        assert_eq!(f.has_ring(), transport == Transport::Ring);
        let ram = SharedRam::new(RAM).unwrap();
        ram.share(&f).unwrap();
        Vm { f, ram }
    }

    fn call<T: Wire>(&self, cmd: u32, v: &T) -> Result<T, Errno> {
        io(&self.f, cmd, v)
    }

    /// Puts `bytes` in the VMM's scratch page; their address in this process.
    fn user(&self, bytes: &[u8]) -> u64 {
        self.ram
            .mem
            .write_slice(bytes, GuestAddress(SCRATCH))
            .unwrap();
        self.ram.addr() + SCRATCH
    }

    /// An IOAS with all of the RAM mapped at IOVA 0.
    fn ioas_with_ram(&self) -> u32 {
        let ioas = ioas_alloc(&self.f);
        self.map(ioas).unwrap();
        ioas
    }

    fn map(&self, ioas: u32) -> Result<u64, Errno> {
        let m = IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: ioas,
            __reserved: 0,
            user_va: self.ram.addr(),
            length: RAM,
            iova: 0,
        };
        self.call(IOMMU_IOAS_MAP, &m).map(|m| m.iova)
    }

    /// `IOMMU_HWPT_ALLOC` of device `dev_id` on `pt_id`, with driver data `data` (its
    /// type and bytes) and `fault_id` when not 0.
    fn hwpt(
        &self,
        flags: u32,
        dev_id: u32,
        pt_id: u32,
        data: Option<(u32, &[u8])>,
        fault_id: u32,
    ) -> Result<u32, Errno> {
        let (data_type, data_len, data_uptr) = match data {
            Some((t, d)) => (t, d.len() as u32, self.user(d)),
            None => (IOMMU_HWPT_DATA_NONE, 0, 0),
        };
        let fault = if fault_id != 0 {
            IOMMU_HWPT_FAULT_ID_VALID
        } else {
            0
        };
        let a = IommuHwptAlloc {
            size: 48,
            flags: flags | fault,
            dev_id,
            pt_id,
            data_type,
            data_len,
            data_uptr,
            fault_id,
            ..Default::default()
        };
        self.call(IOMMU_HWPT_ALLOC, &a).map(|a| a.out_hwpt_id)
    }

    fn fault_queue(&self) -> u32 {
        let a = IommuFaultAlloc {
            size: 16,
            ..Default::default()
        };
        self.call(IOMMU_FAULT_QUEUE_ALLOC, &a).unwrap().out_fault_id
    }

    fn hw_info(&self, dev_id: u32) -> Result<(), Errno> {
        let h = IommuHwInfo {
            size: std::mem::size_of::<IommuHwInfo>() as u32,
            dev_id,
            data_len: 64,
            data_uptr: self.ram.addr() + SCRATCH,
            ..Default::default()
        };
        self.call(IOMMU_GET_HW_INFO, &h).map(drop)
    }

    fn invalidate(&self, hwpt_id: u32, data_type: u32, entry: &[u8]) -> Result<(), Errno> {
        let inv = IommuHwptInvalidate {
            size: 32,
            hwpt_id,
            data_uptr: self.user(entry),
            data_type,
            entry_len: entry.len() as u32,
            entry_num: 1,
            __reserved: 0,
        };
        let mut b = inv.to_bytes();
        let r = self.f.ioctl(IOMMU_HWPT_INVALIDATE, &mut b).map(drop);
        assert_eq!(
            IommuHwptInvalidate::read(&b).entry_num,
            0,
            "no entry handled"
        );
        r
    }

    /// The device fills 64 bytes at IOVA `at` (no PASID); whether they reached the RAM.
    fn dma_reaches(&self, at: u64, pattern: u64) -> bool {
        fill_iova(&self.f, at, pattern);
        let mut got = [0u8; 64];
        self.ram.mem.read_slice(&mut got, GuestAddress(at)).unwrap();
        got == [pattern as u8; 64]
    }
}

/// One call VM B makes that names an object of VM A.
type Attempt<'a> = (&'a str, Box<dyn Fn(&Vm) -> Result<(), Errno> + 'a>);

/// The calls that name A's IOAS `ioas`, paging HWPT `parent`, device `dev` and every other
/// id in `others` (besides those of `attempts`, the IOMMU's own), each made by B (which holds its own IOAS
/// `b_ioas` and device `b_dev`): ENOENT, and the host's state as before each.
fn refused_for_b<'a>(
    b: &'a Vm,
    probe: &RemoteFile,
    a_ids: (u32, u32, u32),
    b_ids: (u32, u32),
    others: &[u32],
    mut attempts: Vec<Attempt<'a>>,
) {
    let (ioas, parent, dev) = a_ids;
    let (b_ioas, b_dev) = b_ids;
    for &id in [ioas, parent, dev].iter().chain(others) {
        attempts.push(("IOMMU_DESTROY", Box::new(move |b| destroy(&b.f, id))));
    }
    let common: Vec<Attempt<'a>> = vec![
        (
            "IOAS_MAP into A's IOAS",
            Box::new(move |b| b.map(ioas).map(drop)),
        ),
        (
            "IOAS_UNMAP of A's IOAS",
            Box::new(move |b| {
                let u = IommuIoasUnmap {
                    size: 24,
                    ioas_id: ioas,
                    iova: 0,
                    length: u64::MAX,
                };
                b.call(IOMMU_IOAS_UNMAP, &u).map(drop)
            }),
        ),
        (
            "IOAS_IOVA_RANGES of A's IOAS",
            Box::new(move |b| {
                let r = IommuIoasIovaRanges {
                    size: 32,
                    ioas_id: ioas,
                    num_iovas: 4,
                    allowed_iovas: b.ram.addr() + SCRATCH,
                    ..Default::default()
                };
                b.call(IOMMU_IOAS_IOVA_RANGES, &r).map(drop)
            }),
        ),
        (
            "IOAS_ALLOW_IOVAS of A's IOAS",
            Box::new(move |b| {
                let r = IommuIoasAllowIovas {
                    size: 24,
                    ioas_id: ioas,
                    ..Default::default()
                };
                b.call(IOMMU_IOAS_ALLOW_IOVAS, &r).map(drop)
            }),
        ),
        (
            "IOAS_COPY out of A's IOAS",
            Box::new(move |b| copy(b, ioas, b_ioas)),
        ),
        (
            "IOAS_COPY into A's IOAS",
            Box::new(move |b| copy(b, b_ioas, ioas)),
        ),
        (
            "HWPT_ALLOC on A's IOAS",
            Box::new(move |b| b.hwpt(0, b_dev, ioas, None, 0).map(drop)),
        ),
        (
            "HWPT_ALLOC for A's device",
            Box::new(move |b| b.hwpt(0, dev, b_ioas, None, 0).map(drop)),
        ),
        (
            "ATTACH_IOMMUFD_PT to A's HWPT",
            Box::new(move |b| attach_pt(&b.f, 0, parent, 0).map(drop)),
        ),
        (
            "GET_HW_INFO of A's device",
            Box::new(move |b| b.hw_info(dev)),
        ),
    ];
    attempts.extend(common);
    for (what, call) in &attempts {
        let before: HostState = probe.host_state().unwrap();
        assert_eq!(call(b), Err(Errno::ENOENT), "{what}");
        assert_eq!(
            probe.host_state().unwrap(),
            before,
            "{what} changed the host"
        );
    }
}

/// `IOMMU_IOAS_COPY` of the first page of IOAS `src` into IOAS `dst` at 8 MiB.
fn copy(b: &Vm, src: u32, dst: u32) -> Result<(), Errno> {
    let c = IommuIoasCopy {
        size: 40,
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        dst_ioas_id: dst,
        src_ioas_id: src,
        length: PAGE,
        dst_iova: 8 << 20,
        src_iova: 0,
    };
    b.call(IOMMU_IOAS_COPY, &c).map(drop)
}

/// VM A on VT-d: after [`SPARE`] IOASes, its device, an IOAS with its RAM, a nest parent
/// its RID is attached to, a fault queue, and a nested HWPT at [`PASID`] reporting to it.
struct VtdA {
    vm: Vm,
    dev: u32,
    ioas: u32,
    parent: u32,
    fault: u32,
    nested: u32,
}

fn vtd_a(path: &Path) -> VtdA {
    let vm = Vm::connect(path, Transport::Ring);
    for _ in 0..SPARE {
        ioas_alloc(&vm.f);
    }
    let (_, dev) = vm.f.device_add_bound().unwrap();
    let ioas = vm.ioas_with_ram();
    let parent = vm
        .hwpt(
            IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID,
            dev,
            ioas,
            None,
            0,
        )
        .unwrap();
    attach_pt(&vm.f, 0, parent, 0).unwrap();
    let fault = vm.fault_queue();
    let nested = vm.hwpt(IOMMU_HWPT_ALLOC_PASID, dev, parent, Some(vtd_s1()), fault);
    let nested = nested.unwrap();
    attach_pt(&vm.f, VFIO_DEVICE_ATTACH_PASID, nested, PASID).unwrap();
    assert!(dev > SPARE, "A's ids lie above B's");
    VtdA {
        vm,
        dev,
        ioas,
        parent,
        fault,
        nested,
    }
}

/// `iommu_hwpt_vtd_s1` of a guest stage 1 at the start of [`GUEST_PT`] (zeroes: it maps
/// nothing).
fn vtd_s1() -> (u32, &'static [u8]) {
    static S1: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let bytes = S1.get_or_init(|| {
        IommuHwptVtdS1 {
            flags: 0,
            pgtbl_addr: GUEST_PT.0,
            addr_width: 48,
            __reserved: 0,
        }
        .to_bytes()
    });
    (IOMMU_HWPT_DATA_VTD_S1, bytes)
}

/// On the VT-d host, VM B (through the call ring, then through the socket only) names
/// the ids of VM A's device, IOAS, nest parent, nested HWPT and fault queue: ENOENT each
/// time, nothing of the host changes, and A's objects stay in use and move A's bytes.
#[test]
fn a_vm_cannot_name_another_vm_s_iommufd_objects_on_vtd() {
    let host = start_host("ifd-isolation-vtd", "256M", &[]);
    let (probe, empty) = host.probe().unwrap();
    let a = vtd_a(host.socket());
    assert!(a.vm.dma_reaches(0x3000, 0x1111_1111_1111_1111));
    let with_a = probe.host_state().unwrap();
    for transport in [Transport::Ring, Transport::Socket] {
        let b = Vm::connect(host.socket(), transport);
        let (_, b_dev) = b.f.device_add_bound().unwrap();
        let b_ioas = b.ioas_with_ram();
        let b_parent = b
            .hwpt(
                IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID,
                b_dev,
                b_ioas,
                None,
                0,
            )
            .unwrap();
        assert!(b_parent < a.dev, "B's ids lie below A's");
        let (nested, fault) = (a.nested, a.fault);
        let inv = IommuHwptVtdS1Invalidate {
            addr: 0,
            npages: u64::MAX,
            flags: 0,
            __reserved: 0,
        }
        .to_bytes();
        let attempts: Vec<Attempt<'_>> = vec![
            (
                "HWPT_ALLOC nested on A's nest parent",
                Box::new(|b| {
                    b.hwpt(IOMMU_HWPT_ALLOC_PASID, b_dev, a.parent, Some(vtd_s1()), 0)
                        .map(drop)
                }),
            ),
            (
                "HWPT_ALLOC with A's fault queue",
                Box::new(move |b| {
                    b.hwpt(
                        IOMMU_HWPT_ALLOC_PASID,
                        b_dev,
                        b_parent,
                        Some(vtd_s1()),
                        fault,
                    )
                    .map(drop)
                }),
            ),
            (
                "HWPT_INVALIDATE of A's nested HWPT",
                Box::new(move |b| b.invalidate(nested, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, &inv)),
            ),
            (
                "HWPT_SET_DIRTY_TRACKING of A's HWPT",
                Box::new(|b| {
                    let d = IommuHwptSetDirtyTracking {
                        size: 16,
                        hwpt_id: a.parent,
                        ..Default::default()
                    };
                    b.call(IOMMU_HWPT_SET_DIRTY_TRACKING, &d).map(drop)
                }),
            ),
            (
                "HWPT_GET_DIRTY_BITMAP of A's HWPT",
                Box::new(|b| {
                    let d = IommuHwptGetDirtyBitmap {
                        size: 48,
                        hwpt_id: a.parent,
                        iova: 0,
                        length: PAGE,
                        page_size: PAGE,
                        data: b.ram.addr() + SCRATCH,
                        ..Default::default()
                    };
                    b.call(IOMMU_HWPT_GET_DIRTY_BITMAP, &d).map(drop)
                }),
            ),
            (
                "ATTACH_IOMMUFD_PT at a PASID to A's nested HWPT",
                Box::new(move |b| {
                    attach_pt(&b.f, VFIO_DEVICE_ATTACH_PASID, nested, PASID).map(drop)
                }),
            ),
        ];
        refused_for_b(
            &b,
            &probe,
            (a.ioas, a.parent, a.dev),
            (b_ioas, b_dev),
            &[a.fault, a.nested],
            attempts,
        );
        // B's own objects serve B.
        assert_eq!(attach_pt(&b.f, 0, b_parent, 0).map(drop), Ok(()));
        assert!(b.dma_reaches(0x5000, 0x2222_2222_2222_2222));
        // B goes; the host is back to what A holds before the next B comes.
        drop(b);
        assert_eq!(settle(&probe, with_a), with_a);
    }
    // A's objects are all there, in use, and move A's bytes.
    for id in [a.ioas, a.parent, a.fault] {
        assert_eq!(destroy(&a.vm.f, id), Err(Errno::EBUSY), "{id}");
    }
    assert_eq!(a.vm.hw_info(a.dev), Ok(()));
    assert!(a.vm.dma_reaches(0x7000, 0x3333_3333_3333_3333));
    drop(a);
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

/// An STE word 0 of a guest STE that bypasses stage 1 (V=1, Config=bypass): the nested
/// HWPT translates through its vIOMMU's stage 2 alone.
const VSTE_BYPASS: [u64; 2] = [1 | 0b100 << 1, 0];

/// On the SMMUv3 host, VM B (through the call ring, then through the socket only) names
/// the ids of VM A's device, IOAS, nest parent, vIOMMU, vDEVICE, vEVENT queue, nested HWPT
/// and fault queue: ENOENT each time, nothing of the host changes, and A's objects stay in
/// use and move A's bytes.
#[test]
fn a_vm_cannot_name_another_vm_s_iommufd_objects_on_smmuv3() {
    let host = start_host("ifd-isolation-smmu", "256M", &["--iommu", "smmuv3"]);
    let (probe, empty) = host.probe().unwrap();
    let a = Vm::connect(host.socket(), Transport::Ring);
    for _ in 0..SPARE {
        ioas_alloc(&a.f);
    }
    let (_, dev) = a.f.device_add_bound().unwrap();
    assert!(dev > SPARE, "A's ids lie above B's");
    let ioas = a.ioas_with_ram();
    let parent = a
        .hwpt(IOMMU_HWPT_ALLOC_NEST_PARENT, dev, ioas, None, 0)
        .unwrap();
    let viommu = viommu_alloc(&a, dev, parent).unwrap();
    let vdevice = vdevice_alloc(&a, viommu, dev).unwrap();
    let veventq = veventq_alloc(&a, viommu).unwrap();
    let data = IommuHwptArmSmmuv3 { ste: VSTE_BYPASS }.to_bytes();
    let nested = a
        .hwpt(0, dev, viommu, Some((IOMMU_HWPT_DATA_ARM_SMMUV3, &data)), 0)
        .unwrap();
    attach_pt(&a.f, 0, nested, 0).unwrap();
    let fault = a.fault_queue();
    assert!(a.dma_reaches(0x3000, 0x1111_1111_1111_1111));
    let with_a = probe.host_state().unwrap();

    for transport in [Transport::Ring, Transport::Socket] {
        let b = Vm::connect(host.socket(), transport);
        let (_, b_dev) = b.f.device_add_bound().unwrap();
        let b_ioas = b.ioas_with_ram();
        let b_parent = b
            .hwpt(IOMMU_HWPT_ALLOC_NEST_PARENT, b_dev, b_ioas, None, 0)
            .unwrap();
        let b_viommu = viommu_alloc(&b, b_dev, b_parent).unwrap();
        assert!(b_viommu < dev, "B's ids lie below A's");
        let cmd = IommuViommuArmSmmuv3Invalidate { cmd: [0x11, 0] }.to_bytes();
        let data = data.clone();
        let attempts: Vec<Attempt<'_>> = vec![
            (
                "VIOMMU_ALLOC on A's nest parent",
                Box::new(move |b| viommu_alloc(b, b_dev, parent).map(drop)),
            ),
            (
                "VIOMMU_ALLOC for A's device",
                Box::new(move |b| viommu_alloc(b, dev, b_parent).map(drop)),
            ),
            (
                "VDEVICE_ALLOC on A's vIOMMU",
                Box::new(move |b| vdevice_alloc(b, viommu, b_dev).map(drop)),
            ),
            (
                "VDEVICE_ALLOC of A's device",
                Box::new(move |b| vdevice_alloc(b, b_viommu, dev).map(drop)),
            ),
            (
                "VEVENTQ_ALLOC on A's vIOMMU",
                Box::new(move |b| veventq_alloc(b, viommu).map(drop)),
            ),
            (
                "HWPT_ALLOC nested on A's vIOMMU",
                Box::new({
                    let data = data.clone();
                    move |b| {
                        b.hwpt(
                            0,
                            b_dev,
                            viommu,
                            Some((IOMMU_HWPT_DATA_ARM_SMMUV3, &data)),
                            0,
                        )
                        .map(drop)
                    }
                }),
            ),
            (
                "HWPT_ALLOC with A's fault queue",
                Box::new(move |b| {
                    b.hwpt(
                        0,
                        b_dev,
                        b_viommu,
                        Some((IOMMU_HWPT_DATA_ARM_SMMUV3, &data)),
                        fault,
                    )
                    .map(drop)
                }),
            ),
            (
                "HWPT_INVALIDATE of A's vIOMMU",
                Box::new({
                    let cmd = cmd.clone();
                    move |b| b.invalidate(viommu, IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, &cmd)
                }),
            ),
            (
                "ATTACH_IOMMUFD_PT to A's nested HWPT",
                Box::new(move |b| attach_pt(&b.f, 0, nested, 0).map(drop)),
            ),
        ];
        refused_for_b(
            &b,
            &probe,
            (ioas, parent, dev),
            (b_ioas, b_dev),
            &[viommu, vdevice, veventq, nested, fault],
            attempts,
        );
        assert_eq!(attach_pt(&b.f, 0, b_parent, 0).map(drop), Ok(()));
        assert!(b.dma_reaches(0x5000, 0x2222_2222_2222_2222));
        // B goes; the host is back to what A holds before the next B comes.
        drop(b);
        assert_eq!(settle(&probe, with_a), with_a);
    }
    for id in [ioas, parent, viommu] {
        assert_eq!(destroy(&a.f, id), Err(Errno::EBUSY), "{id}");
    }
    assert_eq!(a.hw_info(dev), Ok(()));
    assert!(a.dma_reaches(0x7000, 0x3333_3333_3333_3333));
    drop(a);
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

fn viommu_alloc(vm: &Vm, dev_id: u32, hwpt_id: u32) -> Result<u32, Errno> {
    let a = IommuViommuAlloc {
        size: std::mem::size_of::<IommuViommuAlloc>() as u32,
        type_: IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
        dev_id,
        hwpt_id,
        ..Default::default()
    };
    vm.call(IOMMU_VIOMMU_ALLOC, &a).map(|a| a.out_viommu_id)
}

fn vdevice_alloc(vm: &Vm, viommu_id: u32, dev_id: u32) -> Result<u32, Errno> {
    let a = IommuVdeviceAlloc {
        size: std::mem::size_of::<IommuVdeviceAlloc>() as u32,
        viommu_id,
        dev_id,
        out_vdevice_id: 0,
        virt_id: 0x99,
    };
    vm.call(IOMMU_VDEVICE_ALLOC, &a).map(|a| a.out_vdevice_id)
}

/// `IOMMU_VEVENTQ_ALLOC` on `viommu_id`: the queue's id.
fn veventq_alloc(vm: &Vm, viommu_id: u32) -> Result<u32, Errno> {
    let a = IommuVeventqAlloc {
        size: std::mem::size_of::<IommuVeventqAlloc>() as u32,
        viommu_id,
        type_: IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
        veventq_depth: 4,
        ..Default::default()
    };
    vm.call(IOMMU_VEVENTQ_ALLOC, &a).map(|a| a.out_veventq_id)
}
