//! End to end: guest process page tables → guest IOMMU driver → vIOMMU → VFIO uAPI → host
//! driver → nested translation in the physical IOMMU → device DMA, with real bytes, each
//! checked through the guest process's CPU view.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vsva_mem::PhysMem;

use vm_memory::{GuestMemoryMmap, IommuMemory};
use vsva_guest::{iommu::DeviceConfig, process::Process, process::Prot};
use vsva_host::error::HostError;
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_ENABLE, CTRL_PASID_EN, CTRL_PRI_EN, REG_CTRL};
use vsva_hw::dma::{CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, Operation};
use vsva_testbed::dma_io::{read as io_read, write as io_write};
use vsva_testbed::holdings::HostHoldings;
use vsva_testbed::stack::{Host, StackError, Uapi, Vm, GUEST_DEVICE_SID};
use vsva_uapi::file::VfioIoctls;
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_PASID,
};
use vsva_uapi::{
    request::BindGpasid, request::CacheInvalidate, request::InvGranularity, request::PageResponse,
    request::PageResponseCode,
};
use vsva_vmm::IommuAddressSpace;
use vsva_vtd::inv_desc::PasidIotlbGranularity;
use vsva_vtd::regs::{AddressType, RequestType};
use vsva_vtd::{
    addr::Gpa, addr::Gva, addr::Pasid, addr::SourceId, fault::FaultReason, flpte::FlPagingMode,
    flpte::FlPte, inv_desc::InvDesc, pasid::Pgtt,
};

const RAM: u64 = 64 << 20;
const PAGE: usize = 4096;

fn host() -> Host {
    Host::new(1 << 30, true).unwrap()
}

/// Bytes that differ within a page and from page to page.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn read(p: &Process, gva: Gva, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    p.read(gva, &mut buf).unwrap();
    buf
}

/// Asserts that `got` equals `want`, naming the first byte that differs.
#[track_caller]
fn same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "lengths");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!("byte {i:#x} is {:#04x}, expected {:#04x}", got[i], want[i]);
    }
}

fn memmove(src: Gva, dst: Gva, len: usize) -> Operation {
    Operation::Memmove {
        src: src.0,
        dst: dst.0,
        size: len as u32,
    }
}

/// Runs `op` and requires it to succeed.
fn run_ok(vm: &Vm, p: &Process, pasid: Pasid, op: Operation, record: Gva) -> CompletionRecord {
    let rec = vm.run(p, pasid, op, record).unwrap();
    assert_eq!(rec.status, CompletionStatus::Success, "{op:?}: {rec:?}");
    rec
}

/// A process's buffers: a source, a destination and a completion record page.
struct Buffers {
    src: Gva,
    dst: Gva,
    record: Gva,
}

fn buffers(p: &Process, len: usize) -> Buffers {
    Buffers {
        src: p.mmap(len as u64, Prot::READ_WRITE).unwrap(),
        dst: p.mmap(len as u64, Prot::READ_WRITE).unwrap(),
        record: p.mmap(PAGE as u64, Prot::READ_WRITE).unwrap(),
    }
}

/// Memmove, fill and compare at the process's own virtual addresses.
fn copy_fill_compare(vm: &Vm, p: &Process, pasid: Pasid, b: &Buffers, len: usize, seed: u8) {
    let data = pattern(len, seed);
    p.write(b.src, &data).unwrap();
    let rec = run_ok(vm, p, pasid, memmove(b.src, b.dst, len), b.record);
    assert_eq!(rec.bytes_completed, len as u32);
    same(&read(p, b.dst, len), &data);

    // Compare: equal, then different at a byte the CPU changed.
    let compare = Operation::Compare {
        src1: b.src.0,
        src2: b.dst.0,
        size: len as u32,
    };
    assert_eq!(run_ok(vm, p, pasid, compare, b.record).result, 0);
    let at = len - PAGE + 123;
    p.write(Gva(b.dst.0 + at as u64), &[!data[at]]).unwrap();
    let rec = run_ok(vm, p, pasid, compare, b.record);
    assert_eq!((rec.result, rec.bytes_completed), (1, at as u32));

    // Fill from an odd offset across a page boundary: the bytes around it stay.
    let word = 0x0123_4567_89ab_cdef_u64 ^ u64::from(seed);
    let (start, size) = (PAGE - 5, PAGE + 10);
    let fill = Operation::Fill {
        pattern: word,
        dst: b.dst.0 + start as u64,
        size: size as u32,
    };
    run_ok(vm, p, pasid, fill, b.record);
    let mut want = data.clone();
    want[at] = !data[at];
    for (i, byte) in want[start..start + size].iter_mut().enumerate() {
        *byte = word.to_le_bytes()[i % 8];
    }
    same(&read(p, b.dst, len), &want);
}

