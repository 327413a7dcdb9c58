//! Emulated devices on an arm64 guest: the virtual SMMUv3 translates their transactions
//! itself, through the guest's STE, CD and AArch64 stage-1 tables, and serves device
//! models written against vm-memory through an `Iommu` address space whose IOTLB keeps
//! what it translated until the guest's own commands invalidate it. The guest is the
//! arm64 guest model: its arm-smmu-v3 driver (`SmmuSva`) binds processes to SubstreamIDs.

use std::sync::Arc;

use proptest::prelude::*;

use vm_memory::{GuestAddress, GuestMemoryMmap, Iommu, IommuMemory, Permissions};
use vsva_guest::{frames::GuestFrames, process::Process, process::Prot, smmu::SmmuSva};
use vsva_mem::PhysMem;
use vsva_smmuv3::regs::{cr0, offset};
use vsva_smmuv3::walk::{walk_stage1, AccessRequest, AddressSize, PageSize, S1Config, WalkRecord};
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, cd::L1Cd, desc::Descriptor as D, event::Event,
    event::EventType, features::Features, ste::Config, ste::S1Dss, ste::S1Fmt, ste::Ste,
};
use vsva_testbed::dma_io::{read as io_read, write as io_write};
use vsva_testbed::smmu_demo::VSmmuMmio;
use vsva_vmm::{SmmuAddressSpace, VSmmu, VSmmuConfig};
use vsva_vtd::addr::{Gpa, Gva};

const RAM: u64 = 64 << 20;
/// The emulated device's StreamID.
const SID: u32 = 0x20;
const PAGE: u64 = 4096;

type IoMem = IommuMemory<GuestMemoryMmap, SmmuAddressSpace>;

/// An arm64 VM whose guest kernel drives the vSMMU, with an emulated device attached.
struct Vm {
    ram: Arc<GuestMemoryMmap>,
    vsmmu: Arc<VSmmu>,
    guest: Option<Arc<SmmuSva<VSmmuMmio>>>,
    frames: Arc<GuestFrames>,
}

impl Vm {
    fn new() -> Vm {
        let ram =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
        let vsmmu = VSmmu::new(ram.clone(), VSmmuConfig::default()).unwrap();
        let frames = Arc::new(GuestFrames::new(ram.clone(), Gpa(16 << 20), 48 << 20).unwrap());
        let guest = SmmuSva::new(VSmmuMmio(vsmmu.clone()), ram.clone(), frames.clone()).unwrap();
        guest.attach_device(SID).unwrap();
        Vm {
            ram,
            vsmmu,
            guest: Some(guest),
            frames,
        }
    }

    fn guest(&self) -> &Arc<SmmuSva<VSmmuMmio>> {
        self.guest.as_ref().unwrap()
    }

    fn process(&self) -> Arc<Process> {
        Arc::new(Process::new_aarch64(self.ram.clone(), self.frames.clone()).unwrap())
    }

    /// The device's unprivileged address space of `ssid`, as vm-memory sees it.
    fn io(&self, ssid: Option<u32>) -> IoMem {
        let space = self.vsmmu.address_space(SID, ssid, false);
        IommuMemory::new((*self.ram).clone(), space, true, ())
    }

