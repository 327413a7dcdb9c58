//! Adversarial isolation tests of the host layer on the real VT-d driver ([`VtdDomain`] on
//! [`HostIommu`]) and the physical IOMMU model, with PASID-capable DMA engines as the
//! passthrough devices (issue 3, "Isolation").
//!
//! - whatever a guest writes into its RAM as page tables, its device reaches only host
//!   memory inside its own `MAP_DMA` ranges, writes only where those ranges are writable,
//!   and nothing else in host memory changes;
//! - a VM using another VM's PASID gets EPERM/EINVAL and changes nothing, in the
//!   containers, the driver or the hardware's caches;
//! - arbitrary ioctl bytes never panic, and a failed ioctl changes nothing;
//! - closing a container leaves no table frame, cache entry, domain id or route behind.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vsva_mem::PhysMem;

use proptest::prelude::*;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::{HostIommu, VtdDomain, RID_PASID};
use vsva_host::{
    container::Container, container::ContainerState, container::SharedPasidAllocator,
    pasid::PasidAllocator, pasid::DEFAULT_QUOTA,
};
use vsva_hw::dma::regs::{
    CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRIV_EN, CTRL_PRI_EN, REG_SWERR0, SWERR_OVERFLOW, SWERR_VALID,
};
use vsva_hw::dma::{
    AtsCompletion, CompletionRequest, Descriptor, DmaAccess, DmaEngine, DmaEngineConfig, DmaFault,
    DmaPort, DmaTranslation, Operation, PageRequestMessage,
};
use vsva_hw::drain::RequestDrain;
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_uapi::iommu::*;
use vsva_uapi::vfio::*;
use vsva_uapi::{file::IommuModel, file::VfioIoctls, request::FaultEvent};
use vsva_uapi::{
    request::BindGpasid, request::CacheInvalidate, request::DmaMap, request::InvGranularity,
    request::PageResponse, request::PageResponseCode,
};
use vsva_vtd::{
    addr::Gpa, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId, builder::FrameSource,
    builder::MapFlags, builder::PageTableBuilder, builder::TableFormat, fault::FaultReason,
    flpte::FlPagingMode, pasid::PasidEntry, walk::AccessRequest, walk::PageSize, walk::Stage,
};

const PAGE: u64 = 4096;
const HOST_MEMORY: u64 = 16 << 20;
const SID_A: SourceId = SourceId::from_rid(0x18);
const SID_B: SourceId = SourceId::from_rid(0x20);
const ENGINE_FEATURES: u64 = CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRIV_EN | CTRL_PRI_EN;

/// One host: memory, the IOMMU model, the host driver of it, the PASID allocator.
struct Host {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Iommu>,
    unit: Arc<HostIommu>,
    pasids: SharedPasidAllocator,
}

impl Host {
    fn new() -> Host {
        let mem = HostMemory::new(HOST_MEMORY).unwrap();
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let hw = Iommu::new(mem.clone(), IommuConfig::default()).unwrap();
        let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
        Host {
            mem,
            frames,
            hw,
            unit,
            pasids: Arc::new(Mutex::new(PasidAllocator::new())),
        }
    }

    /// `size` bytes of guest RAM at GPA 0, mapped into this process as a VMM maps it.
    fn ram(&self, size: u64) -> Ram {
        let hpa = self.frames.alloc_range(size, 2 << 20).unwrap();
        let mem = self.mem.guest_memory(&[(Gpa(0), hpa, size)]).unwrap();
        let vaddr = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        Ram {
            host: self.mem.clone(),
            mem,
            hpa: hpa.0,
            size,
            vaddr,
        }
    }

    /// A DMA engine at `sid` behind the IOMMU, every access it makes recorded.
    fn device(&self, sid: SourceId) -> Device {
        let port = Arc::new(Recorder {
            hw: self.hw.clone(),
            log: Mutex::default(),
        });
        let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(sid), port.clone()).unwrap());
        self.hw.attach_endpoint(engine.clone());
        engine.enable(ENGINE_FEATURES).unwrap();
        Device { engine, port }
    }

    /// A nesting container on a fresh domain of the unit, with `sid` attached.
    fn container(&self, sid: SourceId) -> Container<VtdDomain> {
        let domain = VtdDomain::new(&self.unit).unwrap();
        let mut c = Container::new(self.pasids.clone(), DEFAULT_QUOTA, domain).unwrap();
        c.set_iommu(IommuModel::Type1Nesting).unwrap();
        c.attach_device(sid).unwrap();
        c
    }

    /// A digest of each page of host memory, as it is now. A change of any one word
    /// changes its page's digest (each step of the fold is a bijection).
    fn snapshot(&self) -> Vec<u64> {
        let mut page = [0u8; PAGE as usize];
        (0..self.mem.size() / PAGE)
            .map(|i| {
                self.mem.read(i * PAGE, &mut page).unwrap();
                page.chunks_exact(8).fold(i, |h, w| {
                    let w = u64::from_le_bytes(w.try_into().unwrap());
                    (h.rotate_left(5) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                })
            })
            .collect()
    }
}

/// Guest RAM: host memory from `hpa`, at GPA 0 for the guest and at `vaddr` for the VMM.
struct Ram {
    host: Arc<HostMemory>,
    mem: GuestMemoryMmap,
    hpa: u64,
    size: u64,
    vaddr: u64,
}

impl Drop for Ram {
    fn drop(&mut self) {
        self.host.release_guest_memory(&self.mem);
    }
}

impl Ram {
    fn map(&self, iova: u64, gpa: u64, size: u64, write: bool) -> DmaMap {
        DmaMap {
            iova: Iova(iova),
            vaddr: self.vaddr + gpa,
            size,
            read: true,
            write,
        }
    }

    /// Guest page-table frames from `[start, end)` of the guest's RAM.
    fn frames(start: u64, end: u64) -> GuestFrames {
        GuestFrames { next: start, end }
    }
}

/// Guest frames handed out from a range of guest RAM.
struct GuestFrames {
    next: u64,
    end: u64,
}

impl FrameSource for GuestFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        (self.next < self.end).then(|| {
            self.next += PAGE;
            self.next - PAGE
        })
    }

    fn free_table(&mut self, _frame: u64) {}
}

/// A guest process address space: first-level tables in the guest's RAM mapping each
/// `(gva, gpa)` page read/write for user mode.
fn guest_tables(ram: &Ram, mode: FlPagingMode, frames: (u64, u64), pages: &[(u64, u64)]) -> Gpa {
    let mut f = Ram::frames(frames.0, frames.1);
    let mut t = PageTableBuilder::new(TableFormat::FirstLevel(mode), &ram.mem, &mut f).unwrap();
    for &(gva, gpa) in pages {
        let flags = MapFlags::READ | MapFlags::WRITE | MapFlags::USER;
        t.map(&ram.mem, &mut f, gva, gpa, PageSize::Size4K, flags)
            .unwrap();
    }
    Gpa(t.root())
}

fn bind(hpasid: Pasid, gpgd: Gpa, addr_width: u32, vtd_flags: u64) -> BindGpasid {
    BindGpasid {
        hpasid,
        gpasid: Some(hpasid),
        gpgd,
        addr_width,
        vtd_flags,
        pat: 0,
        emt: 0,
    }
}

/// What a device did with host memory.
#[derive(Clone, Copy, Debug)]
struct Touch {
    hpa: u64,
    len: u64,
    write: bool,
    how: &'static str,
}

/// The device's port to the IOMMU, recording every host page the IOMMU hands out and every
/// translated access.
struct Recorder {
    hw: Arc<Iommu>,
    log: Mutex<Vec<Touch>>,
}

impl Recorder {
    fn record(&self, t: Touch) {
        self.log.lock().unwrap().push(t);
    }