#[test]
fn four_and_five_level_processes_share_their_address_spaces_with_the_device() {
    let host = host();
    let vm = Vm::new(&host, 0, RAM, 100).unwrap();
    let did = vm.vfio().unwrap().backend().did();
    let sl_root = vm.vfio().unwrap().backend().second_level_root();
    let walks = host.iommu.stats().walks.load(Ordering::Relaxed);

    let p4 = vm.spawn(FlPagingMode::FourLevel).unwrap();
    let p5 = vm.spawn(FlPagingMode::FiveLevel).unwrap();
    let len = 3 * PAGE;
    let b4 = buffers(&p4, len);
    // Above 2^47: only a 5-level walk reaches these addresses.
    let high = 0x00ab_cdef_0000_0000;
    let b5 = Buffers {
        src: p5
            .mmap_fixed(Gva(high), len as u64, Prot::READ_WRITE, true)
            .unwrap(),
        dst: p5
            .mmap_fixed(Gva(high + 0x10_0000), len as u64, Prot::READ_WRITE, true)
            .unwrap(),
        record: p5
            .mmap_fixed(Gva(high + 0x20_0000), PAGE as u64, Prot::READ_WRITE, true)
            .unwrap(),
    };
    let pasid4 = vm.bind(&p4).unwrap();
    let pasid5 = vm.bind(&p5).unwrap();
    assert_ne!(pasid4, pasid5);

    for (p, pasid, mode) in [
        (&p4, pasid4, FlPagingMode::FourLevel),
        (&p5, pasid5, FlPagingMode::FiveLevel),
    ] {
        // The host holds a nested PASID entry: the process's CR3 as FLPTR, walked through
        // the VM's second level, in the VM's domain.
        let entry = host.unit.pasid_entry(vm.host_sid, pasid).unwrap();
        assert_eq!(entry.pgtt, Pgtt::Nested);
        assert_eq!(entry.flptptr, p.cr3().0);
        assert_eq!(entry.flpm, mode);
        assert_eq!(entry.slptptr, sl_root.0);
        assert_eq!(entry.did, did);
        // The container knows the binding with the guest's table pointer.
        let state = vm.vfio().unwrap().state();
        let bound = state.bound.iter().find(|b| b.hpasid == pasid).unwrap();
        assert_eq!(bound.gpgd, p.cr3());
        assert!(state.pasids.contains(&pasid));
    }

    copy_fill_compare(&vm, &p4, pasid4, &b4, len, 1);
    copy_fill_compare(&vm, &p5, pasid5, &b5, len, 2);
    // The 5-level buffers are beyond a 4-level address space: the 4-level PASID faults
    // on them, and the 5-level process's bytes stay as they were.
    let before = read(&p5, b5.dst, len);
    let rec = vm
        .run(&p4, pasid4, memmove(b4.src, b5.dst, len), b4.record)
        .unwrap();
    // SGN.1: non-canonical for a 4-level walk, and not something a page request fixes.
    assert_eq!(rec.status, CompletionStatus::TranslationFail, "{rec:?}");
    assert_eq!(rec.fault_reason, FaultReason::Sgn1.code());
    assert_eq!((rec.fault_addr, rec.fault_write), (b5.dst.0, true));
    same(&read(&p5, b5.dst, len), &before);

    // Unbinding the 4-level process goes down to the host: the PASID entry, the binding
    // and the PASID itself are gone, and a DMA tagged with it faults (not even its
    // completion record is written) while the 5-level process carries on.
    vm.driver.sva_unbind(GUEST_DEVICE_SID, pasid4).unwrap();
    assert_eq!(host.unit.pasid_entry(vm.host_sid, pasid4), None);
    let state = vm.vfio().unwrap().state();
    assert!(state.bound.iter().all(|b| b.hpasid != pasid4));
    assert!(!state.pasids.contains(&pasid4));
    assert_eq!(host.pasids.lock().unwrap().owner(pasid4), None);
    assert!(host
        .iommu
        .iotlb()
        .lookup(vm.host_sid, pasid4, b4.dst.0)
        .is_none());
    let before = read(&p4, b4.dst, len);
    host.unit.take_faults();
    let rec = vm
        .run(&p4, pasid4, memmove(b4.src, b4.dst, len), b4.record)
        .unwrap();
    assert_eq!(rec.status, CompletionStatus::None);
    same(&read(&p4, b4.dst, len), &before);
    let faults = host.unit.take_faults();
    assert!(!faults.is_empty());
    for f in &faults {
        assert_eq!((f.sid, f.pasid), (vm.host_sid, Some(pasid4)), "{f:?}");
        assert_eq!(f.reason, FaultReason::Spt2.code(), "{f:?}");
    }
    copy_fill_compare(&vm, &p5, pasid5, &b5, len, 3);

    // The device went through the physical IOMMU's nested walks, and the IOMMU never
    // served a translation the tables no longer had.
    assert!(host.iommu.stats().walks.load(Ordering::Relaxed) > walks);
    assert!(host.iommu.take_stale_translations().is_empty());
    assert!(vm.viommu.take_host_errors().is_empty());
    drop((p4, p5));
    vm.shutdown().unwrap();
}

