//! Guest-physical frame allocation over a range of guest RAM.
//!
//! The guest kernel's page allocator, reduced to what the model needs: single 4 KiB frames
//! for page tables and process pages, and physically contiguous runs for the IOMMU
//! driver's queues and PASID directory. Frames come back zeroed, as `__GFP_ZERO` pages do.
//! Counters let tests check that everything handed out was given back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_vtd::{addr::Gpa, builder::FrameSource};

/// The size of a guest frame.
pub const FRAME_SIZE: u64 = 4096;

const ZERO_FRAME: [u8; FRAME_SIZE as usize] = [0; FRAME_SIZE as usize];

/// Why a frame operation was refused. A refused operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The managed range is empty, not 4 KiB aligned, or not backed by guest RAM.
    #[error("frame range {start}+{len:#x} is empty, not 4 KiB aligned or not all guest RAM")]
    BadRange {
        /// First byte of the range.
        start: Gpa,
        /// Length of the range in bytes.
        len: u64,
    },
    /// A request for no frames.
    #[error("an allocation needs at least one frame")]
    ZeroPages,
    /// No free run of the requested length.
    #[error("out of guest frames: no free run of {pages} frames")]
    OutOfFrames {
        /// Length of the run asked for, in frames.
        pages: u64,
    },
    /// The address is not the start of an allocation.
    #[error("{0} is not the start of an allocated run of frames")]
    NotAllocated(Gpa),
    /// Guest RAM refused the zeroing write.
    #[error(transparent)]
    Memory(#[from] MemError),
}

#[derive(Debug, Default)]
struct State {
    /// Free runs: the address just past a run to its first frame's address. Adjacent
    /// runs are merged. Keyed by the end, so an allocation from the front of a run and a
    /// free that extends a run's front change a value, not a key.
    free: BTreeMap<u64, u64>,
    /// Allocated runs: first frame address to length in frames.
    allocated: BTreeMap<u64, u64>,
    allocated_frames: u64,
}

/// Allocates zeroed 4 KiB frames and contiguous runs of frames from one GPA range.
#[derive(Debug)]
pub struct GuestFrames {
    mem: Arc<GuestMemoryMmap>,
    start: Gpa,
    frames: u64,
    state: Mutex<State>,
}

