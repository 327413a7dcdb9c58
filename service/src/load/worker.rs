//! One VM process of `vsva load`: a VMM over [`RemoteFile`] that loops bind → DMA → verify
//! → invalidate → unbind with buffers of random sizes, timing the calls that cross to the
//! host: each forwarded invalidation (`VFIO_IOMMU_CACHE_INVALIDATE`, as the vIOMMU forwards
//! a guest's) and each page request's round trip (the VMM reads the request from the host's
//! fault queue, its guest handles the fault, and the VMM writes the response back).
//!
//! The guest side is a guest process's address space ([`Process`]) in the VM's RAM, bound
//! by PASID with nested translation: the host's IOMMU walks its first-level tables.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vsva_guest::{GuestFrames, Process, Prot};
use vsva_hw::dma::descriptor::COMPLETION_RECORD_SIZE;
use vsva_hw::dma::{CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, Operation};
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::{
    BindGpasid, CacheInvalidate, DmaMap, Errno, InvGranularity, IommuModel, PageResponse,
    PageResponseCode, QueuedFault, UapiFile, VfioIoctls,
};
use vsva_vtd::{FlPagingMode, Gpa, Gva, Iova, Pasid};

use super::{Held, Rng, Samples, WorkerReport};
use crate::{RemoteFile, SharedRam};

/// Bytes of RAM each VM shares with the host.
pub const VM_RAM: u64 = 16 << 20;
/// Where the guest's page frames start in its RAM.
const FRAMES_AT: u64 = 1 << 20;
/// The keeper buffer: written once by the device at the start, checked at the end.
const KEEPER_LEN: u64 = 64 << 10;
/// Largest PASID asked for.
const PASID_MAX: u32 = (1 << 20) - 1;

/// A failed step of the loop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A call to the host failed.
    #[error("{what}: {errno}")]
    Host {
        /// The call.
        what: &'static str,
        /// Its errno.
        errno: Errno,
    },
    /// A check failed.
    #[error("{0}")]
    Check(String),
}

fn host(what: &'static str) -> impl Fn(Errno) -> WorkerError {
    move |errno| WorkerError::Host { what, errno }
}

fn check(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Check(e.to_string())
}

/// The VM: its connection, RAM, guest frames and a keeper process whose buffer the device
/// filled at the start and must find unchanged at the end.
pub struct Vm {
    file: RemoteFile,
    ram: SharedRam,
    frames: Arc<GuestFrames>,
    keeper: Process,
    keeper_buf: Gva,
    keeper_byte: u8,
}

impl Vm {
    /// Connects, shares and maps the RAM, plugs the device and fills the keeper buffer
    /// through it (the keeper's PASID stays bound).
    pub fn start(socket: &Path, seed: u64) -> Result<Vm, WorkerError> {
        let file = RemoteFile::connect(socket).map_err(check)?;
        let ram = SharedRam::new(VM_RAM).map_err(check)?;
        let mut f = &file;
        f.set_iommu(IommuModel::Type1Nesting)
            .map_err(host("VFIO_SET_IOMMU"))?;
        ram.share(&file).map_err(host("ADD_MEMORY"))?;
        f.map_dma(&DmaMap {
            iova: Iova(0),
            vaddr: ram.addr(),
            size: VM_RAM,
            read: true,
            write: true,
        })
        .map_err(host("VFIO_IOMMU_MAP_DMA"))?;
        file.device_add().map_err(host("DEVICE_ADD"))?;
        let frames = Arc::new(
            GuestFrames::new(ram.mem.clone(), Gpa(FRAMES_AT), VM_RAM - FRAMES_AT).map_err(check)?,
        );
        let keeper = new_process(&ram.mem, &frames)?;
        let keeper_buf = keeper.mmap(KEEPER_LEN, Prot::READ_WRITE).map_err(check)?;
        let keeper_pasid = bind(&file, &keeper)?;
        let keeper_byte = (seed as u8) | 1;
        let mut vm = Vm {
            file,
            ram,
            frames,
            keeper,
            keeper_buf,
            keeper_byte,
        };
        let record = vm.keeper.mmap(4096, Prot::READ_WRITE).map_err(check)?;
        let fill = Operation::Fill {
            pattern: u64::from_ne_bytes([keeper_byte; 8]),
            dst: keeper_buf.0,
            size: KEEPER_LEN as u32,
        };
        let mut none = Samples::default();
        let status = vm.run(&vm.keeper, keeper_pasid, fill, record, &mut none)?;
        if status != CompletionStatus::Success {
            return Err(check(format!("the keeper fill ended {status:?}")));
        }
        vm.check_keeper()?;
        Ok(vm)
    }