#[test]
fn munmap_invalidates_every_layer_and_dma_to_the_hole_then_faults() {
    let host = host();
    let vm = Vm::new(&host, 0, RAM, 100).unwrap();
    let p = vm.spawn(FlPagingMode::FourLevel).unwrap();
    let len = 2 * PAGE;
    let b = buffers(&p, len);
    let pasid = vm.bind(&p).unwrap();
    let data = pattern(len, 7);
    p.write(b.src, &data).unwrap();
    run_ok(&vm, &p, pasid, memmove(b.src, b.dst, len), b.record);
    same(&read(&p, b.dst, len), &data);
    // The translations of the destination are cached in the IOMMU and the device.
    for page in [b.dst.0, b.dst.0 + PAGE as u64] {
        assert!(host
            .iommu
            .iotlb()
            .lookup(vm.host_sid, pasid, page)
            .is_some());
    }
    let devtlb = vm.engine.devtlb_len();
    let guest = vm.driver.stats();
    let viommu = vm.viommu.stats();
    let hw_descriptors = host.iommu.stats().descriptors.load(Ordering::Relaxed);
    let devtlb_invs = vm.engine.stats().devtlb_invalidations;
    let dst_frames = [
        p.translate(b.dst).unwrap(),
        p.translate(Gva(b.dst.0 + PAGE as u64)).unwrap(),
    ];

    // The guest's mmu notifier sends a PASID-based IOTLB and a device-TLB invalidation
    // (each with a wait); the vIOMMU forwards each as VFIO_IOMMU_CACHE_INVALIDATE; the host
    // driver queues them to the physical IOMMU, which drops its entries and passes the
    // device-TLB ones to the device.
    p.munmap(b.dst, len as u64).unwrap();
    let guest_now = vm.driver.stats();
    assert_eq!(guest_now.range_invalidations, guest.range_invalidations + 2);
    assert_eq!(guest_now.waits, guest.waits + 2);
    let viommu_now = vm.viommu.stats();
    assert_eq!(viommu_now.descriptors, viommu.descriptors + 4);
    assert_eq!(
        viommu_now.invalidations_forwarded,
        viommu.invalidations_forwarded + 2
    );
    assert_eq!(viommu_now.host_errors, 0);
    // At least a descriptor and a wait for each forwarded invalidation (Linux's host
    // driver also flushes the device TLB along with the PASID-based IOTLB).
    assert!(host.iommu.stats().descriptors.load(Ordering::Relaxed) >= hw_descriptors + 4);
    assert!(vm.engine.stats().devtlb_invalidations > devtlb_invs);
    assert!(vm.engine.devtlb_len() < devtlb);
    for page in [b.dst.0, b.dst.0 + PAGE as u64] {
        assert!(host
            .iommu
            .iotlb()
            .lookup(vm.host_sid, pasid, page)
            .is_none());
    }

    // The freed frames go to the next mapping, elsewhere in the process (next to the
    // record page, where no new page table is needed); the device must never reach them
    // through the old addresses.
    let other = p
        .mmap_fixed(
            Gva(b.record.0 + 2 * PAGE as u64),
            len as u64,
            Prot::READ_WRITE,
            true,
        )
        .unwrap();
    let mut reused = [
        p.translate(other).unwrap(),
        p.translate(Gva(other.0 + PAGE as u64)).unwrap(),
    ];
    reused.sort();
    let mut freed = dst_frames;
    freed.sort();
    assert_eq!(reused, freed);
    let guard = pattern(len, 99);
    p.write(other, &guard).unwrap();

    // DMA to the hole: the device asks for the page (PRI), the request goes up to the
    // guest, which has no mapping there and answers Invalid; the device reports the fault.
    let requests = vm.engine.stats().page_requests;
    let rec = vm
        .run(&p, pasid, memmove(b.src, b.dst, len), b.record)
        .unwrap();
    assert_eq!(rec.status, CompletionStatus::PageResponseError, "{rec:?}");
    assert_eq!((rec.fault_addr, rec.fault_write), (b.dst.0, true));
    assert_eq!(rec.bytes_completed, 0);
    assert_eq!(vm.engine.stats().page_requests, requests + 1);
    let guest_after = vm.driver.stats();
    assert_eq!(guest_after.page_requests, guest_now.page_requests + 1);
    assert_eq!(
        guest_after.page_requests_served,
        guest_now.page_requests_served
    );
    assert_eq!(vm.viommu.stats().page_responses_forwarded, 1);
    // A read of the hole faults the same way, at its first byte.
    let rec = vm
        .run(
            &p,
            pasid,
            memmove(Gva(b.dst.0 + PAGE as u64), b.src, PAGE),
            b.record,
        )
        .unwrap();
    assert_eq!(rec.status, CompletionStatus::PageResponseError, "{rec:?}");
    assert_eq!(
        (rec.fault_addr, rec.fault_write),
        (b.dst.0 + PAGE as u64, false)
    );

    // Nothing reached the frames' new owner, and the source is intact.
    same(&read(&p, other, len), &guard);
    same(&read(&p, b.src, len), &data);
    assert!(host.iommu.take_stale_translations().is_empty());
    drop(p);
    vm.shutdown().unwrap();
}

/// What crossed each layer on the way of page requests up and responses down.
#[derive(Debug, PartialEq, Eq)]
struct PageRequestCounts {
    /// PRI requests the device sent.
    device_requests: u64,
    /// Page request descriptors the physical IOMMU queued for the host driver.
    hw_queued: u64,
    /// Page requests the VM's VFIO fault queue accepted (its eventfd signals).
    container_faults: u64,
    /// Page requests the vIOMMU wrote into the guest's page request queue.
    injected: u64,
    /// Page requests the guest driver took, and served with Success.
    guest_requests: u64,
    guest_served: u64,
    /// Page group responses: the guest's, the vIOMMU's forwarded ones, and those the
    /// device received.
    guest_responses: u64,
    forwarded: u64,
    device_responses: u64,
}

fn page_request_counts(host: &Host, vm: &Vm, container_faults: &AtomicU64) -> PageRequestCounts {
    let (dev, guest, viommu) = (vm.engine.stats(), vm.driver.stats(), vm.viommu.stats());
    PageRequestCounts {
        device_requests: dev.page_requests,
        hw_queued: host.iommu.stats().page_requests.load(Ordering::Relaxed),
        container_faults: container_faults.load(Ordering::Relaxed),
        injected: viommu.page_requests_injected,
        guest_requests: guest.page_requests,
        guest_served: guest.page_requests_served,
        guest_responses: guest.page_responses,
        forwarded: viommu.page_responses_forwarded,
        device_responses: dev.page_responses,
    }
}

/// `n` page requests went all the way up and their responses all the way down, `served`
/// of them with Success.
fn round_trips(n: u64, served: u64) -> PageRequestCounts {
    PageRequestCounts {
        device_requests: n,
        hw_queued: n,
        container_faults: n,
        injected: n,
        guest_requests: n,
        guest_served: served,
        guest_responses: n,
        forwarded: n,
        device_responses: n,
    }
}

