//! Random first-level tables for the x86 oracles: this crate's KVM test and
//! `vsva-qemu-oracle`'s x86-64 test build, damage and probe their tables with these, and
//! walk them with vsva's walker over a [`WalkerView`].
//!
//! The tables come from vsva's `PageTableBuilder`: 4 KiB, 2 MiB and 1 GiB pages clustered
//! so that they share tables, random R/W, U/S and XD, attribute and ignored bits in leaves
//! ([`leaf_extra_bits`]), and [`Tables::damage`] to entries on the way to a mapping.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vsva_vtd::{
    builder::FrameSource, builder::MapFlags, builder::PageTableBuilder, fault::FaultReason,
    flpte::FlPte, walk::FlConfig, walk::PageSize, walk::WalkRecord,
};

/// SplitMix64: small, seedable, good enough to spread probes.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (not 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True `p` times in 100.
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// One of `items` (not empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A number in `lo..=hi`.
    pub fn in_range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo + 1)) as u32
    }
}

/// The linear-address shift of a level's index (12 for level 1).
pub fn level_shift(level: u8) -> u32 {
    12 + 9 * (u32::from(level) - 1)
}

/// Map flags from the three rights.
pub fn map_flags(writable: bool, user: bool, executable: bool) -> MapFlags {
    let mut f = MapFlags::READ;
    if writable {
        f = f | MapFlags::WRITE;
    }
    if user {
        f = f | MapFlags::USER;
    }
    if executable {
        f = f | MapFlags::EXECUTE;
    }
    f
}

/// One mapping a table was asked for.
#[derive(Clone, Copy, Debug)]
pub struct Leaf {
    /// Its linear address.
    pub va: u64,
    /// Its page size.
    pub size: PageSize,
}

/// One random table and the VT-d configuration it is walked with.
#[derive(Debug)]
pub struct Tables {
    /// The builder that owns the table.
    pub builder: PageTableBuilder,
    /// The mappings made.
    pub leaves: Vec<Leaf>,
    /// How the walker walks it.
    pub cfg: FlConfig,
    /// What [`Tables::damage`] did, for reports.
    pub damage: Vec<String>,
}

/// Mappings a table is asked for.
pub const MAPPINGS: usize = 24;

impl Tables {
    /// An empty table (its builder's root) walked with `cfg`.
    pub fn new(builder: PageTableBuilder, cfg: FlConfig) -> Self {
        Tables {
            builder,
            leaves: Vec::new(),
            cfg,
            damage: Vec::new(),
        }
    }

    /// The paging levels.
    pub fn levels(&self) -> u8 {
        self.cfg.mode.levels()
    }

    /// `va` sign-extended from the mode's input width.
    pub fn canonical(&self, va: u64) -> u64 {
        let shift = 64 - self.cfg.mode.input_width();
        (((va << shift) as i64) >> shift) as u64
    }

    /// The top-level index of `va`.
    pub fn top_index(&self, va: u64) -> u64 {
        (va >> level_shift(self.levels())) & 511
    }

    /// Asks for [`MAPPINGS`] random mappings, at addresses `usable` allows, of frames
    /// `frame` draws for a page size; 40 % of them get [`leaf_extra_bits`]. Each level
    /// picks its index from a small pool, so the mappings share tables and damage to an
    /// upper entry covers several of them.
    pub fn populate<M, F>(
        &mut self,
        rng: &mut Rng,
        mem: &M,
        frames: &mut F,
        usable: &dyn Fn(u64) -> bool,
        mut frame: impl FnMut(&mut Rng, PageSize) -> u64,
    ) where
        M: PhysMem + ?Sized,
        F: FrameSource + ?Sized,
    {
        let levels = self.levels();
        let pools: BTreeMap<u8, Vec<u64>> = (1..=levels)
            .map(|l| {
                let n = if l == levels { 2 } else { 3 };
                let pool = (0..n)
                    .map(|_| loop {
                        let i = rng.below(512);
                        if l != levels || usable(self.canonical(i << level_shift(l))) {
                            break i;
                        }
                    })
                    .collect();
                (l, pool)
            })
            .collect();
        for _ in 0..MAPPINGS {
            let size = match rng.below(10) {
                0..=4 => PageSize::Size4K,
                5..=7 => PageSize::Size2M,
                _ => PageSize::Size1G,
            };
            let mut va = 0;
            for l in size.level()..=levels {
                let index = if l == size.level() && rng.percent(50) {
                    rng.below(512)
                } else {
                    rng.pick(&pools[&l])
                };
                va |= index << level_shift(l);
            }
            let va = self.canonical(va);
            let pa = frame(rng, size);
            let flags = map_flags(rng.percent(60), rng.percent(60), rng.percent(60));
            if self.builder.map(mem, frames, va, pa, size, flags).is_err() {
                continue; // already mapped, or a page of another size in the way
            }
            self.leaves.push(Leaf { va, size });
            if rng.percent(40) {
                let extra = leaf_extra_bits(rng, size);
                let slot = self
                    .builder
                    .entry_address(mem, va, size.level())
                    .expect("valid level")
                    .expect("just mapped");
                let entry = mem.read_u64(slot).expect("table in memory");
                self.builder
                    .write_entry(mem, va, size.level(), entry | extra)
                    .expect("just mapped");
            }
        }
    }