    /// Whether the keeper buffer still holds what the device wrote at the start.
    pub fn check_keeper(&mut self) -> Result<u64, WorkerError> {
        let mut got = vec![0u8; KEEPER_LEN as usize];
        self.keeper.read(self.keeper_buf, &mut got).map_err(check)?;
        if got.iter().any(|&b| b != self.keeper_byte) {
            return Err(check("the keeper buffer changed"));
        }
        Ok(KEEPER_LEN)
    }

    /// What a VM holds on the host between cycles: its connection, window, mapping,
    /// device and domain, and the keeper's bound PASID.
    pub fn held() -> Held {
        Held {
            connections: 1,
            pasids: 1,
            binds: 1,
            windows: 1,
            window_bytes: VM_RAM,
            dma_mappings: 1,
            devices: 1,
            domain_ids: 1,
            page_requests: 0,
            faults_unread: 0,
        }
    }

    /// Submits `op` for `pasid` with a completion record at `record`, answers the page
    /// requests it raises (a page `p` maps is Success, any other Invalid), each round timed
    /// into `prq`; returns the record's status.
    fn run(
        &self,
        p: &Process,
        pasid: Pasid,
        op: Operation,
        record: Gva,
        prq: &mut Samples,
    ) -> Result<CompletionStatus, WorkerError> {
        let desc = Descriptor {
            pasid: Some(pasid),
            privileged: false,
            block_on_fault: true,
            completion: CompletionRequest::Always(record.0),
            op,
        };
        self.file
            .device_write(0, &desc.encode())
            .map_err(host("DEVICE_WRITE"))?;
        let mut rounds = 0;
        while self.file.device_run().map_err(host("DEVICE_RUN"))? > 0 {
            rounds += 1;
            if rounds > 4096 {
                return Err(check("page requests never resolved"));
            }
            let start = Instant::now();
            let faults = UapiFile::read_faults(&self.file).map_err(host("READ"))?;
            let mut answered = 0;
            for q in faults {
                let QueuedFault::PageRequest(ev) = q else {
                    return Err(check(format!("an unrecoverable fault: {q:?}")));
                };
                let r = ev.request;
                let code = if r.pasid == Some(pasid) && p.handle_fault(Gva(r.addr), r.write) {
                    PageResponseCode::Success
                } else {
                    PageResponseCode::Invalid
                };
                if r.last_page {
                    (&self.file)
                        .page_response_to(
                            ev.sid,
                            &PageResponse {
                                pasid: r.pasid,
                                grpid: r.grpid,
                                code,
                            },
                        )
                        .map_err(host("VFIO_IOMMU_PAGE_RESPONSE"))?;
                    answered += 1;
                }
            }
            if answered > 0 {
                prq.push(start.elapsed());
            }
        }
        let mut raw = [0u8; COMPLETION_RECORD_SIZE];
        p.read(record, &mut raw).map_err(check)?;
        let rec = CompletionRecord::from_bytes(&raw)
            .ok_or_else(|| check("an undecodable completion record"))?;
        Ok(rec.status)
    }