#[test]
fn lazily_mapped_pages_are_served_by_the_guest_through_every_layer() {
    let host = host();
    let vm = Vm::new(&host, 0, RAM, 100).unwrap();
    let faults = Arc::new(AtomicU64::new(0));
    let counter = faults.clone();
    vm.vfio().unwrap().set_fault_notifier(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let p = vm.spawn(FlPagingMode::FourLevel).unwrap();
    let len = 5 * PAGE;
    let src = p.mmap(len as u64, Prot::READ_WRITE).unwrap();
    let dst = p.mmap_lazy(len as u64, Prot::READ_WRITE).unwrap();
    let zeros = p.mmap_lazy(2 * PAGE as u64, Prot::READ).unwrap();
    let record = p.mmap(PAGE as u64, Prot::READ_WRITE).unwrap();
    let pasid = vm.bind(&p).unwrap();
    let data = pattern(len, 42);
    p.write(src, &data).unwrap();
    let resident = p.resident_pages();
    assert_eq!(page_request_counts(&host, &vm, &faults), round_trips(0, 0));

    // Each destination page faults once on the device's first write; the guest populates
    // it and the device retries.
    run_ok(&vm, &p, pasid, memmove(src, dst, len), record);
    assert_eq!(p.resident_pages(), resident + 5);
    assert_eq!(page_request_counts(&host, &vm, &faults), round_trips(5, 5));
    assert!(vm.vfio().unwrap().pending_page_requests().is_empty());
    same(&read(&p, dst, len), &data);

    // Reads of lazy read-only pages populate zeroed pages.
    run_ok(&vm, &p, pasid, memmove(zeros, dst, 2 * PAGE), record);
    assert_eq!(p.resident_pages(), resident + 7);
    assert_eq!(page_request_counts(&host, &vm, &faults), round_trips(7, 7));
    let mut want = data.clone();
    want[..2 * PAGE].fill(0);
    same(&read(&p, dst, len), &want);

    // Pages already there need no request.
    run_ok(&vm, &p, pasid, memmove(src, dst, len), record);
    assert_eq!(page_request_counts(&host, &vm, &faults), round_trips(7, 7));
    same(&read(&p, dst, len), &data);

    // A write the area does not allow is refused by the guest: the device gets the
    // response, does not retry, and reports the fault; nothing is populated.
    let ro = p.mmap_lazy(PAGE as u64, Prot::READ).unwrap();
    let rec = vm.run(&p, pasid, memmove(src, ro, PAGE), record).unwrap();
    assert_eq!(rec.status, CompletionStatus::PageResponseError, "{rec:?}");
    assert_eq!((rec.fault_addr, rec.fault_write), (ro.0, true));
    assert_eq!(page_request_counts(&host, &vm, &faults), round_trips(8, 7));
    assert_eq!(p.resident_pages(), resident + 7);
    assert!(vm.vfio().unwrap().pending_page_requests().is_empty());
    assert!(vm.viommu.take_host_errors().is_empty());
    drop(p);
    vm.shutdown().unwrap();
}

fn holdings(host: &Host) -> HostHoldings {
    HostHoldings::of(host)
}

/// A VM with a bound process that has done some DMA, for teardown tests.
struct Tenant {
    vm: Vm,
    p: Arc<Process>,
    pasid: Pasid,
    b: Buffers,
}

const TENANT_LEN: usize = 2 * PAGE;

fn tenant(host: &Host, index: usize) -> Tenant {
    let vm = Vm::new(host, index, RAM, 100).unwrap();
    let p = vm.spawn(FlPagingMode::FourLevel).unwrap();
    let b = Buffers {
        src: p.mmap(TENANT_LEN as u64, Prot::READ_WRITE).unwrap(),
        dst: p.mmap_lazy(TENANT_LEN as u64, Prot::READ_WRITE).unwrap(),
        record: p.mmap(PAGE as u64, Prot::READ_WRITE).unwrap(),
    };
    let pasid = vm.bind(&p).unwrap();
    let t = Tenant { vm, p, pasid, b };
    tenant_dma(&t, index as u8);
    t
}

fn tenant_dma(t: &Tenant, seed: u8) {
    let data = pattern(TENANT_LEN, seed);
    t.p.write(t.b.src, &data).unwrap();
    run_ok(
        &t.vm,
        &t.p,
        t.pasid,
        memmove(t.b.src, t.b.dst, TENANT_LEN),
        t.b.record,
    );
    same(&read(&t.p, t.b.dst, TENANT_LEN), &data);
}

#[test]
fn shutting_a_vm_down_leaves_nothing_on_the_host() {
    let host = host();
    let empty = holdings(&host);

    // VM B runs throughout; what the host holds for it alone is the reference.
    let b = tenant(&host, 1);
    let with_b = holdings(&host);
    assert_eq!(with_b.domain_ids, empty.domain_ids + 1);
    assert!(with_b.iotlb > 0);

    // VM A: two bound processes (one 5-level), lazily mapped pages served, and a DMA left
    // waiting for a page response when the VM goes.
    let a = tenant(&host, 0);
    let p5 = a.vm.spawn(FlPagingMode::FiveLevel).unwrap();
    let lazy5 = p5.mmap_lazy(PAGE as u64, Prot::READ_WRITE).unwrap();
    let pasid5 = a.vm.bind(&p5).unwrap();
    let a_did = a.vm.vfio().unwrap().backend().did();
    let (a_sid, a_set) = (a.vm.host_sid, a.vm.vfio().unwrap().pasid_set());
    let a_pasids = [a.pasid, pasid5];
    let parked = Descriptor {
        pasid: Some(pasid5),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::None,
        op: Operation::Fill {
            pattern: 0x5a5a,
            dst: lazy5.0,
            size: PAGE as u32,
        },
    };
    a.vm.engine.portal_write(0, &parked.encode()).unwrap();
    a.vm.engine.process();
    assert_eq!(a.vm.engine.waiting_for_page_response(), 1);
    assert_eq!(a.vm.vfio().unwrap().pending_page_requests().len(), 1);
    for pasid in a_pasids {
        assert!(host.unit.pasid_entry(a_sid, pasid).is_some());
    }
    let a_pages = [a.b.src.0, a.b.dst.0, a.b.record.0];
    assert!(a_pages
        .iter()
        .all(|&page| host.iommu.iotlb().lookup(a_sid, a.pasid, page).is_some()));
    assert!(holdings(&host).allocated_bytes > with_b.allocated_bytes);

    let Tenant { vm, p, .. } = a;
    drop((p, p5));
    vm.shutdown().unwrap();

    // Nothing of A is left: memory, domain id, device, PASID set and entries, routes, and
    // every cached translation; B is untouched.
    assert!(!host.unit.is_domain_id_allocated(a_did));
    assert_eq!(host.unit.device_domain(a_sid), None);
    for pasid in a_pasids {
        assert_eq!(host.unit.pasid_entry(a_sid, pasid), None);
        assert_eq!(host.pasids.lock().unwrap().owner(pasid), None);
        assert!(host.iommu.iotlb().lookup(a_sid, pasid, 0).is_none());
    }
    assert!(a_pages
        .iter()
        .all(|&page| host.iommu.iotlb().lookup(a_sid, a.pasid, page).is_none()));
    let gone = host.pasids.lock().unwrap().allocated(a_set).unwrap_err();
    assert!(
        matches!(gone, HostError::UnknownSet(s) if s == a_set),
        "{gone:?}"
    );
    assert_eq!(gone.errno(), -libc::EINVAL);
    // B's DMA again: the caches hold exactly what they held for B alone.
    tenant_dma(&b, 11);
    assert_eq!(holdings(&host), with_b);

    // A's PASIDs are free for the next VM: the lowest comes back first.
    let c = tenant(&host, 2);
    assert_eq!(c.pasid, a_pasids.into_iter().min().unwrap());
    assert!(host.unit.pasid_entry(c.vm.host_sid, c.pasid).is_some());

    for t in [c, b] {
        let Tenant { vm, p, .. } = t;
        drop(p);
        vm.shutdown().unwrap();
    }
    assert_eq!(holdings(&host), empty);
    assert!(host.iommu.take_stale_translations().is_empty());
}

#[test]
fn another_vm_can_neither_program_nor_reach_a_vms_pasid() {
    let host = host();
    let a = tenant(&host, 0);
    let b = tenant(&host, 1);
    let (pa, pb) = (a.pasid, b.pasid);
    // Both PASIDs share a PASID directory entry, so B's directory entry for A's PASID is
    // present and only the PASID table entry is missing.
    assert_eq!(pa.dir_index(), pb.dir_index());
    assert_ne!(pa, pb);

    // A leaves a DMA waiting for a page response, so that there is a group B could
    // try to answer.
    let lazy = a.p.mmap_lazy(PAGE as u64, Prot::READ_WRITE).unwrap();
    let parked = Descriptor {
        pasid: Some(pa),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(a.b.record.0),
        op: Operation::Fill {
            pattern: 0x1122_3344_5566_7788,
            dst: lazy.0,
            size: PAGE as u32,
        },
    };
    a.p.write(a.b.record, &[0; 32]).unwrap();
    a.vm.engine.portal_write(0, &parked.encode()).unwrap();
    a.vm.engine.process();
    assert_eq!(a.vm.vfio().unwrap().pending_page_requests().len(), 1);

    let a_bytes = read(&a.p, a.b.dst, TENANT_LEN);
    let a_state = a.vm.vfio().unwrap().state();
    let b_state = b.vm.vfio().unwrap().state();
    let a_entry = host.unit.pasid_entry(a.vm.host_sid, pa).unwrap();
    let a_cached = host
        .iommu
        .iotlb()
        .lookup(a.vm.host_sid, pa, a.b.dst.0)
        .unwrap();
    let a_owner = host.pasids.lock().unwrap().owner(pa);

    // Every SVA ioctl naming A's PASID is refused on B's container with EPERM.
    let eperm = -libc::EPERM;
    let bind = BindGpasid {
        hpasid: pa,
        gpasid: Some(pa),
        gpgd: b.p.cr3(),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    };
    let all_caches =
        IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB | IOMMU_CACHE_INV_TYPE_PASID;
    let by_pasid = CacheInvalidate {
        cache: all_caches,
        granularity: InvGranularity::Pasid {
            pasid: Some(pa),
            archid: None,
        },
    };
    let by_addr = CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Addr {
            pasid: Some(pa),
            archid: None,
            addr: a.b.dst.0,
            granule_size: PAGE as u64,
            nb_granules: 2,
            leaf: true,
        },
    };
    let answer = PageResponse {
        pasid: Some(pa),
        grpid: a.vm.vfio().unwrap().pending_page_requests()[0]
            .request
            .grpid,
        code: PageResponseCode::Success,
    };
    {
        let mut vfio = b.vm.vfio().unwrap();
        let refusals = [
            ("bind", vfio.bind_gpasid(&bind)),
            ("unbind", vfio.unbind_gpasid(&bind)),
            ("invalidate by PASID", vfio.cache_invalidate(&by_pasid)),
            ("invalidate by address", vfio.cache_invalidate(&by_addr)),
            ("free", vfio.pasid_free(pa)),
            ("page response", vfio.page_response(&answer)),
            (
                "page response to A's device",
                vfio.page_response_to(a.vm.host_sid, &answer),
            ),
        ];
        for (what, result) in refusals {
            assert_eq!(result.map_err(|e| e.errno()), Err(eperm), "{what}");
        }
    }

    // Nothing changed: both containers, A's PASID entry, ownership and cached translation,
    // A's waiting DMA.
    assert_eq!(a.vm.vfio().unwrap().state(), a_state);
    assert_eq!(b.vm.vfio().unwrap().state(), b_state);
    assert_eq!(host.unit.pasid_entry(a.vm.host_sid, pa), Some(a_entry));
    assert_eq!(host.unit.pasid_entry(b.vm.host_sid, pa), None);
    assert_eq!(host.pasids.lock().unwrap().owner(pa), a_owner);
    assert_eq!(
        host.iommu.iotlb().lookup(a.vm.host_sid, pa, a.b.dst.0),
        Some(a_cached)
    );
    assert_eq!(a.vm.engine.waiting_for_page_response(), 1);
    assert_eq!(a.vm.vfio().unwrap().pending_page_requests().len(), 1);

    // B's device tags a DMA with A's PASID at A's addresses: B's PASID table has no entry
    // for it, so the physical IOMMU faults (SPT.2) and records it; not even the completion
    // record can be written.
    host.unit.take_faults();
    let fill = Operation::Fill {
        pattern: 0xdead_beef_dead_beef,
        dst: a.b.dst.0,
        size: TENANT_LEN as u32,
    };
    let rec = b.vm.run(&b.p, pa, fill, b.b.record).unwrap();
    assert_eq!(rec.status, CompletionStatus::None);
    same(&read(&b.p, b.b.record, 32), &[0; 32]);
    let swerr = b.vm.engine.software_error().unwrap();
    assert_eq!(swerr.status, CompletionStatus::CompletionAddrTranslation);
    assert_eq!(swerr.pasid, Some(pa));
    // Two faults, recorded for B's device with A's PASID: the fill's first page (an ATS
    // translation request) and the completion record.
    let faults = host.unit.take_faults();
    for f in &faults {
        assert_eq!((f.sid, f.pasid), (b.vm.host_sid, Some(pa)), "{f:?}");
        assert_eq!(f.reason, FaultReason::Spt2.code(), "{f:?}");
        assert_eq!(f.request, RequestType::Write);
        assert_eq!(f.address_type, AddressType::TranslationRequest);
    }
    let at: Vec<u64> = faults.iter().map(|f| f.fault_info).collect();
    assert_eq!(at, [a.b.dst.0, b.b.record.0]);
    assert_eq!(b.vm.engine.stats().bytes_moved, TENANT_LEN as u64);

    // A's bytes are as they were, and A carries on: its waiting DMA is served, and its
    // PASID still works.
    same(&read(&a.p, a.b.dst, TENANT_LEN), &a_bytes);
    a.vm.run_device().unwrap();
    let mut raw = [0u8; 32];
    a.p.read(a.b.record, &mut raw).unwrap();
    let done = CompletionRecord::from_bytes(&raw).unwrap();
    assert_eq!(done.status, CompletionStatus::Success, "{done:?}");
    assert_eq!(
        read(&a.p, lazy, 8),
        0x1122_3344_5566_7788_u64.to_le_bytes().to_vec()
    );
    tenant_dma(&a, 5);
    tenant_dma(&b, 6);
    assert!(host.iommu.take_stale_translations().is_empty());
    for t in [a, b] {
        let Tenant { vm, p, .. } = t;
        drop(p);
        vm.shutdown().unwrap();
    }
}