    /// The events the guest's driver reads from its event queue.
    fn events(&self) -> Vec<Event> {
        self.guest().read_events().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(g) = self.guest.take() {
            g.shutdown().unwrap();
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The guest physical address of the level-3 descriptor that maps `va` in `p`'s tables.
fn leaf_slot(p: &Process, ram: &GuestMemoryMmap, va: u64) -> u64 {
    let cfg = ContextDescriptor::new(p.cr3().0, 16, 1)
        .s1_config(&Features::VSVA)
        .unwrap();
    let mut rec = WalkRecord::default();
    walk_stage1(ram, &cfg, va, AccessRequest::READ, &mut rec).unwrap();
    rec.steps.last().unwrap().entry_address
}

/// Points the page at `va` to `frame` in `p`'s tables behind the guest driver's back:
/// nothing is invalidated.
fn retarget(p: &Process, ram: &GuestMemoryMmap, va: u64, frame: u64) {
    let slot = leaf_slot(p, ram, va);
    let leaf = ram.read_u64(slot).unwrap();
    ram.write_u64(slot, (leaf & !D::ADDR_MASK) | frame).unwrap();
}

#[test]
fn an_emulated_device_reads_and_writes_process_memory_at_virtual_addresses() {
    let vm = Vm::new();
    let p = vm.process();
    let buf = p.mmap(3 * PAGE, Prot::READ_WRITE).unwrap().0;
    let data = pattern(2 * PAGE as usize, 3);
    p.write(Gva(buf), &data).unwrap();
    let ssid = vm.guest().bind(SID, &p).unwrap();
    let io = vm.io(Some(ssid));
    assert_eq!(io.iommu().substream_id(), Some(ssid));
    // A read across page boundaries gathers the process's pages (not contiguous in RAM).
    assert_eq!(
        io_read(&io, buf + 0x10, 2 * PAGE as usize - 0x10).unwrap(),
        data[0x10..]
    );
    // A write lands in guest RAM where the process's tables put it.
    io_write(&io, buf + PAGE + 0xff8, b"written by DMA").unwrap();
    let mut back = [0u8; 14];
    p.read(Gva(buf + PAGE + 0xff8), &mut back).unwrap();
    assert_eq!(&back, b"written by DMA");
    let gpa = p.translate(Gva(buf + 2 * PAGE)).unwrap().0;
    let mut raw = [0u8; 6];
    vm.ram.read(gpa, &mut raw).unwrap();
    assert_eq!(&raw, b"by DMA");
    assert_eq!(vm.events(), [], "no fault");
    // The vSMMU's own translation says the same, with the CD's ASID.
    let (_, asid) = vm.guest().bonds(SID)[0];
    let t = vm
        .vsmmu
        .translate(SID, Some(ssid), buf + 2 * PAGE + 5, AccessRequest::READ)
        .unwrap();
    assert_eq!((t.translation.output, t.asid), (gpa + 5, Some(asid)));
    assert_eq!(t.translation.page_size, PageSize::Size4K);
}

#[test]
fn unmapped_and_read_only_pages_fault_at_the_exact_address() {
    let vm = Vm::new();
    let p = vm.process();
    let buf = p.mmap(2 * PAGE, Prot::READ_WRITE).unwrap().0;
    let ro = p.mmap(PAGE, Prot::READ).unwrap().0;
    let ssid = vm.guest().bind(SID, &p).unwrap();
    let io = vm.io(Some(ssid));
    assert!(io_read(&io, buf + PAGE, 8).is_ok());
    p.munmap(Gva(buf + PAGE), PAGE).unwrap();
    // The munmap's TLBI removed the page: the access fails and the guest sees why.
    let at = buf + PAGE + 0x123;
    assert!(io_read(&io, at, 8).is_err());
    let events = vm.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.event_type, e.sid, e.ssid, e.input_addr, e.rnw, e.pnu),
        (EventType::Translation, SID, Some(ssid), at, true, false)
    );
    // The page before it is still there.
    assert!(io_read(&io, buf + 0xff0, 0x10).is_ok());
    // A read-only page reads, and a write to it is F_PERMISSION with RnW clear.
    assert!(io_read(&io, ro, 8).is_ok());
    assert!(io_write(&io, ro + 0x40, &[1; 8]).is_err());
    let events = vm.events();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.event_type, e.input_addr, e.rnw))
            .collect::<Vec<_>>(),
        [(EventType::Permission, ro + 0x40, false)]
    );
    let mut back = [0xffu8; 8];
    p.read(Gva(ro + 0x40), &mut back).unwrap();
    assert_eq!(back, [0; 8], "nothing written");
    // A privileged address space: the process's pages are EL0 pages, which PAN does not
    // forbid here (the CD leaves PAN clear), so a privileged read succeeds as well.
    let sup: IoMem = IommuMemory::new(
        (*vm.ram).clone(),
        vm.vsmmu.address_space(SID, Some(ssid), true),
        true,
        (),
    );
    assert!(io_read(&sup, buf, 8).is_ok());
}