    /// One cycle: a new guest process maps a source and a lazily backed destination of
    /// `pages` pages, binds its PASID, has the device copy one to the other (the
    /// destination's pages come through page requests), checks every byte, unmaps the
    /// destination and forwards the invalidation, checks that DMA to it now faults (a
    /// stale translation would let it through), unbinds and frees the PASID. Returns the
    /// bytes verified.
    pub fn cycle(
        &self,
        rng: &mut Rng,
        pages: u64,
        out: &mut WorkerReport,
    ) -> Result<u64, WorkerError> {
        let len = pages * 4096;
        let p = new_process(&self.ram.mem, &self.frames)?;
        let src = p.mmap(len, Prot::READ_WRITE).map_err(check)?;
        let dst = p.mmap_lazy(len, Prot::READ_WRITE).map_err(check)?;
        let record = p.mmap(4096, Prot::READ_WRITE).map_err(check)?;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        p.write(src, &data).map_err(check)?;
        let pasid = bind(&self.file, &p)?;
        let checked = (|| {
            let copy = Operation::Memmove {
                src: src.0,
                dst: dst.0,
                size: len as u32,
            };
            let status = self.run(&p, pasid, copy, record, &mut out.prq_ns)?;
            let mut got = vec![0u8; len as usize];
            p.read(dst, &mut got).map_err(check)?;
            if status != CompletionStatus::Success || got != data {
                return Err(check(format!(
                    "the copy of {len} bytes is wrong ({status:?})"
                )));
            }
            p.munmap(dst, len).map_err(check)?;
            // As a guest driver invalidates: one naturally aligned power-of-two block of
            // pages that covers the range (VT-d's address mask).
            let (addr, granules) = covering_block(dst.0, pages);
            let start = Instant::now();
            (&self.file)
                .cache_invalidate(&CacheInvalidate {
                    cache: IOMMU_CACHE_INV_TYPE_IOTLB,
                    granularity: InvGranularity::Addr {
                        pasid: Some(pasid),
                        archid: None,
                        addr,
                        granule_size: 4096,
                        nb_granules: granules,
                        leaf: false,
                    },
                })
                .map_err(host("VFIO_IOMMU_CACHE_INVALIDATE"))?;
            out.fwd_inv_ns.push(start.elapsed());
            let fill = Operation::Fill {
                pattern: 0,
                dst: dst.0,
                size: 64,
            };
            let status = self.run(&p, pasid, fill, record, &mut out.prq_ns)?;
            if status != CompletionStatus::PageResponseError {
                return Err(check(format!(
                    "DMA to the unmapped destination ended {status:?}, not with a fault"
                )));
            }
            Ok(len)
        })();
        let mut f = &self.file;
        let unbound = f
            .unbind_gpasid(&bind_data(pasid, &p))
            .map_err(host("VFIO_IOMMU_UNBIND"))
            .and_then(|()| {
                f.pasid_free(pasid)
                    .map_err(host("VFIO_IOMMU_PASID_REQUEST"))
            });
        let verified = checked?;
        unbound?;
        Ok(verified)
    }
}

/// The smallest naturally aligned power-of-two block of pages holding the `pages` pages
/// from `addr`: its first address and its pages.
fn covering_block(addr: u64, pages: u64) -> (u64, u64) {
    let end = addr + pages * 4096;
    let mut granules = pages.next_power_of_two();
    loop {
        let start = addr & !(granules * 4096 - 1);
        if start + granules * 4096 >= end {
            return (start, granules);
        }
        granules *= 2;
    }
}

fn new_process(
    mem: &Arc<GuestMemoryMmap>,
    frames: &Arc<GuestFrames>,
) -> Result<Process, WorkerError> {
    Process::new(mem.clone(), frames.clone(), FlPagingMode::FourLevel).map_err(check)
}

fn bind_data(pasid: Pasid, p: &Process) -> BindGpasid {
    BindGpasid {
        hpasid: pasid,
        gpasid: Some(pasid),
        gpgd: p.cr3(),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    }
}

/// Allocates a PASID on the host and binds `p`'s tables to it (nested translation).
fn bind(file: &RemoteFile, p: &Process) -> Result<Pasid, WorkerError> {
    let mut f = file;
    let pasid = f
        .pasid_alloc(1, PASID_MAX)
        .map_err(host("VFIO_IOMMU_PASID_REQUEST"))?;
    if let Err(e) = f.bind_gpasid(&bind_data(pasid, p)) {
        let _ = f.pasid_free(pasid);
        return Err(host("VFIO_IOMMU_BIND")(e));
    }
    Ok(pasid)
}

/// Runs the loop for `duration`, buffers of 1 to `max_pages` pages; a failed cycle is an
/// error and the loop goes on (unless the host is gone).
pub fn run_loop(vm: &Vm, seed: u64, duration: Duration, max_pages: u64) -> WorkerReport {
    let mut rng = Rng::new(seed);
    let mut report = WorkerReport::default();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let pages = 1 + rng.next_u64() % max_pages.max(1);
        match vm.cycle(&mut rng, pages, &mut report) {
            Ok(bytes) => {
                report.cycles += 1;
                report.bytes_verified += bytes;
            }
            Err(e) => {
                report.errors += 1;
                report.messages.push(e.to_string());
                if vm.file.host_gone() {
                    break;
                }
            }
        }
    }
    report
}