    fn take(&self) -> Vec<Touch> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl DmaPort for Recorder {
    fn remap(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<DmaTranslation, DmaFault> {
        let t = DmaPort::remap(&*self.hw, sid, pasid, addr, access)?;
        self.record(Touch {
            hpa: t.hpa().0,
            len: t.size(),
            write: access.write,
            how: "untranslated request",
        });
        Ok(t)
    }

    fn ats_translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<AtsCompletion, DmaFault> {
        let c = self.hw.ats_translate(sid, pasid, addr, access)?;
        self.record(Touch {
            hpa: c.page.hpa().0,
            len: c.page.size(),
            write: c.perm.write,
            how: "ATS completion",
        });
        Ok(c)
    }

    fn check_translated(
        &self,
        sid: SourceId,
        hpa: Hpa,
        len: u64,
        access: DmaAccess,
    ) -> Result<(), DmaFault> {
        self.hw.check_translated(sid, hpa, len, access)?;
        self.record(Touch {
            hpa: hpa.0,
            len,
            write: access.write,
            how: "translated request",
        });
        Ok(())
    }

    fn page_request(&self, req: PageRequestMessage) {
        self.hw.page_request(req);
    }

    fn memory(&self) -> &HostMemory {
        self.hw.memory()
    }

    fn request_drain(&self) -> &RequestDrain {
        self.hw.request_drain()
    }
}

/// A passthrough DMA engine.
struct Device {
    engine: Arc<DmaEngine>,
    port: Arc<Recorder>,
}

impl Device {
    /// Runs one descriptor to its end (or until it waits for a page response) and clears
    /// any software error it left.
    fn run(&self, pasid: Option<Pasid>, privileged: bool, block: bool, op: Operation) {
        let desc = Descriptor {
            pasid,
            privileged,
            block_on_fault: block,
            completion: CompletionRequest::None,
            op,
        };
        self.engine.portal_write(0, &desc.encode()).unwrap();
        self.engine.process();
        self.engine
            .mmio_write(REG_SWERR0, SWERR_VALID | SWERR_OVERFLOW)
            .unwrap();
    }
}

/// The host pages a VM's device may reach: every page of its `MAP_DMA` ranges, writable
/// when one of the ranges holding it is.
struct Reach(BTreeMap<u64, bool>);

impl Reach {
    fn of(host: &Host, state: &ContainerState) -> Reach {
        let mut pages = BTreeMap::new();
        for m in &state.dma {
            let hpa = host.mem.resolve_user(m.vaddr, m.size).unwrap().0;
            for p in (hpa..hpa + m.size).step_by(PAGE as usize) {
                *pages.entry(p).or_insert(false) |= m.write;
            }
        }
        Reach(pages)
    }

    fn allows(&self, hpa: u64, len: u64, write: bool) -> bool {
        let Some(last) = hpa.checked_add(len.max(1) - 1) else {
            return false;
        };
        (hpa / PAGE..=last / PAGE).all(|p| {
            self.0
                .get(&(p * PAGE))
                .is_some_and(|&writable| writable || !write)
        })
    }
}

/// The pages of host memory that differ between two snapshots.
fn changed_pages(before: &[u64], after: &[u64]) -> Vec<u64> {
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .map(|(i, _)| i as u64 * PAGE)
        .collect()
}

// ----- (a) Random guest tables, random DMA -----

/// Guest RAM of the VM under attack: four 2 MiB blocks.
const RAM_A: u64 = 8 << 20;
const RAM_A_PAGES: u64 = RAM_A / PAGE;
/// A 256 KiB chunk of the guest's RAM may also be mapped at this IOVA (an alias).
const ALIAS_IOVA: u64 = 1 << 30;
const CHUNK: u64 = 256 << 10;
const PS: u64 = 1 << 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Perm {
    Unmapped,
    Read,
    ReadWrite,
}

fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![1 => Just(Perm::Unmapped), 1 => Just(Perm::Read), 4 => Just(Perm::ReadWrite)]
}

/// How the VMM maps one 2 MiB block of guest RAM at its GPA.
#[derive(Clone, Debug)]
enum Block {
    /// One mapping (2 MiB second-level pages).
    Whole(Perm),
    /// Eight 256 KiB mappings.
    Split(Vec<Perm>),
}

fn block() -> impl Strategy<Value = Block> {
    prop_oneof![
        perm().prop_map(Block::Whole),
        proptest::collection::vec(perm(), 8).prop_map(Block::Split),
    ]
}

/// A guest physical address a guest entry points to.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// A page of the guest's RAM that the VMM mapped (so that walks get somewhere).
    Mapped(u64),
    /// Any page of the guest's RAM.
    Ram(u64),
    /// A page of the alias range.
    Alias(u64),
    /// Any address: beyond RAM, beyond the second level, beyond the address width.
    Outside(u64),
}

impl Target {
    /// The address, given the GPAs of the guest's mapped pages.
    fn gpa(self, mapped: &[u64]) -> u64 {
        match self {
            Target::Mapped(_) if mapped.is_empty() => 0,
            Target::Mapped(p) => mapped[(p % mapped.len() as u64) as usize],
            Target::Ram(p) => (p % RAM_A_PAGES) * PAGE,
            Target::Alias(p) => ALIAS_IOVA + (p % (CHUNK / PAGE)) * PAGE,
            Target::Outside(a) => a & 0x000f_ffff_ffff_f000,
        }
    }
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        16 => any::<u64>().prop_map(Target::Mapped),
        2 => any::<u64>().prop_map(Target::Ram),
        1 => any::<u64>().prop_map(Target::Alias),
        1 => prop_oneof![
            Just(RAM_A),
            Just(ALIAS_IOVA + CHUNK),
            Just((1 << 39) - PAGE),
            Just((1 << 48) - PAGE),
            Just(1 << 51),
            any::<u64>(),
        ]
        .prop_map(Target::Outside),
    ]
}

/// The attribute bits of a guest entry.
#[derive(Clone, Copy, Debug)]
enum Flags {
    /// What a guest OS writes for a process: P, and RW, US, A, D and XD as it likes.
    Sane {
        write: bool,
        user: bool,
        accessed: bool,
        dirty: bool,
        xd: bool,
    },
    /// Any low twelve bits (PS included, P usually set), and sometimes random high bits
    /// (ignored, protection-key and reserved ones).
    Any(u64),
}

impl Flags {
    fn bits(self) -> u64 {
        match self {
            Flags::Sane {
                write,
                user,
                accessed,
                dirty,
                xd,
            } => {
                1 | u64::from(write) << 1
                    | u64::from(user) << 2
                    | u64::from(accessed) << 5
                    | u64::from(dirty) << 6
                    | u64::from(xd) << 63
            }
            Flags::Any(bits) => bits,
        }
    }
}

fn flags() -> impl Strategy<Value = Flags> {
    let b = |p| proptest::bool::weighted(p);
    prop_oneof![
        9 => (b(0.8), b(0.9), b(0.9), b(0.5), b(0.1)).prop_map(
            |(write, user, accessed, dirty, xd)| Flags::Sane { write, user, accessed, dirty, xd }
        ),
        1 => (any::<u16>(), b(0.9), proptest::option::weighted(0.3, any::<u64>())).prop_map(
            |(low, present, high)| {
                let low = u64::from(low & 0xfff) & !1 | u64::from(present);
                Flags::Any(low | high.map_or(0, |h| h & 0xfff0_0000_0000_0000))
            }
        ),
    ]
}

/// The entries a guest writes for one address of one of its address spaces, from the top
/// level down to a leaf.
#[derive(Clone, Debug)]
struct GuestPath {
    space: usize,
    gva: u64,
    canonical: bool,
    /// The level of the leaf: 1 (a 4 KiB page), 2 (a 2 MiB page) or 3 (a 1 GiB page).
    leaf: u8,
    /// Whether a large leaf's address is aligned to its page (else reserved bits are set).
    aligned: bool,
    /// Per level from the top: where the entry points and its attributes.
    entries: Vec<(Target, Flags)>,
    /// One entry replaced by any 64 bits: its level counted from the top, and the value.
    garbage: Option<(usize, u64)>,
}

fn guest_path() -> impl Strategy<Value = GuestPath> {
    (
        0usize..2,
        any::<u64>(),
        proptest::bool::weighted(0.9),
        prop_oneof![7 => Just(1u8), 2 => Just(2u8), 1 => Just(3u8)],
        proptest::bool::weighted(0.8),
        proptest::collection::vec((target(), flags()), 5),
        proptest::option::weighted(0.05, (0usize..5, any::<u64>())),
    )
        .prop_map(
            |(space, gva, canonical, leaf, aligned, entries, garbage)| GuestPath {
                space,
                gva,
                canonical,
                leaf,
                aligned,
                entries,
                garbage,
            },
        )
}

/// A guest page table bound to a PASID of the VM.
#[derive(Clone, Copy, Debug)]
struct GuestSpace {
    root: Target,
    five_level: bool,
    vtd_flags: u64,
}

fn guest_space() -> impl Strategy<Value = GuestSpace> {
    (
        target(),
        proptest::bool::weighted(0.3),
        prop_oneof![4 => Just(0u64), 4 => Just(IOMMU_SVA_VTD_GPASID_SRE), 1 => 0u64..0x40],
    )
        .prop_map(|(root, five_level, vtd_flags)| GuestSpace {
            root,
            five_level,
            vtd_flags,
        })
}

impl GuestSpace {
    fn levels(&self) -> u8 {
        if self.five_level {
            5
        } else {
            4
        }
    }

    /// `gva` made canonical for the space's paging mode.
    fn canonical(&self, gva: u64) -> u64 {
        let width = if self.five_level { 57 } else { 48 };
        let shift = 64 - width;
        (((gva << shift) as i64) >> shift) as u64
    }
}

/// A device address: one a guest path leads to (plus an offset into a 2 MiB page), or any.
#[derive(Clone, Copy, Debug)]
enum Addr {
    Path(usize, u32),
    Raw(u64),
}

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        9 => (any::<usize>(), prop_oneof![4 => 0u32..0x1000, 1 => 0u32..0x20_0000])
            .prop_map(|(i, off)| Addr::Path(i, off)),
        1 => any::<u64>().prop_map(Addr::Raw),
    ]
}

/// The address space a DMA goes to.
#[derive(Clone, Copy, Debug)]
enum Space {
    /// The bound PASID of the guest path its address comes from.
    Own,
    /// The PASID bound to one of the guest's spaces.
    Bound(usize),
    /// A PASID of the VM that nothing is bound to.
    Unbound,
    /// Requests without PASID: the address is an IOVA.
    NoPasid,
}

fn space() -> impl Strategy<Value = Space> {
    prop_oneof![
        8 => Just(Space::Own),
        1 => any::<usize>().prop_map(Space::Bound),
        1 => Just(Space::Unbound),
        2 => Just(Space::NoPasid),
    ]
}