#[test]
fn a_stale_translation_is_used_until_the_guest_invalidates_it() {
    let vm = Vm::new();
    let p = vm.process();
    let buf = p.mmap(2 * PAGE, Prot::READ_WRITE).unwrap().0;
    let other = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    p.write(Gva(buf), b"old page").unwrap();
    p.write(Gva(other), b"new page").unwrap();
    let ssid = vm.guest().bind(SID, &p).unwrap();
    let io = vm.io(Some(ssid));
    assert_eq!(io_read(&io, buf, 8).unwrap(), b"old page");
    // The guest's table now says `other`'s frame, but nobody invalidated: the address
    // space keeps the translation it holds, as an SMMU's TLB does.
    let frame = p.translate(Gva(other)).unwrap().0;
    retarget(&p, &vm.ram, buf, frame);
    assert_eq!(io_read(&io, buf, 8).unwrap(), b"old page");
    // Invalidations that do not cover it leave it: another page of the ASID (munmap's
    // CMD_TLBI_NH_VA), another SubstreamID's CD (CMD_CFGI_CD of a second bond, its unbind).
    p.munmap(Gva(buf + PAGE), PAGE).unwrap();
    let q = vm.process();
    let ssid2 = vm.guest().bind(SID, &q).unwrap();
    vm.guest().unbind(SID, ssid2).unwrap();
    assert_eq!(io_read(&io, buf, 8).unwrap(), b"old page");
    // mprotect of the page: its CMD_TLBI_NH_VA reaches the address space, and the next
    // access walks the table again.
    p.mprotect(Gva(buf), PAGE, Prot::READ_WRITE).unwrap();
    assert_eq!(io_read(&io, buf, 8).unwrap(), b"new page");
    // Unbinding the process (CD cleared, CMD_CFGI_CD, CMD_TLBI_NH_ASID) ends it: C_BAD_CD.
    vm.guest().unbind(SID, ssid).unwrap();
    assert!(io_read(&io, buf, 8).is_err());
    let events = vm.events();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.event_type, e.ssid))
            .collect::<Vec<_>>(),
        [(EventType::BadCd, Some(ssid))]
    );
}

#[test]
fn aborting_streams_and_substream_ids_beyond_s1cdmax_are_refused() {
    let vm = Vm::new();
    let p = vm.process();
    let buf = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    p.write(Gva(buf), b"process!").unwrap();
    let ssid = vm.guest().bind(SID, &p).unwrap();
    // Without a SubstreamID stage 1 is bypassed (S1DSS): the address is a GPA.
    let gpa = p.translate(Gva(buf)).unwrap().0;
    let plain = vm.io(None);
    assert_eq!(io_read(&plain, gpa, 8).unwrap(), b"process!");
    // A SubstreamID beyond the CD table (S1CDMax = SSID_BITS): C_BAD_SUBSTREAMID.
    let beyond = 1 << vsva_guest::smmu::SSID_BITS;
    assert!(io_read(&vm.io(Some(beyond)), buf, 8).is_err());
    let events = vm.events();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.event_type, e.sid, e.ssid))
            .collect::<Vec<_>>(),
        [(EventType::BadSubstreamId, SID, Some(beyond))]
    );
    // Detached: the guest's STE aborts (CMD_CFGI_STE removes what the spaces held), with
    // no event, whatever the SubstreamID.
    let io = vm.io(Some(ssid));
    assert!(io_read(&io, buf, 8).is_ok());
    vm.guest().unbind(SID, ssid).unwrap();
    vm.guest().detach_device(SID).unwrap();
    assert!(io_read(&io, buf, 8).is_err());
    assert!(io_read(&plain, gpa, 8).is_err());
    assert_eq!(vm.events(), [], "an aborting STE records nothing");
    // A stream the guest never attached has an STE that aborts too.
    let stranger: IoMem = IommuMemory::new(
        (*vm.ram).clone(),
        vm.vsmmu.address_space(SID + 1, None, false),
        true,
        (),
    );
    assert!(io_read(&stranger, gpa, 8).is_err());
}

