//! End to end: guest process page tables → guest IOMMU driver → vIOMMU → VFIO uAPI → host
//! driver → nested translation in the physical IOMMU → device DMA, with real bytes.

use vsva::stack::{Host, Vm};
use vsva_guest::Prot;
use vsva_hw::dma::{CompletionStatus, Operation};
use vsva_vtd::{FlPagingMode, Gva};

const RAM: u64 = 64 << 20;

fn host() -> Host {
    Host::new(1 << 30, true).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn read(p: &vsva_guest::Process, gva: Gva, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    p.read(gva, &mut buf).unwrap();
    buf
}

#[test]
fn a_guest_process_shares_its_address_space_with_a_passthrough_device() {
    let host = host();
    let vm = Vm::new(&host, 0, RAM, 100).unwrap();
    let p = vm.spawn(FlPagingMode::FourLevel).unwrap();
    let src = p.mmap(3 * 4096, Prot::READ_WRITE).unwrap();
    let dst = p.mmap(3 * 4096, Prot::READ_WRITE).unwrap();
    let record = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = vm.bind(&p).unwrap();
    let data = pattern(3 * 4096, 1);
    p.write(src, &data).unwrap();
    let rec = vm
        .run(
            &p,
            pasid,
            Operation::Memmove {
                src: src.0,
                dst: dst.0,
                size: 3 * 4096,
            },
            record,
        )
        .unwrap();
    assert_eq!(rec.status, CompletionStatus::Success);
    assert_eq!(read(&p, dst, 3 * 4096), data);
    // The translation was nested: the host IOMMU holds a nested PASID entry for the VM.
    let entry = host.unit.pasid_entry(vm.host_sid, pasid).unwrap();
    assert_eq!(entry.pgtt, vsva_vtd::Pgtt::Nested);
    assert_eq!(entry.flptptr, p.cr3().0);
    assert!(host.iommu.take_stale_translations().is_empty());
    vm.shutdown().unwrap();
}