    /// Damages one entry on the path of a random mapping: not present, read-only,
    /// supervisor-only, execute-disable, a reserved bit (above the address width, PS in a
    /// PML4E/PML5E, the bits a 2 MiB or 1 GiB page reserves) or an ignored bit (62:52,
    /// 11:9, and D and G in non-leaf entries; `amd` CPUs reserve bit 8 in PML4Es and
    /// PML5Es, so it is left alone there).
    pub fn damage<M: PhysMem + ?Sized>(&mut self, rng: &mut Rng, mem: &M, amd: bool) {
        let Some(&leaf) = self
            .leaves
            .get(rng.below(self.leaves.len().max(1) as u64) as usize)
        else {
            return;
        };
        let level = rng.in_range(u32::from(leaf.size.level()), u32::from(self.levels())) as u8;
        let Ok(Some(slot)) = self.builder.entry_address(mem, leaf.va, level) else {
            return;
        };
        // An earlier damage may have sent the path outside memory.
        let Ok(entry) = mem.read_u64(slot) else {
            return;
        };
        if entry & FlPte::P == 0 {
            return;
        }
        let is_leaf = level == leaf.size.level();
        let width = u32::from(self.cfg.format.address_width());
        let (what, new) = match rng.below(7) {
            // Not present: every other bit is then ignored, reserved ones included.
            0 => (
                "not present",
                (entry | (rng.next_u64() & !FlPte::ADDR_MASK)) & !FlPte::P,
            ),
            1 => ("read-only", entry & !FlPte::RW),
            2 => ("supervisor-only", entry & !FlPte::US),
            3 => ("execute-disable", entry | FlPte::XD),
            4 => {
                let mut candidates = Vec::new();
                if width < 52 {
                    candidates.push(rng.in_range(width, 51));
                }
                match (level, is_leaf) {
                    (4 | 5, _) => candidates.push(7),
                    (2, true) => candidates.push(rng.in_range(13, 20)),
                    (3, true) if self.cfg.format.one_gib_pages() => {
                        candidates.push(rng.in_range(13, 29))
                    }
                    _ => {}
                }
                let Some(&bit) = candidates.get(rng.below(candidates.len().max(1) as u64) as usize)
                else {
                    return;
                };
                ("reserved bit", entry | 1 << bit)
            }
            _ => {
                let mut candidates = vec![rng.in_range(52, 62), rng.in_range(9, 11)];
                if !is_leaf {
                    candidates.push(6);
                    if !(amd && level >= 4) {
                        candidates.push(8);
                    }
                }
                ("ignored bit", entry | 1 << rng.pick(&candidates))
            }
        };
        self.builder
            .write_entry(mem, leaf.va, level, new)
            .expect("entry exists");
        self.damage.push(format!(
            "{what}: level {level} entry of {:#x} {entry:#x} -> {new:#x}",
            leaf.va
        ));
    }

    /// A random probe address: mostly inside a mapping, sometimes beside one (an absent
    /// entry at some level), sometimes anywhere; always where `usable` allows, canonical,
    /// and aligned down to `align`.
    pub fn probe_address(&self, rng: &mut Rng, usable: &dyn Fn(u64) -> bool, align: u64) -> u64 {
        let va = loop {
            let va = match (rng.below(10), self.leaves.is_empty()) {
                (0..=6, false) => {
                    let leaf = rng.pick(&self.leaves);
                    leaf.va + rng.below(leaf.size.bytes())
                }
                (7..=8, false) => {
                    let leaf = rng.pick(&self.leaves);
                    let level = rng.in_range(1, u32::from(self.levels())) as u8;
                    let shift = level_shift(level);
                    (leaf.va & !(511 << shift)) | rng.below(512) << shift
                }
                _ => rng.next_u64(),
            };
            let va = self.canonical(va);
            if usable(va) {
                break va;
            }
        };
        va & !(align - 1)
    }
}

/// Bits a leaf may carry that change nothing about the translation: A, D, G, PWT, PCD,
/// PAT, the software-available bits 11:9 and the ignored bits 62:52.
pub fn leaf_extra_bits(rng: &mut Rng, size: PageSize) -> u64 {
    let pat = if size == PageSize::Size4K {
        FlPte::PAT_4K
    } else {
        FlPte::PAT_LARGE
    };
    let candidates = [
        FlPte::A,
        FlPte::D,
        FlPte::G,
        FlPte::PWT,
        FlPte::PCD,
        pat,
        1 << 9,
        1 << 10,
        1 << 11,
        1 << rng.in_range(52, 62),
    ];
    (0..1 + rng.below(3)).fold(0, |acc, _| acc | rng.pick(&candidates))
}