#[test]
fn two_address_spaces_never_see_each_others_entries() {
    let vm = Vm::new();
    let (p, q) = (vm.process(), vm.process());
    // Both processes map their buffer at the same virtual address.
    let a = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let b = q.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    assert_eq!(a, b);
    p.write(Gva(a), b"process p").unwrap();
    q.write(Gva(b), b"process q").unwrap();
    let sp = vm.guest().bind(SID, &p).unwrap();
    let sq = vm.guest().bind(SID, &q).unwrap();
    let bonds = vm.guest().bonds(SID);
    assert_ne!(bonds[0].1, bonds[1].1, "two ASIDs");
    let (iop, ioq) = (vm.io(Some(sp)), vm.io(Some(sq)));
    assert_eq!(io_read(&iop, a, 9).unwrap(), b"process p");
    assert_eq!(io_read(&ioq, a, 9).unwrap(), b"process q");
    // p's page goes stale; q's munmap invalidates the same address under q's ASID, which
    // leaves p's entry where it is.
    let spare = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    p.write(Gva(spare), b"p's spare").unwrap();
    retarget(&p, &vm.ram, a, p.translate(Gva(spare)).unwrap().0);
    q.munmap(Gva(b), PAGE).unwrap();
    assert_eq!(io_read(&iop, a, 9).unwrap(), b"process p");
    assert!(io_read(&ioq, a, 9).is_err());
    let events = vm.events();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.event_type, e.ssid, e.input_addr))
            .collect::<Vec<_>>(),
        [(EventType::Translation, Some(sq), a)]
    );
    // p's own invalidation of the address takes it.
    p.mprotect(Gva(a), PAGE, Prot::READ_WRITE).unwrap();
    assert_eq!(io_read(&iop, a, 9).unwrap(), b"p's spare");
}

/// Guest RAM layout of the property test: the stream table, the CD, the stage-1 tables'
/// frames, and the pages they map.
const STRTAB: u64 = 0x10_0000;
const CD: u64 = 0x11_0000;
const TABLES: u64 = 0x20_0000;
const DATA: u64 = 0x100_0000;

/// A vSMMU programmed by hand (no command queue needed: nothing is invalidated) whose
/// StreamID 0 translates with the stage-1 table at `root` through one CD with ASID 5.
fn hand_programmed(ram: &Arc<GuestMemoryMmap>, root: u64) -> Arc<VSmmu> {
    let vsmmu = VSmmu::new(ram.clone(), VSmmuConfig::default()).unwrap();
    let cd = ContextDescriptor::new(root, 16, 5);
    for (i, w) in cd.encode().iter().enumerate() {
        ram.write_u64(CD + 8 * i as u64, *w).unwrap();
    }
    let ste = Ste {
        s1_context_ptr: CD,
        s1fmt: S1Fmt::Linear,
        s1cdmax: 0,
        s1dss: S1Dss::Terminate,
        ..Ste::new(Config::S1Trans)
    };
    for (i, w) in ste.encode().iter().enumerate() {
        ram.write_u64(STRTAB + 8 * i as u64, *w).unwrap();
    }
    vsmmu.write(offset::STRTAB_BASE, 8, STRTAB).unwrap();
    vsmmu.write(offset::STRTAB_BASE_CFG, 4, 1).unwrap();
    vsmmu.write(offset::CR0, 4, cr0::SMMUEN as u64).unwrap();
    vsmmu
}

/// Where the hand-programmed event queue (2^4 records) lives.
const EVENTQ: u64 = 0x12_0000;

/// The events the vSMMU wrote to the hand-programmed event queue.
fn queued_events(vsmmu: &VSmmu, ram: &GuestMemoryMmap) -> Vec<Event> {
    let prod = vsmmu.read(offset::EVENTQ_PROD, 4).unwrap() & 0xf;
    (0..prod)
        .map(|i| {
            let at = EVENTQ + 32 * i;
            let raw: [u64; 4] = std::array::from_fn(|w| ram.read_u64(at + 8 * w as u64).unwrap());
            Event::decode(raw).unwrap()
        })
        .collect()
}