/// The guest physical address of the first-level leaf entry that maps `gva` in a
/// process's tables, found as the CPU's page walker finds it.
fn leaf_entry(vm: &Vm, p: &Process, gva: Gva) -> u64 {
    let mut table = p.cr3().0;
    for level in (2..=p.paging_mode().levels()).rev() {
        let index = (gva.0 >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        let entry = vm.mem.read_u64(table + index * 8).unwrap();
        assert!(FlPte(entry).present() && !FlPte(entry).is_leaf(level));
        table = entry & FlPte::ADDR_MASK;
    }
    table + ((gva.0 >> 12) & 0x1ff) * 8
}

/// Points the 4-KiB page at `gva` to `frame`, writing the entry in guest RAM as a buggy
/// kernel would: no mmu notifier, so no IOMMU invalidation.
fn remap_behind_the_drivers_back(vm: &Vm, p: &Process, gva: Gva, frame: Gpa) {
    let slot = leaf_entry(vm, p, gva);
    let entry = vm.mem.read_u64(slot).unwrap();
    vm.mem
        .write_u64(slot, (entry & !FlPte::ADDR_MASK) | frame.0)
        .unwrap();
}

/// Sets the device's CTRL features (the engine is disabled and re-enabled, as a device
/// driver reconfiguring it would).
fn set_device_features(vm: &Vm, features: u64) {
    let ctrl = vm.engine.mmio_read(REG_CTRL).unwrap();
    vm.engine.mmio_write(REG_CTRL, ctrl & !CTRL_ENABLE).unwrap();
    vm.engine.enable(features).unwrap();
}

#[test]
fn a_missing_guest_invalidation_leaves_the_device_on_the_old_page_until_it_is_sent() {
    let host = host();
    let vm = Vm::new(&host, 0, RAM, 100).unwrap();
    let did = vm.vfio().unwrap().backend().did();
    let p = vm.spawn(FlPagingMode::FourLevel).unwrap();
    let b = buffers(&p, 2 * PAGE);
    let pasid = vm.bind(&p).unwrap();
    let old = pattern(2 * PAGE, 3);
    p.write(b.src, &old).unwrap();
    let hpa = |gpa: Gpa| vm.ram_hpa.0 + gpa.0;

    // Without ATS every request of the device reaches the physical IOMMU's IOTLB, where
    // strict mode can check it; the device TLB case follows.
    set_device_features(&vm, CTRL_PASID_EN | CTRL_PRI_EN);
    run_ok(&vm, &p, pasid, memmove(b.src, b.dst, PAGE), b.record);
    same(&read(&p, b.dst, PAGE), &old[..PAGE]);
    let old_frame = p.translate(b.src).unwrap();

    // The kernel moves the page to a new frame with new contents but forgets the
    // invalidation. The CPU sees the new page at once.
    let new_frame = vm.guest_frames.alloc().unwrap();
    let new = pattern(PAGE, 200);
    vm.mem.write(new_frame.0, &new).unwrap();
    remap_behind_the_drivers_back(&vm, &p, b.src, new_frame);
    assert_eq!(p.translate(b.src), Some(new_frame));
    same(&read(&p, b.src, PAGE), &new);
    let forwarded = vm.viommu.stats().invalidations_forwarded;

    // The device still uses the cached translation: it copies the old page, as hardware
    // does. Strict mode names the source, PASID, address, both pages and the missing
    // descriptor (in the host's terms: the VM's domain id and the host PASID).
    run_ok(&vm, &p, pasid, memmove(b.src, b.dst, PAGE), b.record);
    same(&read(&p, b.dst, PAGE), &old[..PAGE]);
    let stale = host.iommu.take_stale_translations();
    assert_eq!(stale.len(), 1, "{stale:?}");
    let s = &stale[0];
    assert_eq!((s.sid, s.pasid, s.addr), (vm.host_sid, pasid, b.src.0));
    assert_eq!(s.cached.output, hpa(old_frame));
    assert_eq!(s.now, Ok((hpa(new_frame), 12)));
    assert_eq!(
        s.missing,
        InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
            did,
            pasid,
            addr: b.src.0,
            ih: false,
            am: 0,
        }
    );
    assert_eq!(vm.viommu.stats().invalidations_forwarded, forwarded);

    // The invalidation the kernel owed (an mmu-notifier event on the range) goes down the
    // whole path: the device now reads the new page, and nothing is stale.
    p.mprotect(b.src, PAGE as u64, Prot::READ_WRITE).unwrap();
    assert!(vm.viommu.stats().invalidations_forwarded > forwarded);
    run_ok(&vm, &p, pasid, memmove(b.src, b.dst, PAGE), b.record);
    same(&read(&p, b.dst, PAGE), &new);
    assert!(host.iommu.take_stale_translations().is_empty());

    // With ATS the device's own TLB holds the translation: the second page, remapped
    // without invalidation, is read from the old frame without asking the IOMMU at all,
    // until the device-TLB invalidation reaches the device.
    set_device_features(&vm, CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN);
    let second = Gva(b.src.0 + PAGE as u64);
    run_ok(&vm, &p, pasid, memmove(second, b.dst, PAGE), b.record);
    same(&read(&p, b.dst, PAGE), &old[PAGE..]);
    let old_frame2 = p.translate(second).unwrap();
    let frame2 = vm.guest_frames.alloc().unwrap();
    let new2 = pattern(PAGE, 201);
    vm.mem.write(frame2.0, &new2).unwrap();
    remap_behind_the_drivers_back(&vm, &p, second, frame2);
    let hits = vm.engine.stats().devtlb_hits;
    run_ok(&vm, &p, pasid, memmove(second, b.dst, PAGE), b.record);
    same(&read(&p, b.dst, PAGE), &old[PAGE..]);
    assert!(vm.engine.stats().devtlb_hits > hits);
    // The IOMMU was not asked, so strict mode has nothing to say: only the device knows.
    assert!(host.iommu.take_stale_translations().is_empty());
    let devtlb_invs = vm.engine.stats().devtlb_invalidations;
    p.mprotect(second, PAGE as u64, Prot::READ_WRITE).unwrap();
    assert!(vm.engine.stats().devtlb_invalidations > devtlb_invs);
    run_ok(&vm, &p, pasid, memmove(second, b.dst, PAGE), b.record);
    same(&read(&p, b.dst, PAGE), &new2);

    // Back to the process's own frames, properly this time.
    remap_behind_the_drivers_back(&vm, &p, b.src, old_frame);
    remap_behind_the_drivers_back(&vm, &p, second, old_frame2);
    p.mprotect(b.src, 2 * PAGE as u64, Prot::READ_WRITE)
        .unwrap();
    run_ok(&vm, &p, pasid, memmove(b.src, b.dst, 2 * PAGE), b.record);
    same(&read(&p, b.dst, 2 * PAGE), &old);
    vm.guest_frames.free(new_frame).unwrap();
    vm.guest_frames.free(frame2).unwrap();
    assert!(host.iommu.take_stale_translations().is_empty());
    drop(p);
    vm.shutdown().unwrap();
}