/// A DMA of the VM's device.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// One translation of the IOMMU model, as an untranslated request is translated.
    Translate {
        space: Space,
        at: Addr,
        write: bool,
        execute: bool,
        supervisor: bool,
    },
    /// A DMA engine fill (writes), through ATS and the device TLB.
    Fill {
        space: Space,
        dst: Addr,
        size: u32,
        privileged: bool,
    },
    /// A DMA engine memmove (reads and writes).
    Memmove {
        space: Space,
        src: Addr,
        dst: Addr,
        size: u32,
        privileged: bool,
    },
}

fn probe() -> impl Strategy<Value = Probe> {
    let b = |p| proptest::bool::weighted(p);
    prop_oneof![
        4 => (space(), addr(), b(0.5), b(0.03), b(0.1))
            .prop_map(|(space, at, write, execute, supervisor)| Probe::Translate {
                space, at, write, execute, supervisor,
            }),
        2 => (space(), addr(), 1u32..12_288, b(0.2))
            .prop_map(|(space, dst, size, privileged)| Probe::Fill { space, dst, size, privileged }),
        1 => (space(), addr(), addr(), 1u32..12_288, b(0.2))
            .prop_map(|(space, src, dst, size, privileged)| Probe::Memmove {
                space, src, dst, size, privileged,
            }),
    ]
}

#[derive(Clone, Debug)]
struct Scenario {
    blocks: Vec<Block>,
    alias: Option<(u64, Perm)>,
    spaces: Vec<GuestSpace>,
    paths: Vec<GuestPath>,
    garbage: Vec<(u64, u64)>,
    probes: Vec<Probe>,
    unmap: Vec<usize>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        proptest::collection::vec(block(), 4),
        proptest::option::weighted(0.5, (0u64..(RAM_A / CHUNK), perm())),
        proptest::collection::vec(guest_space(), 1..=2),
        proptest::collection::vec(guest_path(), 0..24),
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..16),
        proptest::collection::vec(probe(), 1..40),
        proptest::collection::vec(any::<usize>(), 0..4),
    )
        .prop_map(
            |(blocks, alias, spaces, paths, garbage, probes, unmap)| Scenario {
                blocks,
                alias,
                spaces,
                paths,
                garbage,
                probes,
                unmap,
            },
        )
}

/// The level-`level` table index of `gva` (4 KiB pages, 9 bits a level).
fn index(gva: u64, level: u8) -> u64 {
    (gva >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff
}

/// The VM under attack, with its guest's tables written.
struct Attack<'h> {
    host: &'h Host,
    ram: Ram,
    dev: Device,
    c: Container<VtdDomain>,
    /// Per address space: the PASID it is bound to (or `None` when the bind was refused).
    spaces: Vec<(Pasid, bool)>,
    unbound: Pasid,
    gvas: Vec<(usize, u64)>,
}

impl<'h> Attack<'h> {
    fn new(host: &'h Host, s: &Scenario) -> Attack<'h> {
        let ram = host.ram(RAM_A);
        let dev = host.device(SID_A);
        let mut c = host.container(SID_A);
        let mut mapped = Vec::new();
        for (b, block) in s.blocks.iter().enumerate() {
            let base = b as u64 * (2 << 20);
            let ranges: Vec<(u64, u64, Perm)> = match block {
                Block::Whole(p) => vec![(base, 2 << 20, *p)],
                Block::Split(ps) => ps
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (base + i as u64 * CHUNK, CHUNK, *p))
                    .collect(),
            };
            for (gpa, size, p) in ranges {
                if p != Perm::Unmapped {
                    c.map_dma(&ram.map(gpa, gpa, size, p == Perm::ReadWrite))
                        .unwrap();
                    mapped.extend((gpa..gpa + size).step_by(PAGE as usize));
                }
            }
        }
        if let Some((chunk, p)) = s.alias {
            if p != Perm::Unmapped {
                let m = ram.map(ALIAS_IOVA, chunk * CHUNK, CHUNK, p == Perm::ReadWrite);
                c.map_dma(&m).unwrap();
            }
        }
        // The guest writes its tables (anywhere in its RAM), then garbage over them.
        let mut spaces = Vec::new();
        for space in &s.spaces {
            let pasid = c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
            let width = if space.five_level { 57 } else { 48 };
            let b = bind(pasid, Gpa(space.root.gpa(&mapped)), width, space.vtd_flags);
            spaces.push((pasid, c.bind_gpasid(&b).is_ok()));
        }
        let unbound = c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
        let mut gvas = Vec::new();
        for path in &s.paths {
            let space = &s.spaces[path.space % s.spaces.len()];
            let gva = if path.canonical {
                space.canonical(path.gva)
            } else {
                path.gva
            };
            gvas.push((path.space % s.spaces.len(), gva));
            write_path(&ram, &mapped, space, gva, path);
        }
        for &(at, value) in &s.garbage {
            ram.mem.write_u64((at % (RAM_A / 8)) * 8, value).unwrap();
        }
        Attack {
            host,
            ram,
            dev,
            c,
            spaces,
            unbound,
            gvas,
        }
    }

    /// The PASID and address of a DMA (`None`: a request without PASID).
    fn target(&self, space: Space, at: Addr) -> (Option<Pasid>, u64) {
        let path = match at {
            Addr::Path(i, off) if !self.gvas.is_empty() => {
                let (space, gva) = self.gvas[i % self.gvas.len()];
                Some((space, (gva & !0xfff).wrapping_add(u64::from(off))))
            }
            _ => None,
        };
        let addr = match (path, at) {
            (Some((_, gva)), _) => gva,
            (None, Addr::Raw(a)) => a,
            (None, Addr::Path(..)) => 0,
        };
        let bound = |i: usize| Some(self.spaces[i % self.spaces.len()].0);
        match space {
            Space::Own => (bound(path.map_or(0, |p| p.0)), addr),
            Space::Bound(i) => (bound(i), addr),
            Space::Unbound => (Some(self.unbound), addr),
            // Requests without PASID carry an IOVA (a GPA): keep most in or near the
            // guest's RAM and its alias.
            Space::NoPasid => match addr >> 62 {
                0 => (None, addr % (RAM_A + CHUNK)),
                1 => (None, ALIAS_IOVA + addr % (2 * CHUNK)),
                _ => (None, addr & ((ALIAS_IOVA << 1) - 1)),
            },
        }
    }

    /// Runs every probe, checking each host page the IOMMU hands out and each access the
    /// device makes against the VM's reach; then that no byte of host memory outside the
    /// writable reach changed.
    fn round(&self, probes: &[Probe]) -> Result<(), TestCaseError> {
        let reach = Reach::of(self.host, &self.c.state());
        let before = self.host.snapshot();
        let hw = &self.host.hw;
        for probe in probes {
            match *probe {
                Probe::Translate {
                    space,
                    at,
                    write,
                    execute,
                    supervisor,
                } => {
                    let (pasid, addr) = self.target(space, at);
                    let access = AccessRequest {
                        write,
                        execute,
                        supervisor,
                    };
                    if let Ok(m) = hw.translate(SID_A, pasid, addr, access) {
                        let size = 1u64 << m.page_shift;
                        prop_assert!(
                            reach.allows(m.page_base(), size, write || m.perms.write()),
                            "{:?} {:#x} {:?} reached {:#x}+{:#x} ({:?})",
                            pasid,
                            addr,
                            access,
                            m.page_base(),
                            size,
                            m.perms
                        );
                    }
                    if pasid.is_some() {
                        self.check_walk(pasid, addr, access, &reach)?;
                    }
                }
                Probe::Fill {
                    space,
                    dst,
                    size,
                    privileged,
                } => {
                    let (pasid, dst) = self.target(space, dst);
                    let op = Operation::Fill {
                        pattern: 0xd1d1_d1d1_d1d1_d1d1,
                        dst,
                        size,
                    };
                    self.dev.run(pasid, privileged, false, op);
                }
                Probe::Memmove {
                    space,
                    src,
                    dst,
                    size,
                    privileged,
                } => {
                    let (pasid, dst) = self.target(space, dst);
                    let src = self.target(space, src).1;
                    self.dev.run(
                        pasid,
                        privileged,
                        false,
                        Operation::Memmove { src, dst, size },
                    );
                }
            }
            for t in self.dev.port.take() {
                prop_assert!(
                    reach.allows(t.hpa, t.len, t.write),
                    "{probe:?}: {} reached {:#x}+{:#x} (write {})",
                    t.how,
                    t.hpa,
                    t.len,
                    t.write
                );
            }
        }
        // A cached translation may go stale when the guest's device rewrites the guest's own
        // tables (without the guest's invalidation, the IOTLB keeps serving it, as hardware
        // does); one the host failed to invalidate would lead outside the VM's reach.
        for st in self.host.hw.take_stale_translations() {
            let page = 1u64 << st.cached.page_shift;
            prop_assert!(
                reach.allows(st.cached.output, page, st.cached.perms.write()),
                "{st}"
            );
        }
        let after = self.host.snapshot();
        for page in changed_pages(&before, &after) {
            prop_assert!(
                reach.allows(page, PAGE, true),
                "host page {page:#x} changed outside the VM's writable reach"
            );
        }
        Ok(())
    }

