//! The baseline of the cold walks: a chain of dependent loads, one in each of `n` distinct
//! 4 KiB pages, as a page walk reads one entry per table. The chain stays warm in the CPU
//! caches, as the tables do in the walk measurements.

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::{BenchError, Workload};

/// Slots in a page.
const SLOTS: usize = 4096 / std::mem::size_of::<usize>();

/// `n` dependent loads per operation, in `n` distinct pages.
pub struct DependentLoads {
    chain: Box<[usize]>,
    /// Where the chain was left: the next operation starts there, so every load of every
    /// operation depends on the one before.
    at: usize,
    loads: usize,
}

impl DependentLoads {
    /// A chain through `pages` distinct pages (at least one).
    pub fn new(pages: usize) -> Self {
        let pages = pages.max(1);
        let mut chain = vec![0usize; (pages + 1) * SLOTS].into_boxed_slice();
        // The first slot index at a page boundary.
        let addr = chain.as_ptr() as usize;
        let first = (addr.next_multiple_of(4096) - addr) / std::mem::size_of::<usize>();
        // One slot per page, at an offset that differs from page to page (as table indices
        // do), each holding the index of the next page's slot.
        let slot = |p: usize| first + p * SLOTS + (p * 67 + 5) % SLOTS;
        for p in 0..pages {
            chain[slot(p)] = slot((p + 1) % pages);
        }
        DependentLoads {
            at: slot(0),
            chain,
            loads: pages,
        }
    }

    /// The loads per operation.
    pub fn loads(&self) -> usize {
        self.loads
    }
}

impl Workload for DependentLoads {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let total = iters * self.loads as u64;
        let mut i = self.at;
        let start = Instant::now();
        for _ in 0..total {
            i = self.chain[i];
        }
        let t = start.elapsed();
        self.at = black_box(i);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The distinct 4 KiB pages one operation visits.
    fn pages_visited(c: &DependentLoads) -> usize {
        let base = c.chain.as_ptr() as usize;
        let mut i = c.at;
        let mut pages = std::collections::BTreeSet::new();
        for _ in 0..c.loads {
            pages.insert((base + i * std::mem::size_of::<usize>()) / 4096);
            i = c.chain[i];
        }
        pages.len()
    }

    #[test]
    fn each_load_is_in_its_own_page() {
        for n in [1, 4, 24] {
            let c = DependentLoads::new(n);
            assert_eq!(pages_visited(&c), n);
            assert_eq!(c.loads(), n);
        }
    }

    #[test]
    fn an_operation_comes_back_to_where_it_started() {
        let mut c = DependentLoads::new(24);
        let at = c.at;
        c.run(3).unwrap();
        assert_eq!(c.at, at);
    }
}