/// An emulated device's view of guest memory through the vIOMMU (vm-memory's IoMemory).
type IoMem = IommuMemory<GuestMemoryMmap, IommuAddressSpace>;

#[test]
fn an_emulated_device_and_the_passthrough_device_share_one_process_address_space() {
    const EMULATED: SourceId = SourceId::from_rid(0x0020);
    let host = host();
    let vm = Vm::new(&host, 0, RAM, 100).unwrap();
    vm.driver
        .attach_device(DeviceConfig {
            sid: EMULATED,
            pasid_bits: 20,
            ats: false,
            pri: false,
            ats_queue_depth: 0,
        })
        .unwrap();
    let p = vm.spawn(FlPagingMode::FiveLevel).unwrap();
    let len = 3 * PAGE;
    let b = buffers(&p, len);
    // One PASID for the process, whichever device it is bound to (Linux's one PASID per
    // mm): the emulated device's binding stays in the vIOMMU, the passthrough one goes to
    // the host.
    let pasid = vm.driver.sva_bind(EMULATED, &p).unwrap();
    assert_eq!(vm.bind(&p).unwrap(), pasid);
    assert_eq!(vm.viommu.stats().binds, 1);
    let io: IoMem = IommuMemory::new(
        (*vm.mem).clone(),
        vm.viommu.address_space(EMULATED, Some(pasid), false),
        true,
        (),
    );

    // The passthrough device fills the buffer; the emulated device reads it by GVA,
    // across page boundaries, through the vIOMMU's own first-level walk.
    let data = pattern(len, 17);
    p.write(b.src, &data).unwrap();
    run_ok(&vm, &p, pasid, memmove(b.src, b.dst, len), b.record);
    same(&io_read(&io, b.dst.0, len).unwrap(), &data);
    same(
        &io_read(&io, b.dst.0 + PAGE as u64 - 7, 14).unwrap(),
        &data[PAGE - 7..PAGE + 7],
    );
    let walks = vm.viommu.stats().walks;
    assert!(walks > 0);

    // The emulated device writes; the process and the passthrough device see it.
    io_write(&io, b.src.0 + 100, b"written by an emulated device").unwrap();
    let mut want = data.clone();
    want[100..129].copy_from_slice(b"written by an emulated device");
    same(&read(&p, b.src, len), &want);
    let compare = Operation::Compare {
        src1: b.src.0,
        src2: b.dst.0,
        size: len as u32,
    };
    let rec = run_ok(&vm, &p, pasid, compare, b.record);
    assert_eq!((rec.result, rec.bytes_completed), (1, 100));

    // munmap reaches the vIOMMU's caches too: the emulated device faults there.
    p.munmap(b.dst, len as u64).unwrap();
    assert!(io_read(&io, b.dst.0, 4).is_err());
    assert!(io_read(&io, b.dst.0 + 2 * PAGE as u64, 4).is_err());
    same(&io_read(&io, b.src.0, len).unwrap(), &want);
    drop(io);
    drop(p);
    vm.shutdown().unwrap();
}