    /// Every guest table entry the IOMMU reads for the request lies in the VM's reach;
    /// every second-level entry lies outside every VM's RAM (in the driver's tables).
    fn check_walk(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
        reach: &Reach,
    ) -> Result<(), TestCaseError> {
        let e = self.host.hw.explain(SID_A, pasid, addr, access);
        for s in &e.walk.steps {
            match s.stage {
                Stage::FirstLevel => prop_assert!(
                    reach.allows(s.entry_address, 8, false),
                    "guest entry read at {:#x}:\n{}",
                    s.entry_address,
                    e
                ),
                Stage::SecondLevel => prop_assert!(
                    !(self.ram.hpa..self.ram.hpa + self.ram.size).contains(&s.entry_address),
                    "second-level entry read from guest RAM at {:#x}",
                    s.entry_address
                ),
            }
        }
        Ok(())
    }
}

/// Writes a guest path: from the space's root down, each entry at the index of `gva`,
/// following table pointers while they stay in the guest's RAM (the only memory the guest
/// can write).
fn write_path(ram: &Ram, mapped: &[u64], space: &GuestSpace, gva: u64, path: &GuestPath) {
    let mut table = space.root.gpa(mapped);
    for (i, &(to, flags)) in path.entries.iter().enumerate() {
        let Some(level) = space.levels().checked_sub(i as u8).filter(|&l| l > 0) else {
            return;
        };
        if table >= ram.size {
            return;
        }
        let slot = table + 8 * index(gva, level);
        if let Some((_, value)) = path.garbage.filter(|g| g.0 == i) {
            ram.mem.write_u64(slot, value).unwrap();
            return;
        }
        if level == path.leaf {
            let (ps, page) = match level {
                1 => (0, PAGE),
                2 => (PS, 2 << 20),
                _ => (PS, 1 << 30),
            };
            let gpa = if path.aligned {
                to.gpa(mapped) & !(page - 1)
            } else {
                to.gpa(mapped)
            };
            ram.mem.write_u64(slot, gpa | flags.bits() | ps).unwrap();
            return;
        }
        let bits = match flags {
            Flags::Sane { .. } => flags.bits(),
            Flags::Any(b) => b & 0xfff0_0000_0000_0fff,
        };
        ram.mem.write_u64(slot, to.gpa(mapped) | bits).unwrap();
        table = to.gpa(mapped);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Issue 3: "whatever a guest writes into its own page tables, its device can reach
    /// only HPAs inside its own second-level mappings". A guest's random tables (pointers
    /// to anywhere, large pages aligned or not, garbage) and random DMA of its device (the
    /// IOMMU's translations, and a DMA engine through ATS) reach only pages of the VM's
    /// MAP_DMA ranges, write only writable ones, and change no other host byte: not
    /// another VM's RAM, not the driver's tables, not the guest's own unmapped or
    /// read-only RAM. The same holds after some ranges are unmapped.
    #[test]
    fn guest_tables_reach_only_the_vms_own_mappings(s in scenario()) {
        let host = Host::new();
        // VM B: a bound PASID over a tiny guest table in its own RAM, all RAM mapped.
        let ram_b = host.ram(2 << 20);
        // Its device, with 20-bit PASIDs, which the bind needs (F15).
        let _dev_b = host.device(SID_B);
        let mut b = host.container(SID_B);
        b.map_dma(&ram_b.map(0, 0, 2 << 20, true)).unwrap();
        let pb = b.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
        let root = guest_tables(&ram_b, FlPagingMode::FourLevel, (0, 0x10_0000), &[(0x40_0000, 0x10_0000)]);
        b.bind_gpasid(&bind(pb, root, 48, 0)).unwrap();
        ram_b.host.fill(Hpa(ram_b.hpa + 0x10_0000), 0xb5, 0x10_0000).unwrap();

        let mut a = Attack::new(&host, &s);
        // Strict mode checks every IOTLB hit against a fresh walk (see `Attack::round`).
        host.hw.set_strict(true);
        a.round(&s.probes)?;
        let dma = a.c.state().dma;
        for &i in &s.unmap {
            if let Some(m) = dma.get(i % dma.len().max(1)) {
                a.c.unmap_dma(m.iova, m.size).unwrap();
            }
        }
        a.round(&s.probes)?;
    }
}

// ----- (b) One VM using another VM's PASID -----

/// Everything a call could change: both containers, the allocator, the driver, the
/// hardware's caches and counters, the devices, and all of host memory.
#[derive(Debug, PartialEq)]
struct World {
    a: ContainerState,
    b: ContainerState,
    a_pending: Vec<FaultEvent>,
    b_pending: Vec<FaultEvent>,
    pasids_allocated: usize,
    frames: u64,
    iotlb: usize,
    cached: (usize, usize),
    descriptors: u64,
    domain_ids: usize,
    devices: usize,
    routes: usize,
    entries: Vec<Option<PasidEntry>>,
    engines: Vec<(usize, usize)>,
    memory: Vec<u64>,
}

/// Two VMs, each with a device, its RAM mapped, a bound PASID over a guest table, DMA done
/// (so the caches hold its translations) and, for VM A, a page request group waiting.
struct TwoVms {
    host: Host,
    ram_a: Ram,
    ram_b: Ram,
    dev_a: Device,
    dev_b: Device,
    a: Container<VtdDomain>,
    b: Container<VtdDomain>,
    pa: Pasid,
    pb: Pasid,
}

/// The GVA each VM's guest maps, the page it maps it to, and a GVA it leaves unmapped.
const GVA: u64 = 0x7f00_0000_0000;
const DATA_GPA: u64 = 0x10_0000;
const MISSING_GVA: u64 = 0x7f00_0010_0000;

impl TwoVms {
    fn new() -> TwoVms {
        let host = Host::new();
        let ram_a = host.ram(4 << 20);
        let ram_b = host.ram(2 << 20);
        let dev_a = host.device(SID_A);
        let dev_b = host.device(SID_B);
        let mut a = host.container(SID_A);
        let mut b = host.container(SID_B);
        let mut bound = Vec::new();
        for (c, ram) in [(&mut a, &ram_a), (&mut b, &ram_b)] {
            c.map_dma(&ram.map(0, 0, ram.size, true)).unwrap();
            let p = c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
            let pages = [(GVA, DATA_GPA), (GVA + PAGE, DATA_GPA + PAGE)];
            let root = guest_tables(ram, FlPagingMode::FourLevel, (0, DATA_GPA), &pages);
            c.bind_gpasid(&bind(p, root, 48, 0)).unwrap();
            bound.push(p);
        }
        let fill = |at| Operation::Fill {
            pattern: 0x1111,
            dst: at,
            size: 64,
        };
        dev_a.run(Some(bound[0]), false, false, fill(GVA));
        dev_b.run(Some(bound[1]), false, false, fill(GVA));
        dev_a.run(Some(bound[0]), false, true, fill(MISSING_GVA));
        for (sid, p) in [(SID_A, bound[0]), (SID_B, bound[1])] {
            host.hw
                .translate(sid, Some(p), GVA + PAGE, AccessRequest::READ)
                .unwrap();
        }
        TwoVms {
            host,
            ram_a,
            ram_b,
            dev_a,
            dev_b,
            a,
            b,
            pa: bound[0],
            pb: bound[1],
        }
    }

    fn world(&self) -> World {
        let (hw, unit) = (&self.host.hw, &self.host.unit);
        let engine = |d: &Device| (d.engine.devtlb_len(), d.engine.waiting_for_page_response());
        World {
            a: self.a.state(),
            b: self.b.state(),
            a_pending: self.a.pending_page_requests(),
            b_pending: self.b.pending_page_requests(),
            pasids_allocated: self.host.pasids.lock().unwrap().total_allocated(),
            frames: self.host.frames.allocated_bytes(),
            iotlb: hw.iotlb().len(),
            cached: hw.cached_entries(),
            descriptors: hw
                .stats()
                .descriptors
                .load(std::sync::atomic::Ordering::Relaxed),
            domain_ids: unit.domain_ids_in_use(),
            devices: unit.attached_devices(),
            routes: unit.page_request_routes(),
            entries: [
                (SID_A, self.pa),
                (SID_B, self.pb),
                (SID_A, RID_PASID),
                (SID_B, RID_PASID),
            ]
            .iter()
            .map(|&(sid, p)| unit.pasid_entry(sid, p))
            .collect(),
            engines: vec![engine(&self.dev_a), engine(&self.dev_b)],
            memory: self.host.snapshot(),
        }
    }

    /// VM A's translations the IOTLB holds.
    fn a_cached(&self) -> bool {
        let iotlb = self.host.hw.iotlb();
        iotlb.lookup(SID_A, self.pa, GVA).is_some()
            && iotlb.lookup(SID_A, self.pa, GVA + PAGE).is_some()
    }
}

#[test]
fn a_vm_cannot_touch_another_vms_pasid() {
    let mut t = TwoVms::new();
    let pa = t.pa;
    let pending = t.a.pending_page_requests();
    assert_eq!(pending.len(), 1, "VM A's page request waits for a response");
    assert!(t.a_cached(), "VM A's translations are cached");
    assert_eq!(t.dev_a.engine.waiting_for_page_response(), 1);
    let grpid = pending[0].request.grpid;

    let own_table = t.b.state().bound[0].gpgd;
    let invalidations = |p: Pasid| {
        // The combinations the uAPI accepts (`inv_type_granu_table`): PASID-selective IOTLB,
        // and IOTLB and device-TLB by address.
        let (iotlb, devtlb) = (IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_DEV_IOTLB);
        let mut v = vec![CacheInvalidate {
            cache: iotlb,
            granularity: InvGranularity::Pasid {
                pasid: Some(p),
                archid: None,
            },
        }];
        for cache in [iotlb, devtlb, iotlb | devtlb] {
            v.push(CacheInvalidate {
                cache,
                granularity: InvGranularity::Addr {
                    pasid: Some(p),
                    archid: None,
                    addr: GVA,
                    granule_size: PAGE,
                    nb_granules: 2,
                    leaf: true,
                },
            });
        }
        v
    };
    let unallocated = Pasid::new(0xf_ff00).unwrap();
    type Attempt =
        Box<dyn Fn(&mut Container<VtdDomain>) -> Result<(), vsva_host::error::HostError>>;
    let mut attempts: Vec<(&str, i32, Attempt)> = vec![
        (
            "bind A's PASID over B's table",
            libc::EPERM,
            Box::new(move |b| b.bind_gpasid(&bind(pa, own_table, 48, 0))),
        ),
        (
            "unbind A's PASID",
            libc::EPERM,
            Box::new(move |b| b.unbind_gpasid(&bind(pa, own_table, 48, 0))),
        ),
        (
            "free A's PASID",
            libc::EPERM,
            Box::new(move |b| b.pasid_free(pa)),
        ),
        (
            "free A's PASID as a one-PASID range",
            libc::EPERM,
            Box::new(move |b| b.pasid_free_range(pa.raw(), pa.raw())),
        ),
        (
            "bind an unallocated PASID",
            libc::EPERM,
            Box::new(move |b| b.bind_gpasid(&bind(unallocated, own_table, 48, 0))),
        ),
        (
            "answer A's page request group",
            libc::EPERM,
            Box::new(move |b| {
                b.page_response(&PageResponse {
                    pasid: Some(pa),
                    grpid,
                    code: PageResponseCode::Success,
                })
            }),
        ),
        (
            "answer A's page request group to A's device",
            libc::EPERM,
            Box::new(move |b| {
                b.page_response_to(
                    SID_A,
                    &PageResponse {
                        pasid: Some(pa),
                        grpid,
                        code: PageResponseCode::Invalid,
                    },
                )
            }),
        ),
        (
            "attach A's device",
            libc::EBUSY,
            Box::new(|b| b.attach_device(SID_A)),
        ),
        (
            "detach A's device",
            libc::EINVAL,
            Box::new(|b| b.detach_device(SID_A)),
        ),
    ];
    let pb = t.pb;
    attempts.push((
        "answer A's group index under B's own PASID",
        libc::EINVAL,
        Box::new(move |b| {
            b.page_response_to(
                SID_A,
                &PageResponse {
                    pasid: Some(pb),
                    grpid,
                    code: PageResponseCode::Success,
                },
            )
        }),
    ));
    attempts.push((
        "invalidate everything of the domain (refused for guests, as in Linux)",
        libc::EINVAL,
        Box::new(|b| {
            b.cache_invalidate(&CacheInvalidate {
                cache: IOMMU_CACHE_INV_TYPE_IOTLB,
                granularity: InvGranularity::Domain,
            })
        }),
    ));
    for inv in invalidations(pa) {
        attempts.push((
            "invalidate A's PASID",
            libc::EPERM,
            Box::new(move |b| b.cache_invalidate(&inv)),
        ));
    }
    for (what, errno, attempt) in &attempts {
        let before = t.world();
        let err = attempt(&mut t.b).expect_err(what);
        assert_eq!(err.errno(), -errno, "{what}: {err}");
        assert!(before == t.world(), "{what} changed something");
    }

    // What B may do with its own PASIDs leaves A's state and cached translations alone:
    // invalidating its own PASID, freeing every PASID of its set by range, closing.
    let a_before = (t.a.state(), t.a.pending_page_requests());
    let a_entry = t.host.unit.pasid_entry(SID_A, pa);
    for inv in invalidations(t.pb) {
        t.b.cache_invalidate(&inv).unwrap();
    }
    assert!(t.a_cached(), "B's invalidations dropped A's translations");
    t.b.pasid_free_range(0, Pasid::MAX.raw()).unwrap();
    assert!(t.b.state().pasids.is_empty());
    let TwoVms {
        host,
        ram_a,
        ram_b,
        dev_a,
        a,
        b,
        ..
    } = t;
    drop(b);
    drop(ram_b);
    assert_eq!((a.state(), a.pending_page_requests()), a_before);
    assert_eq!(host.unit.pasid_entry(SID_A, pa), a_entry);
    assert_eq!(dev_a.engine.waiting_for_page_response(), 1);
    assert!(host.hw.iotlb().lookup(SID_A, pa, GVA).is_some());
    drop((a, ram_a));
}

/// A page request group still waiting when its PASID is unbound is answered (Invalid) while
/// the driver can still send the response; the device stops waiting, and the PASID, bound
/// again, takes page requests as before.
#[test]
fn unbinding_answers_the_waiting_page_request_group() {
    let mut t = TwoVms::new();
    assert_eq!(t.a.pending_page_requests().len(), 1);
    assert_eq!(t.dev_a.engine.waiting_for_page_response(), 1);
    let b = t.a.state().bound[0];
    t.a.unbind_gpasid(&b).unwrap();
    assert!(t.a.pending_page_requests().is_empty());
    t.dev_a.engine.process();
    assert_eq!(t.dev_a.engine.waiting_for_page_response(), 0);
    t.a.bind_gpasid(&b).unwrap();
    let fault = Operation::Fill {
        pattern: 0,
        dst: MISSING_GVA,
        size: 8,
    };
    t.dev_a.run(Some(t.pa), false, true, fault);
    assert_eq!(t.a.pending_page_requests().len(), 1);
}

// ----- (c) Arbitrary ioctls on the real driver -----

const CMDS: [u32; 13] = [
    VFIO_GET_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_SET_IOMMU,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_IOMMU_ATTACH_PASID_TABLE,
    VFIO_IOMMU_DETACH_PASID_TABLE,
    VFIO_IOMMU_CACHE_INVALIDATE,
    VFIO_IOMMU_PASID_REQUEST,
    VFIO_IOMMU_BIND,
    VFIO_IOMMU_UNBIND,
    VFIO_IOMMU_PAGE_RESPONSE,
];

/// A PASID number: mostly the VMs' (1..=7), sometimes free or invalid.
fn pasid_number() -> impl Strategy<Value = u32> {
    prop_oneof![6 => 1u32..8, 1 => 0u32..12, 1 => Just(0xf_ffff), 1 => any::<u32>()]
}

/// A mostly well-formed argument for `cmd`. A `MAP_DMA` `vaddr` is an offset into the RAM
/// window the call names (see [`Call::Ioctl`]).
fn template(cmd: u32) -> BoxedStrategy<Vec<u8>> {
    match cmd {
        VFIO_CHECK_EXTENSION | VFIO_SET_IOMMU => prop_oneof![Just(3u64), Just(6u64), 0u64..10]
            .prop_map(|v| v.to_le_bytes().to_vec())
            .boxed(),
        VFIO_IOMMU_GET_INFO => (
            prop_oneof![Just(0u32), Just(16), Just(24), Just(96), Just(200)],
            0usize..120,
        )
            .prop_map(|(argsz, len)| {
                let mut v = vec![0u8; len];
                let n = len.min(4);
                v[..n].copy_from_slice(&argsz.to_le_bytes()[..n]);
                v
            })
            .boxed(),
        // IOVAs mostly above the RAM the VMs mapped at set-up (0..4 MiB), some over it.
        VFIO_IOMMU_MAP_DMA => (
            prop_oneof![Just(3u32), 0u32..4],
            0u64..512,
            prop_oneof![3 => 4096u64..4200, 1 => 0u64..1024],
            prop_oneof![1u64..4, Just(512), 0u64..1100],
        )
            .prop_map(|(flags, vpage, ipage, pages)| {
                VfioIommuType1DmaMap {
                    argsz: 32,
                    flags,
                    vaddr: vpage * PAGE,
                    iova: ipage * PAGE,
                    size: pages * PAGE,
                }
                .to_bytes()
                .to_vec()
            })
            .boxed(),
        VFIO_IOMMU_UNMAP_DMA => (
            prop_oneof![3 => 4096u64..4200, 1 => 0u64..1024],
            prop_oneof![1u64..4, 0u64..1100],
        )
            .prop_map(|(page, pages)| {
                VfioIommuType1DmaUnmap {
                    argsz: 24,
                    flags: 0,
                    iova: page * PAGE,
                    size: pages * PAGE,
                    ..Default::default()
                }
                .to_bytes()
                .to_vec()
            })
            .boxed(),
        VFIO_IOMMU_PASID_REQUEST => (
            prop_oneof![3 => Just(VFIO_IOMMU_FLAG_ALLOC_PASID), 2 => Just(VFIO_IOMMU_FLAG_FREE_PASID), 1 => 0u32..4],
            pasid_number(),
            prop_oneof![Just(0u32), 0u32..8, Just(0xf_ffff)],
        )
            .prop_map(|(flags, min, span)| {
                VfioIommuType1PasidRequest {
                    argsz: 16,
                    flags,
                    range: VfioPasidRange {
                        min,
                        max: min.saturating_add(span),
                    },
                }
                .to_bytes()
                .to_vec()
            })
            .boxed(),
        VFIO_IOMMU_BIND | VFIO_IOMMU_UNBIND => (
            prop_oneof![5 => Just(VFIO_IOMMU_BIND_GUEST_PASID), 1 => 0u32..3],
            pasid_number(),
            prop_oneof![4 => Just(48u32), 2 => Just(57), 1 => Just(39)],
            0u64..2,
            prop_oneof![4 => 0u64..0x400, 1 => any::<u64>()],
            prop_oneof![4 => Just(0u64), 1 => 0u64..0x80],
        )
            .prop_map(|(bind_type, hpasid, addr_width, flags, gpgd_page, vtd)| {
                VfioBindGuestPasid {
                    header: VfioIommuType1Bind {
                        argsz: 80,
                        bind_type,
                    },
                    data: IommuGpasidBindData {
                        argsz: 72,
                        version: 1,
                        format: IOMMU_PASID_FORMAT_INTEL_VTD,
                        addr_width,
                        flags,
                        gpgd: gpgd_page.wrapping_mul(PAGE),
                        hpasid: hpasid.into(),
                        gpasid: hpasid.into(),
                        padding: [0; 8],
                        vendor: IommuGpasidBindVendor {
                            vtd: IommuGpasidBindDataVtd {
                                flags: vtd,
                                pat: 0,
                                emt: 0,
                            },
                        },
                    },
                }
                .to_bytes()
                .to_vec()
            })
            .boxed(),
        VFIO_IOMMU_CACHE_INVALIDATE => (
            prop_oneof![3 => Just(IOMMU_INV_GRANU_PASID), 3 => Just(IOMMU_INV_GRANU_ADDR), 1 => 0u8..4],
            prop_oneof![Just(1u8), Just(2), Just(3), 0u8..8],
            pasid_number(),
            prop_oneof![Just(1u32), Just(5), 0u32..8],
            prop_oneof![Just(GVA), (0u64..256).prop_map(|p| p * PAGE), any::<u64>()],
            prop_oneof![Just(PAGE), Just(2 << 20), any::<u64>()],
            0u64..1024,
        )
            .prop_map(|(granularity, cache, pasid, flags, addr, granule, n)| {
                VfioIommuType1CacheInvalidate {
                    argsz: 64,
                    flags: 0,
                    info: IommuCacheInvalidateInfo {
                        argsz: 56,
                        version: 1,
                        cache,
                        granularity,
                        padding: [0; 6],
                        granu: IommuInvAddrInfo {
                            flags,
                            archid: 0,
                            pasid: pasid.into(),
                            addr,
                            granule_size: granule,
                            nb_granules: n,
                        },
                    },
                }
                .to_bytes()
                .to_vec()
            })
            .boxed(),
        VFIO_IOMMU_ATTACH_PASID_TABLE => (0u8..5, 0u8..22, 0u64..0x400, 0u8..4)
            .prop_map(|(config, pasid_bits, page, s1fmt)| {
                VfioIommuType1AttachPasidTable {
                    argsz: 40,
                    flags: 0,
                    config: IommuPasidTableConfig {
                        version: PASID_TABLE_CFG_VERSION_1,
                        format: IOMMU_PASID_FORMAT_SMMUV3,
                        base_ptr: page * PAGE,
                        pasid_bits,
                        config,
                        padding: [0; 6],
                        vendor_data: IommuPasidTableVendor {
                            smmuv3: IommuPasidSmmuv3 {
                                version: PASID_TABLE_SMMUV3_CFG_VERSION_1,
                                s1fmt,
                                s1dss: 0,
                                padding: [0; 2],
                            },
                        },
                    },
                }
                .to_bytes()
                .to_vec()
            })
            .boxed(),
        VFIO_IOMMU_PAGE_RESPONSE => (
            proptest::option::weighted(0.5, prop_oneof![Just(SID_A.rid()), Just(SID_B.rid())]),
            proptest::option::weighted(0.9, pasid_number()),
            0u32..4,
            prop_oneof![4 => 0u32..2, 1 => 0u32..4],
        )
            .prop_map(|(rid, pasid, grpid, code)| {
                VfioIommuType1PageResponse {
                    argsz: 36,
                    flags: rid.map_or(0, |_| VFIO_IOMMU_PAGE_RESPONSE_RID_VALID),
                    rid: rid.map_or(0, u32::from),
                    response: IommuPageResponse {
                        argsz: 24,
                        version: IOMMU_PAGE_RESP_VERSION_1,
                        flags: pasid.map_or(0, |_| IOMMU_PAGE_RESP_PASID_VALID),
                        pasid: pasid.unwrap_or(0),
                        grpid,
                        code,
                    },
                }
                .to_bytes()
                .to_vec()
            })
            .boxed(),
        _ => proptest::collection::vec(any::<u8>(), 0..96).boxed(),
    }
}

/// One step: an ioctl on VM A's container (else B's), or DMA that fills the caches.
#[derive(Clone, Debug)]
enum Call {
    /// `window` is the RAM a `MAP_DMA` argument's `vaddr` is an offset into: VM A's, VM
    /// B's, or none (an address no window holds); the window moves with each host.
    Ioctl {
        on_a: bool,
        cmd: u32,
        arg: Vec<u8>,
        window: usize,
    },
    Dma {
        on_a: bool,
        page: u64,
    },
}

fn call() -> impl Strategy<Value = Call> {
    let ioctl = prop_oneof![12 => proptest::sample::select(CMDS.to_vec()), 1 => any::<u32>()]
        .prop_flat_map(|cmd| {
            (
                any::<bool>(),
                Just(cmd),
                template(cmd),
                proptest::option::weighted(0.2, (any::<usize>(), any::<u8>())),
                proptest::option::weighted(0.1, any::<usize>()),
                0usize..3,
            )
        })
        .prop_map(|(on_a, cmd, mut arg, corrupt, cut, window)| {
            if let (Some((at, value)), false) = (corrupt, arg.is_empty()) {
                let i = at % arg.len();
                arg[i] = value;
            }
            if let Some(len) = cut {
                arg.truncate(len % (arg.len() + 1));
            }
            Call::Ioctl {
                on_a,
                cmd,
                arg,
                window,
            }
        });
    prop_oneof![
        6 => ioctl,
        1 => (any::<bool>(), 0u64..4).prop_map(|(on_a, page)| Call::Dma { on_a, page }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Issue 3: arbitrary commands and bytes on two VMs' containers over the real driver
    /// never panic; an ioctl that fails changes nothing: neither container, the allocator,
    /// the driver (domain ids, devices, routes, PASID entries), the IOMMU's caches and
    /// invalidation counter, the devices, nor any byte of host memory (which holds every
    /// table). Closing both containers then frees every table frame and cache entry.
    #[test]
    fn arbitrary_ioctls_on_the_real_driver(
        calls in proptest::collection::vec(call(), 1..40),
    ) {
        let mut t = TwoVms::new();
        // VM A holds PASIDs 1, 3, 4, 5 (1 bound); VM B 2, 6, 7 (2 bound).
        for (c, n) in [(&mut t.a, 3), (&mut t.b, 2)] {
            for _ in 0..n {
                c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
            }
        }
        let windows = [t.ram_a.vaddr, t.ram_b.vaddr, 1 << 47];
        for c in calls {
            match c {
                Call::Dma { on_a, page } => {
                    let (sid, p) = if on_a { (SID_A, t.pa) } else { (SID_B, t.pb) };
                    let _ = t.host.hw.translate(sid, Some(p), GVA + page * PAGE, AccessRequest::READ);
                    let _ = t.host.hw.translate(sid, None, DATA_GPA + page * PAGE, AccessRequest::READ);
                }
                Call::Ioctl { on_a, cmd, mut arg, window } => {
                    let vaddr = std::mem::offset_of!(VfioIommuType1DmaMap, vaddr);
                    if let (VFIO_IOMMU_MAP_DMA, Some(field)) = (cmd, arg.get_mut(vaddr..vaddr + 8)) {
                        let offset = u64::from_le_bytes(field.try_into().unwrap());
                        field.copy_from_slice(&offset.wrapping_add(windows[window]).to_le_bytes());
                    }
                    let before = t.world();
                    let arg_before = arg.clone();
                    let c = if on_a { &mut t.a } else { &mut t.b };
                    if let Err(e) = c.ioctl(cmd, &mut arg) {
                        prop_assert!(e.errno() < 0);
                        prop_assert_eq!(&arg, &arg_before, "failed {:#x} wrote its argument", cmd);
                        prop_assert!(before == t.world(), "failed {:#x} ({}) changed something", cmd, e);
                    }
                }
            }
        }
        let TwoVms { host, a, b, ram_a, ram_b, .. } = t;
        drop((a, b));
        let rams = ram_a.size + ram_b.size;
        prop_assert_eq!(host.frames.allocated_bytes(), rams + unit_bytes());
        prop_assert!(host.hw.iotlb().is_empty());
        prop_assert_eq!(host.hw.cached_entries(), (0, 0));
        prop_assert_eq!(host.unit.domain_ids_in_use(), 0);
        prop_assert_eq!(host.pasids.lock().unwrap().total_allocated(), 0);
    }
}

/// Host memory the driver holds for the unit alone (root table, queues).
fn unit_bytes() -> u64 {
    Host::new().frames.allocated_bytes()
}

// ----- (d) Closing a container -----

#[test]
fn closing_a_container_leaves_nothing_in_the_hardware() {
    let host = Host::new();
    let ram = host.ram(4 << 20);
    let dev = host.device(SID_A);
    let baseline = host.frames.allocated_bytes();
    assert_eq!(host.hw.cached_entries(), (0, 0));
    assert!(host.hw.iotlb().is_empty());

    let mut c = host.container(SID_A);
    c.map_dma(&ram.map(0, 0, 2 << 20, true)).unwrap();
    c.map_dma(&ram.map(2 << 20, 2 << 20, 2 << 20, false))
        .unwrap();
    c.map_dma(&ram.map(ALIAS_IOVA, 0, CHUNK, true)).unwrap();
    let pages = [(GVA, DATA_GPA), (GVA + PAGE, DATA_GPA + PAGE)];
    let mut bound = Vec::new();
    for (mode, width, frames) in [
        (FlPagingMode::FourLevel, 48, (0, 0x8000)),
        (FlPagingMode::FiveLevel, 57, (0x8000, 0x10000)),
    ] {
        let p = c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
        let root = guest_tables(&ram, mode, frames, &pages);
        c.bind_gpasid(&bind(p, root, width, 0)).unwrap();
        bound.push(p);
    }
    c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
    for &p in &bound {
        let fill = Operation::Fill {
            pattern: 0x2222,
            dst: GVA,
            size: 2 * PAGE as u32,
        };
        dev.run(Some(p), false, false, fill);
    }
    host.hw
        .translate(SID_A, None, 0x1000, AccessRequest::READ)
        .unwrap();
    let fault = Operation::Fill {
        pattern: 0,
        dst: MISSING_GVA,
        size: 8,
    };
    dev.run(Some(bound[0]), false, true, fault);

    // The container holds something everywhere.
    let did = c.backend().did();
    assert!(host.frames.allocated_bytes() > baseline);
    assert!(!host.hw.iotlb().is_empty());
    let (contexts, pasids) = host.hw.cached_entries();
    assert!(contexts > 0 && pasids > 0);
    assert!(dev.engine.devtlb_len() > 0);
    assert_eq!(dev.engine.waiting_for_page_response(), 1);
    assert_eq!(c.pending_page_requests().len(), 1);
    assert!(host.unit.is_domain_id_allocated(did));
    assert_eq!(host.unit.attached_devices(), 1);
    assert_eq!(host.unit.page_request_routes(), 2);
    assert_eq!(host.unit.page_request_sinks(), 1);

    drop(c);
    assert_eq!(
        host.frames.allocated_bytes(),
        baseline,
        "table frames leaked"
    );
    assert!(host.hw.iotlb().is_empty(), "IOTLB entries left");
    assert_eq!(
        host.hw.cached_entries(),
        (0, 0),
        "context/PASID cache entries left"
    );
    assert!(!host.unit.is_domain_id_allocated(did));
    assert_eq!(host.unit.domain_ids_in_use(), 0);
    assert_eq!(host.unit.attached_devices(), 0);
    assert_eq!(host.unit.page_request_routes(), 0);
    assert_eq!(host.unit.page_request_sinks(), 0);
    assert_eq!(host.pasids.lock().unwrap().total_allocated(), 0);
    assert_eq!(dev.engine.devtlb_len(), 0, "device TLB entries left");
    dev.engine.process();
    assert_eq!(
        dev.engine.waiting_for_page_response(),
        0,
        "the waiting page request was answered"
    );
    // Both fault because the device's root or context entry is gone (not, say, a
    // permission or reserved-bit fault of a stale entry).
    for fault in [
        host.hw
            .translate(SID_A, None, 0x1000, AccessRequest::READ)
            .unwrap_err(),
        host.hw
            .translate(SID_A, Some(bound[0]), GVA, AccessRequest::READ)
            .unwrap_err(),
    ] {
        assert!(
            matches!(fault.reason, FaultReason::Srt2 | FaultReason::Sct2),
            "{fault:?}"
        );
    }

    // The domain id, the PASIDs and the device are reused by the next VM, which reaches
    // its own RAM through them and nothing of the old one.
    let ram2 = host.ram(2 << 20);
    let baseline2 = host.frames.allocated_bytes();
    let mut c2 = host.container(SID_A);
    assert_eq!(c2.backend().did(), did, "the domain id is reused");
    c2.map_dma(&ram2.map(0, 0, 2 << 20, true)).unwrap();
    let p = c2.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
    assert_eq!(p, bound[0]);
    let root = guest_tables(&ram2, FlPagingMode::FourLevel, (0, 0x8000), &pages);
    c2.bind_gpasid(&bind(p, root, 48, 0)).unwrap();
    let old = host.snapshot();
    let fill = Operation::Fill {
        pattern: 0x3333_3333_3333_3333,
        dst: GVA,
        size: 2 * PAGE as u32,
    };
    dev.run(Some(p), false, false, fill);
    let mut got = vec![0u8; 2 * PAGE as usize];
    ram2.host.read(ram2.hpa + DATA_GPA, &mut got).unwrap();
    assert!(
        got.iter().all(|&b| b == 0x33),
        "DMA reached the new VM's RAM"
    );
    for page in changed_pages(&old, &host.snapshot()) {
        assert!(
            (ram2.hpa + DATA_GPA..ram2.hpa + DATA_GPA + 2 * PAGE).contains(&page)
                || (ram2.hpa..ram2.hpa + 0x8000).contains(&page),
            "DMA changed host page {page:#x}"
        );
    }
    drop(c2);
    assert_eq!(host.frames.allocated_bytes(), baseline2);
    assert!(host.hw.iotlb().is_empty());
    assert_eq!(host.hw.cached_entries(), (0, 0));
}

// ----- (e) Revocation racing the device (issue 13 §1) -----

/// How VM A's device loses its access to the revoked region in a round of the race.
#[derive(Clone, Copy, Debug)]
enum Revoke {
    /// `VFIO_IOMMU_UNMAP_DMA` of the region's GPA range.
    UnmapDma,
    /// `VFIO_IOMMU_UNBIND` of the PASID the device uses.
    Unbind,
    /// `VFIO_IOMMU_PASID_REQUEST(FREE)` of that PASID, which unbinds it first.
    FreePasid,
}

/// The region whose frames go to VM B: its source half R and destination half W.
const REVOKED_GPA: u64 = 2 << 20;
const HALF: u64 = 128 << 10;
/// VM A's own destination, never revoked.
const OWN_GPA: u64 = 3 << 20;
const GVA_R: u64 = 0x7f10_0000_0000;
const GVA_W: u64 = 0x7f20_0000_0000;
const GVA_OWN: u64 = 0x7f30_0000_0000;
/// VM A's bytes, and the bytes VM B writes into the frames it receives (R and W).
const A_BYTE: u8 = 0xa1;
const B_BYTES: [u8; 2] = [0xb1, 0xb2];

/// A device slow between translating and moving: when the VMM armed it for a round,
/// after the next translation of the last page of a region (the end of a run) it holds the
/// run's translations until the VMM says that round's revocation returned, as a device
/// behind a busy link may, and then moves the run's bytes. Every round of the race thus
/// revokes while translations are held, however the threads are scheduled.
struct Lingering {
    hw: Arc<Iommu>,
    /// The round (from 1) whose revocation is about to start: the next end of a run
    /// lingers for it; 0 when none is.
    armed: AtomicU64,
    /// The last round for which the device held translations.
    holding: AtomicU64,
    /// The last round whose revocation returned (and whose frames' new owner wrote its
    /// bytes): a device holding for it moves on. `u64::MAX` when the race is over.
    released: AtomicU64,
}

/// How long either side of [`Lingering`] waits for the other at most: only a safety net
/// for a side that stopped (a failed check), never reached while both run.
const STALLED: Duration = Duration::from_secs(30);

impl Lingering {
    fn linger(&self, addr: u64) {
        if addr % HALF < HALF - PAGE {
            return;
        }
        let round = self.armed.swap(0, Ordering::SeqCst);
        if round == 0 {
            return;
        }
        self.holding.store(round, Ordering::SeqCst);
        let t = Instant::now();
        while self.released.load(Ordering::SeqCst) < round && t.elapsed() < STALLED {
            std::thread::yield_now();
        }
    }
}

impl DmaPort for Lingering {
    fn remap(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<DmaTranslation, DmaFault> {
        let t = DmaPort::remap(&*self.hw, sid, pasid, addr, access);
        self.linger(addr);
        t
    }

    fn ats_translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<AtsCompletion, DmaFault> {
        let c = self.hw.ats_translate(sid, pasid, addr, access);
        self.linger(addr);
        c
    }

    fn check_translated(
        &self,
        sid: SourceId,
        hpa: Hpa,
        len: u64,
        access: DmaAccess,
    ) -> Result<(), DmaFault> {
        self.hw.check_translated(sid, hpa, len, access)
    }

    fn page_request(&self, req: PageRequestMessage) {
        self.hw.page_request(req);
    }

    fn memory(&self) -> &HostMemory {
        self.hw.memory()
    }

    fn request_drain(&self) -> &RequestDrain {
        self.hw.request_drain()
    }
}

/// One VM's device moving bytes on a nested PASID while the VMM revokes its access from
/// another thread, again and again, while the device holds translations of the region
/// (see [`Lingering`]) and another of its requesters translates the region (walks and
/// fills racing the invalidation): after each revocation returns, no translation of the
/// region is left in the IOTLB, the region's frames
/// go to VM B, which fills them with its own bytes, and VM A gets them back (its bytes
/// restored, re-mapped or re-bound) only after the device has run at least two more
/// descriptors. The device copies R to W (both revoked) and R to a page A keeps; the test
/// checks every byte: VM B's frames keep B's bytes (no write by A's device after the
/// revocation returned) and A's own page only ever holds A's bytes (no read of B's).
/// Rounds stop after `budget` and [`MIN_ROUNDS`]; returns the rounds run, the descriptors completed and the
/// runs whose translations a revocation completed on before they moved (translated
/// again).
fn revocation_race(revoke: Revoke, features: u64, budget: Duration) -> (u64, u64, u64) {
    let host = Host::new();
    let ram = host.ram(4 << 20);
    let port = Arc::new(Lingering {
        hw: host.hw.clone(),
        armed: AtomicU64::new(0),
        holding: AtomicU64::new(0),
        released: AtomicU64::new(0),
    });
    let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(SID_A), port.clone()).unwrap());
    host.hw.attach_endpoint(engine.clone());
    engine.enable(features).unwrap();
    let mut c = host.container(SID_A);
    let revoked = ram.map(REVOKED_GPA, REVOKED_GPA, 2 * HALF, true);
    c.map_dma(&ram.map(0, 0, REVOKED_GPA, true)).unwrap();
    c.map_dma(&revoked).unwrap();
    c.map_dma(&ram.map(OWN_GPA, OWN_GPA, HALF, true)).unwrap();
    let pages: Vec<(u64, u64)> = (0..HALF / PAGE)
        .flat_map(|i| {
            let o = i * PAGE;
            [
                (GVA_R + o, REVOKED_GPA + o),
                (GVA_W + o, REVOKED_GPA + HALF + o),
                (GVA_OWN + o, OWN_GPA + o),
            ]
        })
        .collect();
    let root = guest_tables(&ram, FlPagingMode::FourLevel, (0, 1 << 20), &pages);
    let first = c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
    c.bind_gpasid(&bind(first, root, 48, 0)).unwrap();
    let fill = |gpa: u64, byte: u8| {
        host.mem
            .write(ram.hpa + gpa, &vec![byte; HALF as usize])
            .unwrap();
    };
    fill(REVOKED_GPA, A_BYTE);
    fill(REVOKED_GPA + HALF, A_BYTE);
    fill(OWN_GPA, A_BYTE);
    let holds_only = |gpa: u64, byte: u8| -> Option<u64> {
        let mut buf = vec![0u8; HALF as usize];
        host.mem.read(ram.hpa + gpa, &mut buf).unwrap();
        buf.iter().position(|&b| b != byte).map(|i| gpa + i as u64)
    };

    let pasid = AtomicU32::new(first.raw());
    let stop = AtomicBool::new(false);
    let completed = AtomicU64::new(0);
    let rounds = std::thread::scope(|s| {
        // Another requester of the device translating the region all the time, so that
        // walks and fills run while each revocation invalidates (the device itself holds
        // its translations then).
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let p = Pasid::new(pasid.load(Ordering::Relaxed)).unwrap();
                for gva in [GVA_R, GVA_W] {
                    for i in 0..HALF / PAGE {
                        let _ = DmaPort::remap(
                            &*host.hw,
                            SID_A,
                            Some(p),
                            gva + i * PAGE,
                            DmaAccess::READ,
                        );
                    }
                }
            }
        });
        let device = s.spawn(|| {
            let copy = |dst| Operation::Memmove {
                src: GVA_R,
                dst,
                size: HALF as u32,
            };
            while !stop.load(Ordering::Relaxed) {
                let p = Pasid::new(pasid.load(Ordering::Relaxed)).unwrap();
                for op in [copy(GVA_W), copy(GVA_OWN)] {
                    let desc = Descriptor {
                        pasid: Some(p),
                        privileged: false,
                        block_on_fault: false,
                        completion: CompletionRequest::None,
                        op,
                    };
                    engine.portal_write(0, &desc.encode()).unwrap();
                    engine.process();
                    engine
                        .mmio_write(REG_SWERR0, SWERR_VALID | SWERR_OVERFLOW)
                        .unwrap();
                    completed.fetch_add(1, Ordering::Release);
                }
                if let Some(at) = holds_only(OWN_GPA, A_BYTE) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(format!(
                        "{revoke:?}: VM A's device read VM B's bytes into its own page at GPA {at:#x}"
                    ));
                }
            }
            Ok(())
        });
        let wait_for = |n: u64| {
            let target = completed.load(Ordering::Acquire) + n;
            while completed.load(Ordering::Acquire) < target && !stop.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
        };
        let start = Instant::now();
        let mut rounds = 0u64;
        let mut p = first;
        let failure = loop {
            let elapsed = start.elapsed();
            let enough = elapsed >= budget && rounds >= MIN_ROUNDS;
            if enough || elapsed >= 10 * budget || stop.load(Ordering::Relaxed) {
                break None;
            }
            // The device holds translations of a region for this round.
            let round = rounds + 1;
            port.armed.store(round, Ordering::SeqCst);
            let t = Instant::now();
            while port.holding.load(Ordering::SeqCst) != round
                && !stop.load(Ordering::Relaxed)
                && t.elapsed() < STALLED
            {
                std::thread::yield_now();
            }
            match revoke {
                Revoke::UnmapDma => {
                    c.unmap_dma(revoked.iova, revoked.size).unwrap();
                }
                Revoke::Unbind => c.unbind_gpasid(&bind(p, root, 48, 0)).unwrap(),
                Revoke::FreePasid => c.pasid_free(p).unwrap(),
            }
            // The call returned: no translation of the region is left in the IOTLB, or
            // filled since (a walk overtaken by the invalidation).
            let cached = [GVA_R, GVA_W]
                .iter()
                .flat_map(|&gva| (0..HALF / PAGE).map(move |i| gva + i * PAGE))
                .find(|&gva| host.hw.iotlb().lookup(SID_A, p, gva).is_some());
            if let Some(gva) = cached {
                break Some(format!(
                    "{revoke:?}: the IOTLB still translates {gva:#x} after round {rounds}'s revocation returned"
                ));
            }
            // The frames are VM B's, which writes its own bytes.
            fill(REVOKED_GPA, B_BYTES[0]);
            fill(REVOKED_GPA + HALF, B_BYTES[1]);
            port.released.store(round, Ordering::SeqCst);
            wait_for(2);
            let moved = [0, 1]
                .iter()
                .find_map(|&i| holds_only(REVOKED_GPA + i * HALF, B_BYTES[i as usize]));
            if let Some(at) = moved {
                break Some(format!(
                    "{revoke:?}: VM A's device wrote VM B's frame at GPA {at:#x} after round {rounds}"
                ));
            }
            // Back to VM A, with its bytes.
            fill(REVOKED_GPA, A_BYTE);
            fill(REVOKED_GPA + HALF, A_BYTE);
            match revoke {
                Revoke::UnmapDma => c.map_dma(&revoked).unwrap(),
                Revoke::Unbind => c.bind_gpasid(&bind(p, root, 48, 0)).unwrap(),
                Revoke::FreePasid => {
                    p = c.pasid_alloc(1, Pasid::MAX.raw()).unwrap();
                    c.bind_gpasid(&bind(p, root, 48, 0)).unwrap();
                    pasid.store(p.raw(), Ordering::Relaxed);
                }
            }
            rounds = round;
        };
        stop.store(true, Ordering::Relaxed);
        port.released.store(u64::MAX, Ordering::SeqCst);
        let device = device.join().unwrap();
        if let Some(f) = failure {
            panic!("{f}");
        }
        device.unwrap_or_else(|f| panic!("{f}"));
        rounds
    });
    (
        rounds,
        completed.load(Ordering::Relaxed),
        engine.stats().drain_refused,
    )
}