impl GuestFrames {
    /// An allocator for the `len` bytes of guest RAM at `start` (both 4 KiB aligned, all of
    /// it backed by `mem`).
    pub fn new(mem: Arc<GuestMemoryMmap>, start: Gpa, len: u64) -> Result<Self, FrameError> {
        let bad = FrameError::BadRange { start, len };
        if len == 0 || !start.is_aligned(FRAME_SIZE) || len % FRAME_SIZE != 0 {
            return Err(bad);
        }
        let end = start.0.checked_add(len).ok_or(bad)?;
        let backed = usize::try_from(len)
            .is_ok_and(|n| GuestMemoryBackend::check_range(&*mem, GuestAddress(start.0), n));
        if !backed || end > (1 << 52) {
            return Err(bad);
        }
        let frames = len / FRAME_SIZE;
        let state = State {
            free: BTreeMap::from([(end, start.0)]),
            ..State::default()
        };
        Ok(GuestFrames {
            mem,
            start,
            frames,
            state: Mutex::new(state),
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The first address of the managed range.
    pub fn start(&self) -> Gpa {
        self.start
    }

    /// The number of frames managed.
    pub fn total_frames(&self) -> u64 {
        self.frames
    }

    /// The number of frames allocated now.
    pub fn allocated_frames(&self) -> u64 {
        self.state().allocated_frames
    }

    /// The number of frames free now.
    pub fn free_frames(&self) -> u64 {
        self.frames - self.allocated_frames()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One zeroed frame.
    pub fn alloc(&self) -> Result<Gpa, FrameError> {
        self.alloc_contiguous(1)
    }

    /// `pages` physically contiguous zeroed frames; returns the first. First fit.
    pub fn alloc_contiguous(&self, pages: u64) -> Result<Gpa, FrameError> {
        if pages == 0 {
            return Err(FrameError::ZeroPages);
        }
        let mut st = self.state();
        let (end, start) = st
            .free
            .iter()
            .find(|&(&end, &start)| (end - start) / FRAME_SIZE >= pages)
            .map(|(&e, &s)| (e, s))
            .ok_or(FrameError::OutOfFrames { pages })?;
        for i in 0..pages {
            self.mem.write(start + i * FRAME_SIZE, &ZERO_FRAME)?;
        }
        let rest = start + pages * FRAME_SIZE;
        if rest == end {
            st.free.remove(&end);
        } else if let Some(first) = st.free.get_mut(&end) {
            *first = rest;
        }
        st.allocated.insert(start, pages);
        st.allocated_frames += pages;
        Ok(Gpa(start))
    }

    /// Frees the run that [`alloc`](Self::alloc) or
    /// [`alloc_contiguous`](Self::alloc_contiguous) returned at `gpa`.
    pub fn free(&self, gpa: Gpa) -> Result<(), FrameError> {
        let mut st = self.state();
        let pages = st
            .allocated
            .remove(&gpa.0)
            .ok_or(FrameError::NotAllocated(gpa))?;
        st.allocated_frames -= pages;
        let end = gpa.0 + pages * FRAME_SIZE;
        // The free run just before, if any, ends at `gpa`: the freed run joins it.
        let start = st.free.remove(&gpa.0).unwrap_or(gpa.0);
        // The free run just after, if any, starts at `end`: it takes the joined run in
        // front of it; otherwise the joined run is a run of its own.
        match st.free.range_mut(end + 1..).next() {
            Some((_, first)) if *first == end => *first = start,
            _ => {
                st.free.insert(end, start);
            }
        }
        Ok(())
    }
}

/// Page-table frames for the vtd [`PageTableBuilder`](vsva_vtd::builder::PageTableBuilder).
impl FrameSource for &GuestFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        self.alloc().ok().map(|gpa| gpa.0)
    }

    fn free_table(&mut self, frame: u64) {
        if let Err(e) = self.free(Gpa(frame)) {
            tracing::warn!(%e, "guest frames: page-table frame not freed");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 1 MiB of guest RAM at GPA 0 and an allocator over [0x10000, 0x100000).
    pub(crate) fn ram_and_frames() -> (Arc<GuestMemoryMmap>, Arc<GuestFrames>) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let frames = GuestFrames::new(mem.clone(), Gpa(0x1_0000), 0xf_0000).unwrap();
        (mem, Arc::new(frames))
    }

    #[test]
    fn frames_are_zeroed_and_counted() {
        let (mem, frames) = ram_and_frames();
        assert_eq!(frames.total_frames(), 0xf0);
        let a = frames.alloc().unwrap();
        assert_eq!(a, Gpa(0x1_0000));
        mem.write(a.0, &[0xab; 4096]).unwrap();
        frames.free(a).unwrap();
        let b = frames.alloc().unwrap();
        assert_eq!(b, a);
        let mut buf = [1u8; 4096];
        mem.read(b.0, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        assert_eq!(frames.allocated_frames(), 1);
        assert_eq!(frames.free_frames(), 0xef);
    }

    #[test]
    fn refusals_change_nothing() {
        let (mem, frames) = ram_and_frames();
        let a = frames.alloc_contiguous(4).unwrap();
        assert_eq!(
            frames.free(Gpa(a.0 + FRAME_SIZE)),
            Err(FrameError::NotAllocated(Gpa(a.0 + FRAME_SIZE)))
        );
        assert_eq!(frames.alloc_contiguous(0), Err(FrameError::ZeroPages));
        assert_eq!(
            frames.alloc_contiguous(0xed),
            Err(FrameError::OutOfFrames { pages: 0xed })
        );
        assert_eq!(frames.allocated_frames(), 4);
        frames.free(a).unwrap();
        assert_eq!(frames.free(a), Err(FrameError::NotAllocated(a)));
        assert_eq!(frames.alloc_contiguous(0xf0).unwrap(), Gpa(0x1_0000));

        for (start, len) in [
            (0x1000, 0),
            (0x1800, 0x1000),
            (0x1000, 0x800),
            (0xf_f000, 0x2000),
        ] {
            assert_eq!(
                GuestFrames::new(mem.clone(), Gpa(start), len).unwrap_err(),
                FrameError::BadRange {
                    start: Gpa(start),
                    len
                }
            );
        }
    }

    #[test]
    fn page_table_builder_takes_and_returns_frames() {
        use vsva_vtd::{
            builder::MapFlags, builder::PageTableBuilder, builder::TableFormat,
            flpte::FlPagingMode, walk::PageSize,
        };
        let (mem, frames) = ram_and_frames();
        let fmt = TableFormat::FirstLevel(FlPagingMode::FourLevel);
        let mut b = PageTableBuilder::new(fmt, &*mem, &mut &*frames).unwrap();
        b.map(
            &*mem,
            &mut &*frames,
            0x40_0000,
            0x8000,
            PageSize::Size4K,
            MapFlags::READ,
        )
        .unwrap();
        assert_eq!(frames.allocated_frames(), 4);
        assert_eq!(b.destroy(&mut &*frames), 4);
        assert_eq!(frames.allocated_frames(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Runs never overlap, stay inside the range, and freeing everything merges the
        /// free list back into one run.
        #[test]
        fn runs_are_disjoint_and_merge_back(ops in proptest::collection::vec((1u64..9, any::<bool>()), 1..60)) {
            let (_, frames) = ram_and_frames();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (pages, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (start, _) = live.remove(live.len() / 2);
                    frames.free(Gpa(start)).unwrap();
                } else if let Ok(gpa) = frames.alloc_contiguous(pages) {
                    prop_assert!(gpa.0 >= 0x1_0000 && gpa.0 + pages * FRAME_SIZE <= 0x10_0000);
                    for &(s, n) in &live {
                        prop_assert!(gpa.0 + pages * FRAME_SIZE <= s || s + n * FRAME_SIZE <= gpa.0);
                    }
                    live.push((gpa.0, pages));
                }
                let used: u64 = live.iter().map(|&(_, n)| n).sum();
                prop_assert_eq!(frames.allocated_frames(), used);
            }
            for (start, _) in live {
                frames.free(Gpa(start)).unwrap();
            }
            prop_assert_eq!(frames.allocated_frames(), 0);
            prop_assert_eq!(frames.alloc_contiguous(0xf0).unwrap(), Gpa(0x1_0000));
        }
    }
}
