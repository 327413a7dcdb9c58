//! A process's page tables in one of the two architectures vsva's guests run: x86-64
//! first-level tables (IA-32e paging, what CR3 and a VT-d PASID entry's FLPTPTR point to)
//! or AArch64 stage-1 tables (VMSAv8-64 with the 4 KiB granule and a 48-bit VA, Arm ARM
//! D8, what TTBR0_EL1 and an SMMUv3 context descriptor's TTB0 point to).

use vsva_mem::PhysMem;
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, features::Features, walk::walk_stage1,
    walk::PageSize as ArmPageSize, walk::S1Config,
};
use vsva_vtd::{
    builder::PageTableBuilder, builder::TableFormat, flpte::FlFormat, flpte::FlPagingMode,
    walk::walk_first_level, walk::AccessRequest, walk::FlConfig, walk::PageSize,
};

use super::{ProcessError, Prot};
use crate::frames::GuestFrames;

/// The CPU's view of first-level entries: 52-bit physical addresses, 1-GiB pages.
const CPU_FORMAT: FlFormat = match FlFormat::new(52, true) {
    Ok(f) => f,
    Err(_) => panic!("52 bits is a valid address width"),
};

/// The offset bits of a 4 KiB page, the unit the CPU's walk cache keeps.
const PAGE_OFFSET: u64 = 0xfff;

/// Entries of the CPU's walk cache, direct-mapped by virtual page number.
const CACHE_ENTRIES: usize = 8;

/// TCR_EL1.T0SZ of a 48-bit user address space (Linux's `VA_BITS = 48`).
pub const AARCH64_T0SZ: u8 = 16;

/// The instruction set whose page tables a process has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86-64 with 4- or 5-level paging.
    X86_64(FlPagingMode),
    /// AArch64, 4 KiB granule, 48-bit VA from TTBR0 (4 levels).
    Aarch64,
}

/// The tables of one process and the CPU's walk cache over them.
pub(super) struct Tables {
    kind: Kind,
    cache: WalkCache,
}

/// The tables of one architecture.
enum Kind {
    X86 {
        builder: PageTableBuilder,
        mode: FlPagingMode,
    },
    Aarch64 {
        builder: TableBuilder,
        root: u64,
        cfg: S1Config,
    },
}

/// The stage-1 configuration of a process's TTBR0 table at `root`, as TCR_EL1 sets it for
/// user space (T0SZ 16, 4 KiB granule, 48-bit IPS): the same a context descriptor made by
/// [`ContextDescriptor::new`] gives an SMMU.
fn aarch64_config(root: u64) -> S1Config {
    ContextDescriptor::new(root, AARCH64_T0SZ, 0)
        .s1_config(&Features::VSVA)
        .expect("T0SZ 16 with the 4 KiB granule is a valid configuration")
}

/// The leaf attributes of a user page with `prot` (Linux's `PAGE_*` for user mappings):
/// accessed, not global (ASID-tagged), inner shareable, EL0-accessible, read-only without
/// write, never executable at EL1 and not at EL0 without exec.
fn aarch64_attrs(prot: Prot) -> u64 {
    let mut attrs = D::AF | D::NG | D::SH | D::AP_EL0 | D::PXN;
    if !prot.contains(Prot::WRITE) {
        attrs |= D::AP_RO;
    }
    if !prot.contains(Prot::EXEC) {
        attrs |= D::UXN;
    }
    attrs
}

impl Tables {
    /// Empty tables of `arch`: one cleared top-level table.
    pub(super) fn new<M: PhysMem + ?Sized>(
        arch: Arch,
        mem: &M,
        frames: &GuestFrames,
    ) -> Result<Tables, ProcessError> {
        let kind = match arch {
            Arch::X86_64(mode) => Kind::X86 {
                builder: PageTableBuilder::new(TableFormat::FirstLevel(mode), mem, &mut &*frames)?,
                mode,
            },
            Arch::Aarch64 => {
                let root = frames.alloc()?;
                if let Err(e) = mem.write(root.0, &[0; 4096]) {
                    let _ = frames.free(root);
                    return Err(e.into());
                }
                let cfg = aarch64_config(root.0);
                Kind::Aarch64 {
                    builder: TableBuilder::stage1(&cfg),
                    root: root.0,
                    cfg,
                }
            }
        };
        Ok(Tables {
            kind,
            cache: WalkCache::default(),
        })
    }

    pub(super) fn arch(&self) -> Arch {
        match &self.kind {
            Kind::X86 { mode, .. } => Arch::X86_64(*mode),
            Kind::Aarch64 { .. } => Arch::Aarch64,
        }
    }