/// Each race runs this long; a round takes two descriptors of the device and, on a loaded
/// machine, a few scheduler ticks (20-40 rounds on a 2-core machine running 6 races).
const RACE_BUDGET: Duration = Duration::from_millis(800);

/// Rounds each race runs at least (unless it takes ten times its budget).
const MIN_ROUNDS: u64 = 8;

/// Runs a race and checks it raced: revocations completed while the device held
/// translations (which it then refused to use).
fn race(revoke: Revoke, features: u64) {
    let (rounds, descriptors, refused) = revocation_race(revoke, features, RACE_BUDGET);
    eprintln!(
        "{revoke:?} (features {features:#x}): {rounds} rounds, {descriptors} descriptors, \
         {refused} runs translated again"
    );
    assert!(rounds >= MIN_ROUNDS, "the race ran only {rounds} rounds");
    assert!(refused > 0, "no revocation overtook a held translation");
}

#[test]
fn unmap_dma_racing_untranslated_requests() {
    race(Revoke::UnmapDma, CTRL_PASID_EN);
}

#[test]
fn unmap_dma_racing_the_device_tlb() {
    race(Revoke::UnmapDma, CTRL_PASID_EN | CTRL_ATS_EN);
}

#[test]
fn unbind_racing_untranslated_requests() {
    race(Revoke::Unbind, CTRL_PASID_EN);
}

#[test]
fn unbind_racing_the_device_tlb() {
    race(Revoke::Unbind, CTRL_PASID_EN | CTRL_ATS_EN);
}

#[test]
fn pasid_free_racing_untranslated_requests() {
    race(Revoke::FreePasid, CTRL_PASID_EN);
}

#[test]
fn pasid_free_racing_the_device_tlb() {
    race(Revoke::FreePasid, CTRL_PASID_EN | CTRL_ATS_EN);
}