#[test]
fn a_two_level_cd_table_and_each_fault_class() {
    const VA: u64 = 0x40_0000_0000;
    let ram = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap());
    let mut next = TABLES;
    let mut alloc = || {
        let f = next;
        next += PAGE;
        Some(f)
    };
    // One stage-1 table per CD, mapping VA with `attrs` to `pa`, the CD written at `slot`.
    let mut cd_at =
        |slot: u64, asid: u16, pa: u64, attrs: u64, edit: &dyn Fn(&mut ContextDescriptor)| {
            let root = alloc().unwrap();
            let mut cd = ContextDescriptor::new(root, 16, asid);
            edit(&mut cd);
            let cfg = ContextDescriptor::new(root, 16, asid)
                .s1_config(&Features::VSVA)
                .unwrap();
            TableBuilder::stage1(&cfg)
                .map(&*ram, &mut alloc, VA, pa, PageSize::Size4K, attrs)
                .unwrap();
            for (i, w) in cd.encode().iter().enumerate() {
                ram.write_u64(slot + 8 * i as u64, *w).unwrap();
            }
        };
    // L1CD 0 and 2 point to leaf tables of 64 CDs; L1CD 1 and 3 are invalid.
    let (leaf0, leaf2) = (CD + 0x1000, CD + 0x2000);
    ram.write_u64(CD, L1Cd::new(leaf0).0).unwrap();
    ram.write_u64(CD + 16, L1Cd::new(leaf2).0).unwrap();
    let rw = D::AF | D::NG | D::AP_EL0;
    cd_at(leaf0, 1, DATA, rw, &|_| {});
    cd_at(leaf2 + 64, 2, DATA + PAGE, rw, &|_| {});
    // SubstreamID 0x82: a 32-bit output size and a page above it.
    cd_at(leaf2 + 2 * 64, 3, 1 << 32, rw, &|cd| {
        cd.ips = AddressSize::Bits32
    });
    // 0x83: a leaf without AF, and no hardware AF update.
    cd_at(leaf2 + 3 * 64, 4, DATA, D::NG | D::AP_EL0, &|_| {});
    // 0x84: a T0SZ no granule allows.
    cd_at(leaf2 + 4 * 64, 5, DATA, rw, &|cd| cd.t0sz = 8);
    ram.write(DATA, b"CD 0 page").unwrap();
    ram.write(DATA + PAGE, b"0x81 page").unwrap();
    let ste = Ste {
        s1_context_ptr: CD,
        s1fmt: S1Fmt::TwoLevel4K,
        s1cdmax: 8,
        s1dss: S1Dss::Substream0,
        ..Ste::new(Config::S1Trans)
    };
    for (i, w) in ste.encode().iter().enumerate() {
        ram.write_u64(STRTAB + 8 * i as u64, *w).unwrap();
    }
    let vsmmu = VSmmu::new(ram.clone(), VSmmuConfig::default()).unwrap();
    vsmmu.write(offset::STRTAB_BASE, 8, STRTAB).unwrap();
    vsmmu.write(offset::STRTAB_BASE_CFG, 4, 1).unwrap();
    vsmmu.write(offset::EVENTQ_BASE, 8, EVENTQ | 4).unwrap();
    vsmmu
        .write(offset::CR0, 4, (cr0::SMMUEN | cr0::EVENTQEN) as u64)
        .unwrap();
    let io = |ssid| -> IoMem {
        IommuMemory::new(
            (*ram).clone(),
            vsmmu.address_space(0, ssid, false),
            true,
            (),
        )
    };
    // Without SubstreamID: CD 0 (S1DSS substream 0); SubstreamID 0x81 through L1CD 2.
    assert_eq!(io_read(&io(None), VA, 9).unwrap(), b"CD 0 page");
    assert_eq!(io_read(&io(Some(0x81)), VA, 9).unwrap(), b"0x81 page");
    assert_eq!(queued_events(&vsmmu, &ram), []);
    for ssid in [0x82, 0x83, 0x84, 0x45, 0x100] {
        assert!(io_read(&io(Some(ssid)), VA + 0x10, 4).is_err(), "{ssid:#x}");
    }
    assert_eq!(
        queued_events(&vsmmu, &ram)
            .iter()
            .map(|e| (e.event_type, e.ssid, e.input_addr))
            .collect::<Vec<_>>(),
        [
            (EventType::AddrSize, Some(0x82), VA + 0x10),
            (EventType::Access, Some(0x83), VA + 0x10),
            (EventType::BadCd, Some(0x84), 0),
            // L1CD 1 is invalid; 0x100 is beyond S1CDMax.
            (EventType::BadSubstreamId, Some(0x45), 0),
            (EventType::BadSubstreamId, Some(0x100), 0),
        ]
    );
}

