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

/// The tables of one process.
pub(super) enum Tables {
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
        Ok(match arch {
            Arch::X86_64(mode) => Tables::X86 {
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
                Tables::Aarch64 {
                    builder: TableBuilder::stage1(&cfg),
                    root: root.0,
                    cfg,
                }
            }
        })
    }

    pub(super) fn arch(&self) -> Arch {
        match self {
            Tables::X86 { mode, .. } => Arch::X86_64(*mode),
            Tables::Aarch64 { .. } => Arch::Aarch64,
        }
    }

    /// The top-level table: CR3's or TTBR0's address.
    pub(super) fn root(&self) -> u64 {
        match self {
            Tables::X86 { builder, .. } => builder.root(),
            Tables::Aarch64 { root, .. } => *root,
        }
    }

    /// Table frames held, the top level included.
    pub(super) fn table_frames(&self) -> usize {
        match self {
            Tables::X86 { builder, .. } => builder.table_frames(),
            Tables::Aarch64 { builder, .. } => builder.tables().len() + 1,
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
        match self {
            Tables::X86 { builder, .. } => Ok(builder.map(
                mem,
                &mut &*frames,
                va,
                pa,
                PageSize::Size4K,
                prot.map_flags(),
            )?),
            Tables::Aarch64 { builder, .. } => {
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
        match self {
            Tables::X86 { builder, .. } => builder.unmap(mem, va, PageSize::Size4K).map(|_| ())?,
            Tables::Aarch64 { builder, .. } => {
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
        match self {
            Tables::X86 { builder, .. } => {
                builder.protect(mem, va, PageSize::Size4K, prot.map_flags())?
            }
            Tables::Aarch64 { builder, .. } => {
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
        match self {
            Tables::X86 { builder, .. } => {
                let m = builder.lookup(mem, va).ok()??;
                Some((m.page, m.size.bytes()))
            }
            Tables::Aarch64 { builder, .. } => {
                let m = builder.lookup(mem, va).ok()??;
                Some((m.base, m.size.bytes()))
            }
        }
    }

    /// The CPU's walk for a user access (`write` or a read), setting the accessed and
    /// dirty state the architecture's hardware sets; the output address, or `None` for a
    /// fault.
    pub(super) fn cpu_walk<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        write: bool,
    ) -> Option<u64> {
        match self {
            Tables::X86 { builder, mode } => {
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
                walk_first_level(mem, &cfg, va, access, &mut ())
                    .ok()
                    .map(|t| t.output)
            }
            Tables::Aarch64 { cfg, .. } => {
                let access = vsva_smmuv3::walk::AccessRequest {
                    write,
                    instruction: false,
                    privileged: false,
                };
                walk_stage1(mem, cfg, va, access, &mut ())
                    .ok()
                    .map(|t| t.output)
            }
        }
    }

    /// Frees every table frame, the top level included.
    pub(super) fn destroy(self, frames: &GuestFrames) {
        match self {
            Tables::X86 { builder, .. } => {
                builder.destroy(&mut &*frames);
            }
            Tables::Aarch64 { builder, root, .. } => {
                for &f in builder.tables() {
                    let _ = frames.free(vsva_vtd::addr::Gpa(f));
                }
                let _ = frames.free(vsva_vtd::addr::Gpa(root));
            }
        }
    }
}
