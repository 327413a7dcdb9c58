//! The dirty-bitmap harvest of live migration (`IOMMU_HWPT_GET_DIRTY_BITMAP` at the
//! driver level): 1 GiB of a dirty-tracking domain mapped with 4 KiB pages, one page in
//! [`DIRTY_EVERY`] dirty, read out and cleared into a bitmap; against its baseline, the
//! same number of 64-bit words (the domain's 262,144 leaf entries, in the same tables)
//! read one by one.
//!
//! Between harvests, outside the timing, D is set again in the same leaves as the unit
//! sets it (an atomic OR); once, at set-up, the pages are written by a device through the
//! IOMMU instead, and the harvest must find exactly them. Every timed harvest is checked
//! the same way afterwards.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::container::IommuBackend;
use vsva_host::driver::{DirtyBitmap, HostIommu, VtdDomain};
use vsva_hw::dma::{DmaAccess, DmaPort};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_uapi::request::DmaMap;
use vsva_vtd::{addr::Gpa, addr::Hpa, addr::Iova, addr::SourceId, slpte::SlPte};

use super::{BenchError, Workload};

/// IOVA the harvest covers.
pub const HARVEST_BYTES: u64 = 1 << 30;
/// One page in this many is dirty at each harvest.
pub const DIRTY_EVERY: u64 = 64;

const SID: SourceId = SourceId::from_rid(0x0030);
/// Each MAP_DMA maps this much: less than 2 MiB, so the second level uses 4 KiB pages.
const PIECE: u64 = 1 << 20;

/// A dirty-tracking domain mapping `bytes` of VM memory with 4 KiB pages, its device
/// attached.
pub struct DirtyDomain {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Iommu>,
    // Dropped before the unit it holds.
    domain: Option<VtdDomain>,
    _unit: Arc<HostIommu>,
    ram_hpa: Hpa,
    ram: GuestMemoryMmap,
    bytes: u64,
    /// The leaf entry of every page, by page number.
    leaves: Vec<u64>,
}

impl DirtyDomain {
    /// Maps `bytes` (a multiple of 1 MiB), attaches the device, turns tracking on, has
    /// the device write one page in [`DIRTY_EVERY`] and checks that a harvest reports
    /// exactly those.
    pub fn new(bytes: u64) -> Result<Self, BenchError> {
        let mem = HostMemory::new(bytes + (256 << 20))?;
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let hw = Iommu::new(mem.clone(), IommuConfig::default())?;
        let unit = HostIommu::new(hw.clone(), frames.clone()).map_err(driver)?;
        let ram_hpa = frames.alloc_range(bytes, 2 << 20)?;
        let ram = mem.guest_memory(&[(Gpa(0), ram_hpa, bytes)])?;
        let mut d = DirtyDomain {
            mem,
            frames,
            hw,
            domain: None,
            _unit: unit.clone(),
            ram_hpa,
            ram,
            bytes,
            leaves: Vec::new(),
        };
        let mut domain = VtdDomain::new_dirty_tracking(&unit).map_err(driver)?;
        let base = d
            .ram
            .get_host_address(GuestAddress(0))
            .map_err(|e| BenchError::Check(e.to_string()))? as u64;
        for at in (0..bytes).step_by(PIECE as usize) {
            domain.map_dma(&DmaMap {
                iova: Iova(at),
                vaddr: base + at,
                size: PIECE,
                read: true,
                write: true,
            })?;
        }
        domain.attach_device(SID)?;
        domain.set_dirty_tracking(true).map_err(driver)?;
        let root = domain.second_level_root().0;
        let levels = domain.levels().levels();
        d.domain = Some(domain);
        d.leaves = (0..bytes / PAGE_SIZE)
            .map(|p| leaf_slot(&*d.mem, root, levels, p * PAGE_SIZE))
            .collect::<Result<_, _>>()?;
        // The device writes the pages; the harvest must find exactly them.
        for page in d.dirty_pages() {
            let iova = page * PAGE_SIZE;
            let t =
                d.hw.remap(SID, None, iova, DmaAccess::WRITE)
                    .map_err(|f| BenchError::Check(format!("device write at {iova:#x}: {f}")))?;
            d.mem.write(t.hpa_of(iova).0, &page.to_le_bytes())?;
        }
        let mut bitmap = vec![0u8; DirtyBitmap::bytes_needed(bytes, PAGE_SIZE) as usize];
        d.harvest(&mut bitmap)?;
        d.check(&bitmap)?;
        Ok(d)
    }

    /// The page numbers the device writes.
    fn dirty_pages(&self) -> impl Iterator<Item = u64> {
        (0..self.bytes / PAGE_SIZE).step_by(DIRTY_EVERY as usize)
    }

    fn domain(&self) -> Result<&VtdDomain, BenchError> {
        self.domain
            .as_ref()
            .ok_or_else(|| BenchError::Check("no domain".into()))
    }

