//! End to end (issue 13 §4): an unrecoverable fault of a passthrough device on a nested
//! PASID goes from the physical IOMMU's fault recording registers through the host driver,
//! the VM's VFIO container (an `IOMMU_FAULT_DMA_UNRECOV` record) and the vIOMMU into the
//! guest's fault recording registers, where the guest driver reads and clears it; only the
//! VM that owns the PASID sees it, and a flood of faults obeys the registers' overflow
//! rule.

use vsva_guest::process::Prot;
use vsva_hw::dma::regs::{CTRL_ENABLE, CTRL_PASID_EN, REG_CTRL};
use vsva_hw::dma::{CompletionStatus, Operation};
use vsva_testbed::stack::{Host, Vm, GUEST_DEVICE_SID};
use vsva_vtd::regs::layout::{fsts, offset};
use vsva_vtd::regs::{AddressType, RequestType};
use vsva_vtd::{addr::Gva, addr::Pasid, fault::FaultReason, flpte::FlPagingMode};

const RAM: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// A canonical 4-level address no process here maps.
const NEVER_MAPPED: u64 = 0x5555_0000_0000;

/// A VM whose device makes untranslated requests (no ATS, no PRI), so that a request its
/// PASID's tables do not map is an unrecoverable fault the IOMMU records; and a bound
/// process with a completion record page.
fn vm_without_ats(
    host: &Host,
    index: usize,
) -> (Vm, std::sync::Arc<vsva_guest::process::Process>, Pasid, Gva) {
    let vm = Vm::new(host, index, RAM, 100).unwrap();
    let ctrl = vm.engine.mmio_read(REG_CTRL).unwrap();
    vm.engine.mmio_write(REG_CTRL, ctrl & !CTRL_ENABLE).unwrap();
    vm.engine.enable(CTRL_PASID_EN).unwrap();
    let p = vm.spawn(FlPagingMode::FourLevel).unwrap();
    let record = p.mmap(PAGE, Prot::READ_WRITE).unwrap();
    let pasid = vm.bind(&p).unwrap();
    (vm, p, pasid, record)
}

fn fill(page: u64) -> Operation {
    Operation::Fill {
        pattern: 0x5a5a_5a5a_5a5a_5a5a,
        dst: page,
        size: 64,
    }
}

#[test]
fn a_dma_the_guest_never_mapped_reaches_its_fault_records_only() {
    let host = Host::new(1 << 30, true).unwrap();
    let (a, pa, pasid_a, rec_a) = vm_without_ats(&host, 0);
    let (b, _pb, _pasid_b, _) = vm_without_ats(&host, 1);
    assert!(a.driver.take_faults().is_empty());

    let rec = a.run(&pa, pasid_a, fill(NEVER_MAPPED), rec_a).unwrap();
    assert_ne!(rec.status, CompletionStatus::Success, "{rec:?}");
    // The host recorded it with the host's requester id.
    let host_faults = host.unit.take_faults();
    assert!(
        host_faults.iter().any(|f| f.sid == a.host_sid
            && f.pasid == Some(pasid_a)
            && f.reason == FaultReason::Sfl2.code()
            && f.fault_info == NEVER_MAPPED),
        "{host_faults:?}"
    );

    // The VMM reads the container's record and the vIOMMU records it for the guest.
    a.serve_page_requests().unwrap();
    assert!(a.driver.fault_pending(), "the fault event was raised");
    let seen = a.driver.take_faults();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let f = seen[0];
    assert_eq!(
        f.sid, GUEST_DEVICE_SID,
        "the guest's requester id, not the host's"
    );
    assert_eq!(f.pasid, Some(pasid_a));
    assert_eq!(f.reason, FaultReason::Sfl2.code());
    assert_eq!(f.fault_info, NEVER_MAPPED);
    assert_eq!(f.request, RequestType::Write);
    assert_eq!(f.address_type, AddressType::Untranslated);
    assert!(!f.privileged && !f.exe);
    // Read and cleared: nothing is left, and FSTS holds neither PPF nor PFO.
    assert!(a.driver.take_faults().is_empty());
    let status = a.viommu.read(offset::FSTS, 4).unwrap() as u32;
    assert_eq!(status & (fsts::PPF | fsts::PFO), 0);

    // The other VM saw nothing: not in its container, not in its registers.
    b.serve_page_requests().unwrap();
    assert!(b.vfio().unwrap().read_unrecoverable_faults().is_empty());
    assert!(b.driver.take_faults().is_empty());
    assert_eq!(b.viommu.stats().faults_recorded, 0);

    // A's device on another VM's PASID is the host's fault (SPT.2: no entry in A's PASID
    // table) and no guest's.
    let rec = a.run(&pa, _pasid_b, fill(NEVER_MAPPED), rec_a).unwrap();
    assert_ne!(rec.status, CompletionStatus::Success, "{rec:?}");
    assert!(host
        .unit
        .take_faults()
        .iter()
        .any(|f| f.reason == FaultReason::Spt2.code()));
    a.serve_page_requests().unwrap();
    b.serve_page_requests().unwrap();
    assert!(a.driver.take_faults().is_empty());
    assert!(b.driver.take_faults().is_empty());
}

#[test]
fn a_flood_of_faults_overflows_the_guest_registers_and_is_bounded() {
    let host = Host::new(1 << 30, true).unwrap();
    let (vm, p, pasid, record) = vm_without_ats(&host, 0);
    let registers = vm.viommu.config().cap().fault_recording_count();
    // More faults than the guest has registers, none read in between.
    let faults = registers as u64 + 3;
    for i in 0..faults {
        let rec = vm
            .run(&p, pasid, fill(NEVER_MAPPED + i * PAGE), record)
            .unwrap();
        assert_ne!(rec.status, CompletionStatus::Success, "{rec:?}");
        vm.serve_page_requests().unwrap();
    }
    // Every register holds one; the next fault found the first register full: PFO, and
    // the rest were lost (VT-d §7.2.1).
    let status = vm.viommu.read(offset::FSTS, 4).unwrap() as u32;
    assert_eq!(status & (fsts::PPF | fsts::PFO), fsts::PPF | fsts::PFO);
    let seen = vm.driver.take_faults();
    let pages: Vec<u64> = seen.iter().map(|f| f.fault_info).collect();
    let want: Vec<u64> = (0..registers as u64)
        .map(|i| NEVER_MAPPED + i * PAGE)
        .collect();
    assert_eq!(pages, want);
    // Cleared, the registers take the next fault again.
    let rec = vm.run(&p, pasid, fill(NEVER_MAPPED), record).unwrap();
    assert_ne!(rec.status, CompletionStatus::Success, "{rec:?}");
    vm.serve_page_requests().unwrap();
    let seen = vm.driver.take_faults();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].fault_info, NEVER_MAPPED);
}
