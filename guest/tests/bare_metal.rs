//! The guest OS model on bare metal: its IOMMU driver programs the *physical* IOMMU model,
//! and a PASID-capable DMA engine works on a process's buffers at their virtual addresses.
//!
//! One host memory; guest RAM is a vm-memory window of it at GPA = HPA, so the IOMMU
//! model, reading host physical addresses, sees the tables the guest wrote. Every byte the
//! engine moves is checked through the process's CPU view.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use vm_memory::GuestMemoryMmap;
use vsva_guest::{
    frames::GuestFrames, iommu::DeviceConfig, iommu::IommuDriver, iommu::Mmio, process::Process,
    process::Prot,
};
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    DmaPort, Operation,
};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::memory::HostMemory;
use vsva_vtd::regs::EventSource;
use vsva_vtd::{
    addr::Gpa, addr::Gva, addr::Hpa, addr::Pasid, addr::SourceId, fault::FaultReason,
    flpte::FlPagingMode,
};

/// Guest RAM: 64 MiB at 1 MiB, identity-mapped onto host memory.
const RAM_BASE: u64 = 0x10_0000;
const RAM_SIZE: u64 = 64 << 20;
const SID: SourceId = SourceId::from_rid(0x0308);

/// The physical IOMMU's registers, as the guest reaches them on bare metal.
struct Bare(Arc<Iommu>);

impl Mmio for Bare {
    fn read(&self, offset: u64, size: usize) -> u64 {
        self.0.mmio_read(offset, size).unwrap_or(u64::MAX)
    }

    fn write(&self, offset: u64, size: usize, value: u64) {
        self.0
            .mmio_write(offset, size, value)
            .expect("the driver's register writes are well formed");
    }
}

struct Machine {
    host: Arc<HostMemory>,
    iommu: Arc<Iommu>,
    mem: Arc<GuestMemoryMmap>,
    frames: Arc<GuestFrames>,
    driver: Arc<IommuDriver>,
    engine: Arc<DmaEngine>,
    /// Page request interrupts delivered.
    prq_irqs: Arc<AtomicU64>,
    /// Serve page requests from the interrupt (else the test polls).
    interrupt_driven: bool,
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.host.release_guest_memory(&self.mem);
    }
}

fn machine(interrupt_driven: bool) -> Machine {
    let host = HostMemory::new(256 << 20).unwrap();
    let mem = Arc::new(
        host.guest_memory(&[(Gpa(RAM_BASE), Hpa(RAM_BASE), RAM_SIZE)])
            .unwrap(),
    );
    let frames = Arc::new(GuestFrames::new(mem.clone(), Gpa(RAM_BASE), RAM_SIZE).unwrap());
    let iommu = Iommu::new(host.clone(), IommuConfig::default()).unwrap();

    let driver_slot: Arc<OnceLock<Weak<IommuDriver>>> = Arc::new(OnceLock::new());
    let prq_irqs = Arc::new(AtomicU64::new(0));
    {
        let slot = driver_slot.clone();
        let irqs = prq_irqs.clone();
        iommu.set_interrupt_handler(Arc::new(move |irq| {
            if irq.source != EventSource::PageRequest {
                return;
            }
            irqs.fetch_add(1, Ordering::SeqCst);
            if interrupt_driven {
                if let Some(driver) = slot.get().and_then(Weak::upgrade) {
                    driver.handle_page_requests();
                }
            }
        }));
    }
    let driver = IommuDriver::init(Arc::new(Bare(iommu.clone())), frames.clone()).unwrap();
    driver_slot.set(Arc::downgrade(&driver)).unwrap();

    let port: Arc<dyn DmaPort> = iommu.clone();
    let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(SID), port).unwrap());
    iommu.attach_endpoint(engine.clone());
    engine
        .enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)
        .unwrap();
    driver
        .attach_device(DeviceConfig {
            sid: SID,
            pasid_bits: 20,
            ats: true,
            pri: true,
            ats_queue_depth: engine.config().ats_queue_depth,
        })
        .unwrap();
    Machine {
        host,
        iommu,
        mem,
        frames,
        driver,
        engine,
        prq_irqs,
        interrupt_driven,
    }
}