    /// One `GET_DIRTY_BITMAP` of the whole range into `bitmap` (cleared first).
    fn harvest(&self, bitmap: &mut [u8]) -> Result<u64, BenchError> {
        bitmap.fill(0);
        let mut b = DirtyBitmap::new(0, self.bytes, PAGE_SIZE, bitmap).map_err(driver)?;
        self.domain()?
            .read_and_clear_dirty(&mut b, false)
            .map_err(driver)
    }

    /// Whether `bitmap` holds exactly the dirty pages.
    fn check(&self, bitmap: &[u8]) -> Result<(), BenchError> {
        let set: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        let want = self.dirty_pages().count() as u64;
        let all_there = self
            .dirty_pages()
            .all(|p| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0);
        if set != want || !all_there {
            return Err(BenchError::Check(format!(
                "the harvest reported {set} pages, not the {want} written"
            )));
        }
        Ok(())
    }

    /// Sets D in the dirty pages' leaves, as the unit does on a write.
    fn dirty_again(&self) -> Result<(), BenchError> {
        for p in self.dirty_pages() {
            self.mem.fetch_or_u64(self.leaves[p as usize], SlPte::D)?;
        }
        Ok(())
    }
}

impl Drop for DirtyDomain {
    fn drop(&mut self) {
        if let Some(mut d) = self.domain.take() {
            d.detach_device(SID);
        }
        self.mem.release_guest_memory(&self.ram);
        if let Err(e) = self.frames.free(self.ram_hpa) {
            tracing::error!("bench: freeing the dirty-tracking RAM: {e}");
        }
    }
}

fn driver(e: vsva_host::driver::DriverError) -> BenchError {
    BenchError::Host(e.into())
}

/// The address of the leaf (level-1) entry of `iova` in the second level at `root`.
fn leaf_slot<M: PhysMem + ?Sized>(
    mem: &M,
    root: u64,
    levels: u8,
    iova: u64,
) -> Result<u64, BenchError> {
    let mut table = root;
    for level in (2..=levels).rev() {
        let index = (iova >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        let e = SlPte(mem.read_u64(table + index * 8)?);
        if !e.present() || e.is_leaf(level) {
            return Err(BenchError::Check(format!(
                "{iova:#x} is not mapped with a 4 KiB page"
            )));
        }
        table = e.table_address();
    }
    Ok(table + ((iova >> 12) & 0x1ff) * 8)
}

/// One operation: a clearing harvest of the whole range; D is set again before each,
/// untimed, and each bitmap is checked.
pub struct Harvest<'a> {
    domain: &'a DirtyDomain,
    bitmap: Vec<u8>,
}

impl<'a> Harvest<'a> {
    /// Harvests of `domain`.
    pub fn new(domain: &'a DirtyDomain) -> Self {
        Harvest {
            domain,
            bitmap: vec![0u8; DirtyBitmap::bytes_needed(domain.bytes, PAGE_SIZE) as usize],
        }
    }
}

impl Workload for Harvest<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            self.domain.dirty_again()?;
            self.bitmap.fill(0);
            let mut b = DirtyBitmap::new(0, self.domain.bytes, PAGE_SIZE, &mut self.bitmap)
                .map_err(driver)?;
            let d = self.domain.domain()?;
            let start = Instant::now();
            d.read_and_clear_dirty(&mut b, false).map_err(driver)?;
            total += start.elapsed();
            self.domain.check(&self.bitmap)?;
        }
        Ok(total)
    }
}

/// The baseline: every leaf entry of the range read as a 64-bit word, one by one.
pub struct WordReads<'a> {
    domain: &'a DirtyDomain,
}

impl<'a> WordReads<'a> {
    /// Reads of `domain`'s leaves.
    pub fn new(domain: &'a DirtyDomain) -> Self {
        WordReads { domain }
    }
}

impl Workload for WordReads<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mem = &*self.domain.mem;
        let mut acc = 0u64;
        let start = Instant::now();
        for _ in 0..iters {
            for &slot in &self.domain.leaves {
                acc ^= mem.read_u64(slot)?;
            }
        }
        let t = start.elapsed();
        black_box(acc);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_harvest_finds_the_pages_and_the_baseline_reads_every_leaf() {
        let d = DirtyDomain::new(16 << 20).unwrap();
        assert_eq!(d.leaves.len(), 4096);
        let mut h = Harvest::new(&d);
        h.run(3).unwrap();
        // Without D set again, the next harvest finds nothing: the check fails.
        let mut bitmap = vec![0u8; DirtyBitmap::bytes_needed(16 << 20, PAGE_SIZE) as usize];
        assert_eq!(d.harvest(&mut bitmap).unwrap(), 0);
        assert!(d.check(&bitmap).is_err());
        WordReads::new(&d).run(2).unwrap();
    }
}