    /// The top-level table: CR3's or TTBR0's address.
    pub(super) fn root(&self) -> u64 {
        match &self.kind {
            Kind::X86 { builder, .. } => builder.root(),
            Kind::Aarch64 { root, .. } => *root,
        }
    }

    /// Table frames held, the top level included.
    pub(super) fn table_frames(&self) -> usize {
        match &self.kind {
            Kind::X86 { builder, .. } => builder.table_frames(),
            Kind::Aarch64 { builder, .. } => builder.tables().len() + 1,
        }
    }

    /// Maps the 4 KiB page at `va` to `pa` for a user with `prot`.
    pub(super) fn map<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        frames: &GuestFrames,
        va: u64,
        pa: u64,
        prot: Prot,
    ) -> Result<(), ProcessError> {
        self.cache.flush_page(va);
        match &mut self.kind {
            Kind::X86 { builder, .. } => Ok(builder.map(
                mem,
                &mut &*frames,
                va,
                pa,
                PageSize::Size4K,
                prot.map_flags(),
            )?),
            Kind::Aarch64 { builder, .. } => {
                let mut alloc = || frames.alloc().ok().map(|g| g.0);
                Ok(builder.map(
                    mem,
                    &mut alloc,
                    va,
                    pa,
                    ArmPageSize::Size4K,
                    aarch64_attrs(prot),
                )?)
            }
        }
    }

    /// Clears the 4 KiB page at `va`.
    pub(super) fn unmap<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
    ) -> Result<(), ProcessError> {
        self.cache.flush_page(va);
        match &mut self.kind {
            Kind::X86 { builder, .. } => builder.unmap(mem, va, PageSize::Size4K).map(|_| ())?,
            Kind::Aarch64 { builder, .. } => {
                builder.unmap(mem, va, ArmPageSize::Size4K).map(|_| ())?
            }
        }
        Ok(())
    }

    /// Gives the 4 KiB page at `va` the rights of `prot`.
    pub(super) fn protect<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        prot: Prot,
    ) -> Result<(), ProcessError> {
        self.cache.flush_page(va);
        match &mut self.kind {
            Kind::X86 { builder, .. } => {
                builder.protect(mem, va, PageSize::Size4K, prot.map_flags())?
            }
            Kind::Aarch64 { builder, .. } => {
                let slot = builder
                    .descriptor_address(mem, va, ArmPageSize::Size4K.level())?
                    .ok_or(vsva_smmuv3::builder::BuildError::NotMapped {
                        va,
                        size: ArmPageSize::Size4K,
                    })?;
                let leaf = D(mem.read_u64(slot)?);
                let base = leaf.0 & D::ADDR_MASK;
                let page = D::leaf(base, ArmPageSize::Size4K, aarch64_attrs(prot));
                mem.write_u64(slot, page.0)?;
            }
        }
        Ok(())
    }

    /// The page `va` is in as the tables map it: its physical base and size in bytes.
    pub(super) fn lookup<M: PhysMem + ?Sized>(&self, mem: &M, va: u64) -> Option<(u64, u64)> {
        match &self.kind {
            Kind::X86 { builder, .. } => {
                let m = builder.lookup(mem, va).ok()??;
                Some((m.page, m.size.bytes()))
            }
            Kind::Aarch64 { builder, .. } => {
                let m = builder.lookup(mem, va).ok()??;
                Some((m.base, m.size.bytes()))
            }
        }
    }

    /// The CPU's translation for a user access (`write` or a read): without a walk when
    /// its walk cache knows the page's leaf entry and the entry is still what the last walk
    /// left there, else by [`Self::walk`], whose leaf the cache then keeps. The output
    /// address, or `None` for a fault.
    pub(super) fn cpu_walk<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        write: bool,
    ) -> Option<u64> {
        if let Some(frame) = self.cache.lookup(mem, va, write) {
            return Some(frame | (va & PAGE_OFFSET));
        }
        let mut leaf = LastEntry::default();
        let Some(output) = self.walk(mem, va, write, &mut leaf) else {
            self.cache.flush_page(va);
            return None;
        };
        self.cache.fill(va, output & !PAGE_OFFSET, leaf, write);
        Some(output)
    }

    /// The CPU's walk for a user access (`write` or a read), setting the accessed and
    /// dirty state the architecture's hardware sets; the output address, or `None` for a
    /// fault. `leaf` sees every entry read, the leaf last.
    fn walk<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        write: bool,
        leaf: &mut LastEntry,
    ) -> Option<u64> {
        match &self.kind {
            Kind::X86 { builder, mode } => {
                let cfg = FlConfig {
                    root: builder.root(),
                    mode: *mode,
                    sre: false,
                    wpe: false,
                    eafe: false,
                    format: CPU_FORMAT,
                };
                let access = AccessRequest {
                    write,
                    ..AccessRequest::READ
                };
                walk_first_level(mem, &cfg, va, access, leaf)
                    .ok()
                    .map(|t| t.output)
            }
            Kind::Aarch64 { cfg, .. } => {
                let access = vsva_smmuv3::walk::AccessRequest {
                    write,
                    instruction: false,
                    privileged: false,
                };
                walk_stage1(mem, cfg, va, access, leaf)
                    .ok()
                    .map(|t| t.output)
            }
        }
    }

    /// Frees every table frame, the top level included.
    pub(super) fn destroy(self, frames: &GuestFrames) {
        match self.kind {
            Kind::X86 { builder, .. } => {
                builder.destroy(&mut &*frames);
            }
            Kind::Aarch64 { builder, root, .. } => {
                for &f in builder.tables() {
                    let _ = frames.free(vsva_vtd::addr::Gpa(f));
                }
                let _ = frames.free(vsva_vtd::addr::Gpa(root));
            }
        }
    }
}