#[test]
fn guest_ram_a_live_process_still_maps_is_not_handed_to_the_next_vm() {
    let host = host();
    let empty = holdings(&host);
    let a = Vm::new(&host, 0, RAM, 100).unwrap();
    let p = a.spawn(FlPagingMode::FourLevel).unwrap();
    let buf = p.mmap(PAGE as u64, Prot::READ_WRITE).unwrap();
    let pasid = a.bind(&p).unwrap();
    let gpa = p.translate(buf).unwrap();
    let a_ram = (a.ram_hpa, a.ram_size);

    // The process outlives its VM: everything else goes, but not the RAM it maps.
    assert!(a.shutdown().is_err());
    let left = holdings(&host);
    assert_eq!(
        left,
        HostHoldings {
            allocated_bytes: empty.allocated_bytes + a_ram.1,
            ..empty
        }
    );
    assert_eq!(host.pasids.lock().unwrap().owner(pasid), None);

    // The next VM gets other frames, and what the old mapping writes never reaches it.
    let b = tenant(&host, 1);
    let (start, end) = (b.vm.ram_hpa.0, b.vm.ram_hpa.0 + b.vm.ram_size);
    assert!(end <= a_ram.0 .0 || start >= a_ram.0 .0 + a_ram.1);
    let b_bytes = read(&b.p, b.b.dst, TENANT_LEN);
    p.write(buf, &[0xee; PAGE]).unwrap();
    p.memory()
        .write(gpa.0, &vec![0xee; (RAM - gpa.0) as usize])
        .unwrap();
    same(&read(&b.p, b.b.dst, TENANT_LEN), &b_bytes);
    drop(p);
    let Tenant { vm, p, .. } = b;
    drop(p);
    vm.shutdown().unwrap();
}