/// 32 MiB of guest RAM, the stage-1 configuration of [`hand_programmed`]'s CD for a table
/// at `TABLES`, a builder for that table, and the frames after it for the builder's tables.
fn stage1_tables() -> (
    Arc<GuestMemoryMmap>,
    S1Config,
    TableBuilder,
    impl FnMut() -> Option<u64>,
) {
    let ram = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap());
    let cfg: S1Config = ContextDescriptor::new(TABLES, 16, 5)
        .s1_config(&Features::VSVA)
        .unwrap();
    let builder = TableBuilder::stage1(&cfg);
    let mut next = TABLES + PAGE;
    let alloc = move || {
        let f = next;
        next += PAGE;
        Some(f)
    };
    (ram, cfg, builder, alloc)
}

/// One random leaf: index of a 2 MiB slot, whether it is a block, attribute bits.
fn leaf() -> impl Strategy<Value = (u64, bool, u64)> {
    let attr = prop::sample::select(vec![D::AF, D::AP_EL0, D::AP_RO, D::NG, D::PXN, D::UXN]);
    (0u64..8, any::<bool>(), prop::collection::vec(attr, 0..6))
        .prop_map(|(slot, block, attrs)| (slot, block, attrs.into_iter().fold(0, |a, b| a | b)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// For random guest mappings (pages and 2 MiB blocks with random AF, AP[2:1], nG,
    /// PXN/UXN), every probe (address, read or write, privileged or not) translates
    /// through the vSMMU's vm-memory `Iommu` to what the smmuv3 stage-1 walker gives, and
    /// faults where the walker faults.
    #[test]
    fn the_iommu_translates_as_the_stage1_walker(
        leaves in prop::collection::vec(leaf(), 1..6),
        probes in prop::collection::vec(
            (0u64..8, 0u64..(2 << 20), any::<bool>(), any::<bool>()), 1..24),
    ) {
        const VA: u64 = 0x40_0000_0000;
        let (ram, cfg, mut builder, mut alloc) = stage1_tables();
        for (i, &(slot, block, attrs)) in leaves.iter().enumerate() {
            let va = VA + slot * (2 << 20);
            let (size, pa) = if block {
                (PageSize::Size2M, DATA)
            } else {
                (PageSize::Size4K, DATA + i as u64 * PAGE)
            };
            // A slot already used keeps its first leaf.
            let _ = builder.map(&*ram, &mut alloc, va, pa, size, attrs);
        }
        let vsmmu = hand_programmed(&ram, TABLES);
        let spaces = [
            vsmmu.address_space(0, None, false),
            vsmmu.address_space(0, None, true),
        ];
        for &(slot, off, write, privileged) in &probes {
            let va = VA + slot * (2 << 20) + off;
            let access = AccessRequest { write, instruction: false, privileged };
            let want = walk_stage1(&*ram, &cfg, va, access, &mut ())
                .map(|t| t.output)
                .map_err(|f| f.kind);
            let perms = if write { Permissions::Write } else { Permissions::Read };
            let got = spaces[privileged as usize]
                .translate(GuestAddress(va), 1, perms)
                .map(|mut it| it.next().unwrap().base.0);
            prop_assert_eq!(got.is_ok(), want.is_ok(), "{:#x} {:?}", va, access);
            if let (Ok(g), Ok(w)) = (&got, &want) {
                prop_assert_eq!(g, w);
            }
            let direct = vsmmu
                .translate(0, None, va, access)
                .map(|t| t.translation.output)
                .map_err(|f| f.event.map(|e| e.event_type));
            match (&direct, &want) {
                (Ok(d), Ok(w)) => prop_assert_eq!(d, w),
                (Err(Some(d)), Err(w)) => prop_assert_eq!(d.raw(), w.raw()),
                _ => prop_assert!(false, "{:?} vs {:?}", direct, want),
            }
        }
    }
}

/// One random page of a run: whether it is mapped, whether its frame follows the previous
/// page's, and its attribute bits (mostly AF and AP_EL0, sometimes AP_RO or nG).
fn run_page() -> impl Strategy<Value = (bool, bool, u64)> {
    let bit = |b: u64, p: f64| prop::bool::weighted(p).prop_map(move |on| if on { b } else { 0 });
    (
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.8),
        (
            bit(D::AF, 0.95),
            bit(D::AP_EL0, 0.95),
            bit(D::AP_RO, 0.3),
            bit(D::NG, 0.15),
        ),
    )
        .prop_map(|(mapped, follows, (a, b, c, d))| (mapped, follows, a | b | c | d))
}

/// Pages of the run test, across the boundary of two leaf tables.
const RUN_PAGES: u64 = 48;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For random 4 KiB mappings of pages across a leaf-table boundary (mapped or not, to
    /// the frame after the previous page's or not, with random AF, AP[2:1] and nG),
    /// multi-page accesses through the vSMMU's vm-memory `Iommu` (filled a run per walk)
    /// translate every page to what the stage-1 walker gives that page alone, and fail
    /// exactly when one of their pages faults; afterwards so does every page on its own,
    /// from the runs cached.
    #[test]
    fn runs_give_each_page_its_own_translation(
        pages in prop::collection::vec(run_page(), RUN_PAGES as usize),
        accesses in prop::collection::vec((0..RUN_PAGES, 1..=16u64, any::<bool>()), 1..12),
    ) {
        // 24 pages below a 2 MiB boundary and 24 above it.
        const VA: u64 = 0x40_0000_0000 + (2 << 20) - 24 * PAGE;
        let (ram, cfg, mut builder, mut alloc) = stage1_tables();
        let mut frame = DATA;
        for (i, &(mapped, follows, attrs)) in pages.iter().enumerate() {
            // A page that does not follow leaves a frame's gap after the previous one.
            frame += if follows { PAGE } else { 2 * PAGE };
            if mapped {
                let va = VA + i as u64 * PAGE;
                builder.map(&*ram, &mut alloc, va, frame, PageSize::Size4K, attrs).unwrap();
            }
        }
        let vsmmu = hand_programmed(&ram, TABLES);
        let space = vsmmu.address_space(0, None, false);
        // What the walker gives each page of `first..first + count` alone.
        let walker = |first: u64, count: u64, write: bool| -> Vec<Option<u64>> {
            let access = AccessRequest { write, instruction: false, privileged: false };
            (first..first + count)
                .map(|i| walk_stage1(&*ram, &cfg, VA + i * PAGE, access, &mut ()).ok().map(|t| t.output))
                .collect()
        };
        // The output of each page of what `translate` answered, page by page.
        let through = |first: u64, count: u64, write: bool| -> Option<Vec<u64>> {
            let perms = if write { Permissions::Write } else { Permissions::Read };
            let ranges = space
                .translate(GuestAddress(VA + first * PAGE), (count * PAGE) as usize, perms)
                .ok()?;
            let mut outputs = Vec::new();
            for r in ranges {
                assert_eq!(r.length as u64 % PAGE, 0);
                outputs.extend((0..r.length as u64 / PAGE).map(|p| r.base.0 + p * PAGE));
            }
            Some(outputs)
        };
        for &(first, count, write) in &accesses {
            let count = count.min(RUN_PAGES - first);
            let got = through(first, count, write);
            let want = walker(first, count, write);
            match got {
                Some(got) => {
                    let want: Vec<u64> = want.iter().map(|w| w.unwrap_or(u64::MAX)).collect();
                    prop_assert_eq!(got, want, "access of {} pages at {}", count, first);
                }
                None => prop_assert!(want.contains(&None), "{} pages at {} refused", count, first),
            }
        }
        for i in 0..RUN_PAGES {
            prop_assert_eq!(through(i, 1, false), walker(i, 1, false).into_iter().collect::<Option<Vec<_>>>(), "page {}", i);
        }
    }
}