/// The last entry a walk read (after its accessed or dirty update): the leaf of a walk
/// that translated.
#[derive(Default)]
struct LastEntry {
    address: u64,
    entry: u64,
}

impl vsva_vtd::walk::WalkObserver for LastEntry {
    fn step(&mut self, step: vsva_vtd::walk::WalkStep) {
        (self.address, self.entry) = (step.entry_address, step.entry);
    }
}

impl vsva_smmuv3::walk::WalkObserver for LastEntry {
    fn step(&mut self, step: vsva_smmuv3::walk::WalkStep) {
        (self.address, self.entry) = (step.entry_address, step.entry);
    }
}

/// The CPU's paging-structure caches for the process's user accesses (Intel SDM Vol. 3A
/// §4.10.3; an AArch64 core's walk caches alike): per 4 KiB page, the entries above the leaf as
/// the address of the page's leaf entry, with the leaf as the last walk left it. An
/// access reads the leaf and goes without a walk when it is unchanged, so a leaf
/// rewritten in memory counts at once, and the tables above it count from the next walk
/// the kernel causes: every map, unmap and protect of a page drops the page's entry, as
/// Linux flushes after changing a page's tables. An entry a read's walk made does not
/// serve a write, which walks again to set the dirty state (SDM §4.8).
#[derive(Default)]
struct WalkCache {
    entries: [Option<CachedLeaf>; CACHE_ENTRIES],
}

/// What the cache keeps of a page's walk.
#[derive(Clone, Copy)]
struct CachedLeaf {
    /// The virtual page.
    page: u64,
    /// The physical frame of the page.
    frame: u64,
    /// Where the leaf entry is.
    leaf: u64,
    /// The leaf entry after the walk.
    entry: u64,
    /// Made by a write's walk: writes may use it.
    write: bool,
}

impl WalkCache {
    fn slot(va: u64) -> usize {
        (va >> 12) as usize % CACHE_ENTRIES
    }

    /// The frame of `va`'s page, when a kept walk serves a read or a `write` and its leaf
    /// entry is as the walk left it.
    fn lookup<M: PhysMem + ?Sized>(&self, mem: &M, va: u64, write: bool) -> Option<u64> {
        let e = self.entries[Self::slot(va)]?;
        let serves = e.page == va & !PAGE_OFFSET && (e.write || !write);
        (serves && mem.read_u64(e.leaf).is_ok_and(|now| now == e.entry)).then_some(e.frame)
    }

    /// Keeps the walk of `va`'s page, a read's or a `write`'s, that found `frame` through
    /// `leaf`.
    fn fill(&mut self, va: u64, frame: u64, leaf: LastEntry, write: bool) {
        self.entries[Self::slot(va)] = Some(CachedLeaf {
            page: va & !PAGE_OFFSET,
            frame,
            leaf: leaf.address,
            entry: leaf.entry,
            write,
        });
    }

    /// Drops the walk of `va`'s page, if kept.
    fn flush_page(&mut self, va: u64) {
        let slot = &mut self.entries[Self::slot(va)];
        if slot.is_some_and(|e| e.page == va & !PAGE_OFFSET) {
            *slot = None;
        }
    }
}