#[test]
fn two_vms_share_the_host_iommu_from_two_threads() {
    let host = host();
    let empty = holdings(&host);
    let vms: Vec<Arc<Vm>> = (0..2)
        .map(|i| Arc::new(Vm::new(&host, i, RAM, 100).unwrap()))
        .collect();
    std::thread::scope(|s| {
        for (i, vm) in vms.iter().enumerate() {
            s.spawn(move || {
                for round in 0..8u8 {
                    let mode = if round % 2 == 0 {
                        FlPagingMode::FourLevel
                    } else {
                        FlPagingMode::FiveLevel
                    };
                    let p = vm.spawn(mode).unwrap();
                    let len = 3 * PAGE;
                    let src = p.mmap(len as u64, Prot::READ_WRITE).unwrap();
                    let dst = p.mmap_lazy(len as u64, Prot::READ_WRITE).unwrap();
                    let record = p.mmap(PAGE as u64, Prot::READ_WRITE).unwrap();
                    let pasid = vm.bind(&p).unwrap();
                    let data = pattern(len, round ^ (i as u8 * 0x55));
                    p.write(src, &data).unwrap();
                    run_ok(vm, &p, pasid, memmove(src, dst, len), record);
                    same(&read(&p, dst, len), &data);
                    p.munmap(dst, PAGE as u64).unwrap();
                    let rec = vm.run(&p, pasid, memmove(src, dst, len), record).unwrap();
                    assert_eq!(rec.status, CompletionStatus::PageResponseError);
                    assert_eq!(rec.fault_addr, dst.0);
                    vm.driver.sva_unbind(GUEST_DEVICE_SID, pasid).unwrap();
                }
            });
        }
    });
    assert!(host.iommu.take_stale_translations().is_empty());
    for vm in vms {
        assert!(vm.viommu.take_host_errors().is_empty());
        assert_eq!(vm.driver.stats().page_requests_served, 8 * 3);
        Arc::into_inner(vm).unwrap().shutdown().unwrap();
    }
    assert_eq!(holdings(&host), empty);
}

/// A VM over iommufd has no VFIO type1 container: asking one for it is an error the caller
/// handles, not a panic; a type1 VM's is there.
#[test]
fn only_a_type1_vm_has_a_vfio_container() {
    let host = host();
    let over_iommufd = Vm::with_uapi(&host, 0, RAM, 16, Uapi::Iommufd).unwrap();
    assert!(matches!(over_iommufd.vfio(), Err(StackError::NoContainer)));
    assert!(over_iommufd.iommufd().is_some());
    let type1 = Vm::new(&host, 1, RAM, 16).unwrap();
    assert!(type1.vfio().unwrap().state().bound.is_empty());
    over_iommufd.shutdown().unwrap();
    type1.shutdown().unwrap();
}