/// The class of a page fault, on the walker's side and the CPU's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultClass {
    /// SFL.2; #PF with P clear.
    NotPresent,
    /// SFL.3; #PF with RSVD.
    Reserved,
    /// SGN.2, SGN.3, SGN.6; #PF with P and without RSVD.
    Protection,
}

/// The class of a walker fault, if it is a page-walk fault.
pub fn walker_class(reason: FaultReason) -> Option<FaultClass> {
    match reason {
        FaultReason::Sfl2 => Some(FaultClass::NotPresent),
        FaultReason::Sfl3 => Some(FaultClass::Reserved),
        FaultReason::Sgn2 | FaultReason::Sgn3 | FaultReason::Sgn6 => Some(FaultClass::Protection),
        _ => None,
    }
}

/// The class of a #PF error code (Intel SDM vol. 3 §4.7): RSVD first, since QEMU 7.2
/// reports reserved-bit faults with P clear.
pub fn cpu_class(error_code: u64) -> FaultClass {
    const PRESENT: u64 = 1 << 0;
    const RESERVED: u64 = 1 << 3;
    if error_code & RESERVED != 0 {
        FaultClass::Reserved
    } else if error_code & PRESENT == 0 {
        FaultClass::NotPresent
    } else {
        FaultClass::Protection
    }
}

/// The byte a walk reached, from its record, whether or not the request was allowed: the
/// last entry read, if it is a present leaf.
pub fn reached(rec: &WalkRecord, va: u64) -> Option<u64> {
    let last = rec.steps.last()?;
    let entry = FlPte(last.entry);
    let size = PageSize::from_level(last.level).filter(|_| entry.is_leaf(last.level))?;
    entry
        .present()
        .then(|| entry.page_address(size) | (va & (size.bytes() - 1)))
}

/// The entries of the table frame at `frame`.
pub fn read_frame<M: PhysMem + ?Sized>(mem: &M, frame: u64) -> [u64; 512] {
    let mut bytes = [0u8; 4096];
    mem.read(frame, &mut bytes).expect("table frame in memory");
    let mut entries = [0u64; 512];
    for (e, chunk) in entries.iter_mut().zip(bytes.chunks_exact(8)) {
        *e = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    entries
}

/// The walker's view of memory: private copies of the table frames, so that its
/// accessed/dirty updates land beside the CPU's instead of on top of them; any other
/// address reads through to the memory and cannot be written.
#[derive(Debug)]
pub struct WalkerView<'a, M: PhysMem + ?Sized> {
    mem: &'a M,
    tables: RefCell<HashMap<u64, Box<[u64; 512]>>>,
}

impl<'a, M: PhysMem + ?Sized> WalkerView<'a, M> {
    /// A view with copies of `frames` as they are in `mem`.
    pub fn new(mem: &'a M, frames: impl IntoIterator<Item = u64>) -> Self {
        let tables = frames
            .into_iter()
            .map(|f| (f, Box::new(read_frame(mem, f))))
            .collect();
        WalkerView {
            mem,
            tables: RefCell::new(tables),
        }
    }

    /// Copies the frame `frame` from memory into the view again.
    pub fn sync(&self, frame: u64) {
        let copy = read_frame(self.mem, frame);
        self.tables.borrow_mut().insert(frame, Box::new(copy));
    }

    /// The entry at `addr` in the view (a copied frame).
    pub fn entry(&self, addr: u64) -> u64 {
        self.tables.borrow()[&(addr & !0xfff)][(addr & 0xfff) as usize / 8]
    }

    fn update(&self, addr: u64, f: impl FnOnce(&mut u64) -> u64) -> Result<u64, MemError> {
        if addr % 8 != 0 {
            return Err(MemError::Unaligned { addr, align: 8 });
        }
        let mut tables = self.tables.borrow_mut();
        let table = tables
            .get_mut(&(addr & !0xfff))
            .ok_or(MemError::OutOfRange { addr, len: 8 })?;
        Ok(f(&mut table[(addr & 0xfff) as usize / 8]))
    }
}

impl<M: PhysMem + ?Sized> PhysMem for WalkerView<'_, M> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        if addr % 8 == 0 {
            if let Some(t) = self.tables.borrow().get(&(addr & !0xfff)) {
                return Ok(t[(addr & 0xfff) as usize / 8]);
            }
        }
        self.mem.read_u64(addr)
    }

    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.update(addr, |e| {
            let old = *e;
            *e |= bits;
            old
        })
    }

    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        self.update(addr, |e| {
            let found = *e;
            if found == old {
                *e = new;
            }
            found
        })
    }

    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.update(addr, |e| {
            *e = value;
            value
        })
        .map(|_| ())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = addr + i as u64;
            *b = self.read_u64(a & !7)?.to_le_bytes()[(a & 7) as usize];
        }
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        Err(MemError::OutOfRange {
            addr,
            len: buf.len() as u64,
        })
    }
}