impl Machine {
    fn process(&self, mode: FlPagingMode) -> Arc<Process> {
        Arc::new(Process::new(self.mem.clone(), self.frames.clone(), mode).unwrap())
    }

    /// Submits `op` in `pasid` with its completion record at `record`, runs the engine
    /// (serving page requests by polling unless the interrupt does it) and returns the
    /// record as the process reads it.
    fn run(
        &self,
        p: &Process,
        pasid: Pasid,
        op: Operation,
        record: Gva,
        block_on_fault: bool,
    ) -> CompletionRecord {
        p.write(record, &[0; 32]).unwrap();
        let desc = Descriptor {
            pasid: Some(pasid),
            privileged: false,
            block_on_fault,
            completion: CompletionRequest::Always(record.0),
            op,
        };
        self.engine.portal_write(0, &desc.encode()).unwrap();
        self.engine.process();
        let mut rounds = 0;
        while self.engine.waiting_for_page_response() > 0 {
            assert!(!self.interrupt_driven, "the interrupt serves every request");
            rounds += 1;
            assert!(rounds < 1000, "page requests never resolved");
            assert!(self.driver.handle_page_requests() > 0);
            self.engine.process();
        }
        let mut raw = [0u8; 32];
        p.read(record, &mut raw).unwrap();
        CompletionRecord::from_bytes(&raw).unwrap()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read(p: &Process, gva: Gva, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    p.read(gva, &mut buf).unwrap();
    buf
}

#[test]
fn dma_at_process_addresses_matches_the_cpu_view() {
    let m = machine(true);
    let p = m.process(FlPagingMode::FourLevel);
    let src = p.mmap(4 * 4096, Prot::READ_WRITE).unwrap();
    let dst = p.mmap(4 * 4096, Prot::READ_WRITE).unwrap();
    let record = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = m.driver.sva_bind(SID, &p).unwrap();

    let data = pattern(4 * 4096, 3);
    p.write(src, &data).unwrap();
    // Unaligned, across pages.
    let len = 3 * 4096 + 1000;
    let rec = m.run(
        &p,
        pasid,
        Operation::Memmove {
            src: src.0 + 5,
            dst: dst.0 + 7,
            size: len as u32,
        },
        record,
        true,
    );
    assert_eq!(rec.status, CompletionStatus::Success);
    assert_eq!(rec.bytes_completed, len as u32);
    let out = read(&p, dst, 4 * 4096);
    assert_eq!(&out[7..7 + len], &data[5..5 + len]);
    assert!(out[..7].iter().all(|&b| b == 0));
    assert!(out[7 + len..].iter().all(|&b| b == 0));

    let rec = m.run(
        &p,
        pasid,
        Operation::Fill {
            pattern: 0x0102_0304_0506_0708,
            dst: dst.0 + 4096,
            size: 8192,
        },
        record,
        true,
    );
    assert_eq!(rec.status, CompletionStatus::Success);
    let out = read(&p, Gva(dst.0 + 4096), 8192);
    assert!(out
        .chunks(8)
        .all(|c| c == 0x0102_0304_0506_0708u64.to_le_bytes()));

    // Compare sees what the CPU wrote.
    p.write(dst, &data).unwrap();
    let cmp = |m: &Machine| {
        m.run(
            &p,
            pasid,
            Operation::Compare {
                src1: src.0,
                src2: dst.0,
                size: 4 * 4096,
            },
            record,
            true,
        )
    };
    let rec = cmp(&m);
    assert_eq!((rec.status, rec.result), (CompletionStatus::Success, 0));
    p.write(Gva(dst.0 + 10_000), &[data[10_000] ^ 1]).unwrap();
    let rec = cmp(&m);
    assert_eq!((rec.result, rec.bytes_completed), (1, 10_000));

    // The device really used its TLB and the IOMMU walked the process's tables.
    assert!(m.engine.stats().devtlb_misses > 0);
    assert!(m.engine.stats().devtlb_hits > 0);
    assert!(m.iommu.stats().walks.load(Ordering::Relaxed) > 0);
    assert!(m.driver.take_faults().is_empty());
}

#[test]
fn munmap_invalidates_and_dma_then_faults() {
    let m = machine(true);
    let p = m.process(FlPagingMode::FourLevel);
    let src = p.mmap(2 * 4096, Prot::READ_WRITE).unwrap();
    let dst = p.mmap(2 * 4096, Prot::READ_WRITE).unwrap();
    let record = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = m.driver.sva_bind(SID, &p).unwrap();
    p.write(src, &pattern(2 * 4096, 9)).unwrap();
    let copy = Operation::Memmove {
        src: src.0,
        dst: dst.0,
        size: 2 * 4096,
    };
    assert_eq!(
        m.run(&p, pasid, copy, record, true).status,
        CompletionStatus::Success
    );
    let cached = m.engine.devtlb_len();
    let before = m.driver.stats();
    let devtlb_invs = m.engine.stats().devtlb_invalidations;
    let dst_frame = p.translate(dst).unwrap();

    p.munmap(dst, 2 * 4096).unwrap();
    // One PASID-based IOTLB and one device-TLB invalidation reached the hardware.
    assert_eq!(
        m.driver.stats().range_invalidations,
        before.range_invalidations + 2
    );
    assert_eq!(m.engine.stats().devtlb_invalidations, devtlb_invs + 1);
    assert!(m.engine.devtlb_len() < cached);

    // The freed frames go to the next mapping, elsewhere; the device must not reach them.
    let freed = m.frames.allocated_frames();
    let other = p
        .mmap_fixed(Gva(0x5000_0000_0000), 2 * 4096, Prot::READ_WRITE, true)
        .unwrap();
    assert_eq!(m.frames.allocated_frames(), freed + 2 + 3);
    assert_eq!(p.translate(other), Some(dst_frame));
    let guard = pattern(2 * 4096, 77);
    p.write(other, &guard).unwrap();

    let rec = m.run(&p, pasid, copy, record, true);
    assert_eq!(rec.status, CompletionStatus::PageResponseError);
    assert_eq!(rec.fault_addr, dst.0);
    assert!(rec.fault_write);
    assert_eq!(rec.bytes_completed, 0);
    // Without block-on-fault: a page fault completion, no page request.
    let requests = m.engine.stats().page_requests;
    let rec = m.run(&p, pasid, copy, record, false);
    assert_eq!(rec.status, CompletionStatus::PageFault);
    assert_eq!(m.engine.stats().page_requests, requests);
    assert_eq!(read(&p, other, 2 * 4096), guard);
    assert!(m.prq_irqs.load(Ordering::SeqCst) > 0);
}

#[test]
fn lazy_pages_are_served_by_page_requests_when_polled() {
    let m = machine(false);
    let p = m.process(FlPagingMode::FourLevel);
    let lazy = p.mmap_lazy(5 * 4096, Prot::READ_WRITE).unwrap();
    let record = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = m.driver.sva_bind(SID, &p).unwrap();
    assert_eq!(p.resident_pages(), 1);

    let rec = m.run(
        &p,
        pasid,
        Operation::Fill {
            pattern: 0xa5a5_5a5a_dead_beef,
            dst: lazy.0 + 100,
            size: 5 * 4096 - 200,
        },
        record,
        true,
    );
    assert_eq!(rec.status, CompletionStatus::Success);
    assert_eq!(p.resident_pages(), 6);
    let out = read(&p, lazy, 5 * 4096);
    assert!(out[..100].iter().all(|&b| b == 0));
    let fill = 0xa5a5_5a5a_dead_beefu64.to_le_bytes();
    for (i, &b) in out[100..5 * 4096 - 100].iter().enumerate() {
        assert_eq!(b, fill[i % 8]);
    }
    let st = m.driver.stats();
    assert_eq!((st.page_requests, st.page_requests_served), (5, 5));
    assert_eq!(m.engine.stats().page_requests, 5);
    // The interrupt fired; the test served the queue.
    assert!(m.prq_irqs.load(Ordering::SeqCst) > 0);
}

#[test]
fn a_lazy_destination_is_served_from_the_interrupt() {
    let m = machine(true);
    let p = m.process(FlPagingMode::FourLevel);
    let src = p.mmap(3 * 4096, Prot::READ_WRITE).unwrap();
    let dst = p.mmap_lazy(3 * 4096, Prot::READ_WRITE).unwrap();
    let record = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = m.driver.sva_bind(SID, &p).unwrap();
    let data = pattern(3 * 4096, 41);
    p.write(src, &data).unwrap();
    let rec = m.run(
        &p,
        pasid,
        Operation::Memmove {
            src: src.0,
            dst: dst.0,
            size: 3 * 4096,
        },
        record,
        true,
    );
    assert_eq!(rec.status, CompletionStatus::Success);
    assert_eq!(read(&p, dst, 3 * 4096), data);
    assert_eq!(m.driver.stats().page_requests_served, 3);
    assert_eq!(m.prq_irqs.load(Ordering::SeqCst), 3);
}

#[test]
fn mprotect_read_only_refuses_device_writes_only() {
    let m = machine(true);
    let p = m.process(FlPagingMode::FourLevel);
    let a = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let b = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let record = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = m.driver.sva_bind(SID, &p).unwrap();
    p.write(a, &pattern(4096, 1)).unwrap();
    let a_to_b = Operation::Memmove {
        src: a.0,
        dst: b.0,
        size: 4096,
    };
    assert_eq!(
        m.run(&p, pasid, a_to_b, record, true).status,
        CompletionStatus::Success
    );
    p.mprotect(b, 4096, Prot::READ).unwrap();
    p.write(a, &pattern(4096, 2)).unwrap();
    let rec = m.run(&p, pasid, a_to_b, record, true);
    assert_eq!(rec.status, CompletionStatus::PageResponseError);
    assert_eq!(read(&p, b, 4096), pattern(4096, 1));
    // Reading the read-only page still works.
    let rec = m.run(
        &p,
        pasid,
        Operation::Memmove {
            src: b.0,
            dst: a.0,
            size: 4096,
        },
        record,
        true,
    );
    assert_eq!(rec.status, CompletionStatus::Success);
    assert_eq!(read(&p, a, 4096), pattern(4096, 1));
}

#[test]
fn a_five_level_process_above_47_bits() {
    let m = machine(true);
    let p = m.process(FlPagingMode::FiveLevel);
    let high = Gva(0x00ab_cdef_0000_0000);
    p.mmap_fixed(high, 3 * 4096, Prot::READ_WRITE, true)
        .unwrap();
    let lazy = Gva(high.0 + 0x10_0000);
    p.mmap_fixed(lazy, 2 * 4096, Prot::READ_WRITE, false)
        .unwrap();
    let pasid = m.driver.sva_bind(SID, &p).unwrap();
    let data = pattern(2 * 4096, 5);
    p.write(high, &data).unwrap();
    let record = Gva(high.0 + 2 * 4096);
    let rec = m.run(
        &p,
        pasid,
        Operation::Memmove {
            src: high.0,
            dst: lazy.0,
            size: 2 * 4096,
        },
        record,
        true,
    );
    assert_eq!(rec.status, CompletionStatus::Success);
    assert_eq!(read(&p, lazy, 2 * 4096), data);
}

#[test]
fn unbound_pasids_fault_and_teardown_returns_every_frame() {
    let m = machine(true);
    let base = m.frames.allocated_frames();
    let p = m.process(FlPagingMode::FourLevel);
    let buf = p.mmap(2 * 4096, Prot::READ_WRITE).unwrap();
    let record = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = m.driver.sva_bind(SID, &p).unwrap();
    let fill = Operation::Fill {
        pattern: 7,
        dst: buf.0,
        size: 2 * 4096,
    };
    assert_eq!(
        m.run(&p, pasid, fill, record, true).status,
        CompletionStatus::Success
    );
    m.driver.sva_unbind(SID, pasid).unwrap();
    assert_eq!(m.engine.devtlb_len(), 0);

    p.write(buf, &[0; 2 * 4096]).unwrap();
    let desc = Descriptor {
        pasid: Some(pasid),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(record.0),
        op: fill,
    };
    m.engine.portal_write(0, &desc.encode()).unwrap();
    m.engine.process();
    assert_eq!(read(&p, buf, 2 * 4096), vec![0; 2 * 4096]);
    // The PASID entry is gone: a non-recoverable fault the IOMMU recorded.
    let faults = m.driver.take_faults();
    assert!(!faults.is_empty());
    assert!(faults
        .iter()
        .all(|f| f.sid == SID && f.pasid == Some(pasid) && f.reason == FaultReason::Spt2.code()));
    assert!(m.engine.software_error().is_some());

    m.driver.detach_device(SID).unwrap();
    drop(p);
    // The driver keeps its root table, context table, queues.
    assert_eq!(m.frames.allocated_frames(), base - 32);
}

#[test]
fn two_processes_share_the_device_through_their_own_pasids() {
    let m = machine(true);
    let a = m.process(FlPagingMode::FourLevel);
    let b = m.process(FlPagingMode::FourLevel);
    // The same virtual addresses in both, different contents.
    let (buf_a, rec_a) = (
        a.mmap(2 * 4096, Prot::READ_WRITE).unwrap(),
        a.mmap(4096, Prot::READ_WRITE).unwrap(),
    );
    let (buf_b, rec_b) = (
        b.mmap_lazy(2 * 4096, Prot::READ_WRITE).unwrap(),
        b.mmap(4096, Prot::READ_WRITE).unwrap(),
    );
    assert_eq!((buf_a, rec_a), (buf_b, rec_b));
    let only_a = a.mmap(4096, Prot::READ_WRITE).unwrap();
    let pa = m.driver.sva_bind(SID, &a).unwrap();
    let pb = m.driver.sva_bind(SID, &b).unwrap();
    assert_ne!(pa, pb);
    a.write(buf_a, &pattern(2 * 4096, 1)).unwrap();

    let fill = |p: &Process, pasid, dst: Gva, rec, byte: u8| {
        m.run(
            p,
            pasid,
            Operation::Fill {
                pattern: u64::from_le_bytes([byte; 8]),
                dst: dst.0,
                size: 4096,
            },
            rec,
            true,
        )
    };
    assert_eq!(
        fill(&b, pb, Gva(buf_b.0 + 4096), rec_b, 0xbb).status,
        CompletionStatus::Success
    );
    assert_eq!(read(&b, Gva(buf_b.0 + 4096), 4096), vec![0xbb; 4096]);
    assert_eq!(read(&a, buf_a, 2 * 4096), pattern(2 * 4096, 1));
    // B's PASID cannot reach what only A maps.
    let rec = fill(&b, pb, only_a, rec_b, 0xcc);
    assert_eq!(rec.status, CompletionStatus::PageResponseError);
    assert_eq!(read(&a, only_a, 4096), vec![0; 4096]);
    assert_eq!(m.driver.bound_pasids().len(), 2);
}
