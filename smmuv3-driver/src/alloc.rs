//! Where the driver's tables and queues come from.

/// Physically contiguous, naturally addressed memory for the stream table, CD tables and
/// queues (Linux's `dmam_alloc_coherent`). The driver clears what it gets.
pub trait DmaAlloc {
    /// `size` bytes aligned to `align` (a power of two), by address; `None` when none is
    /// left.
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64>;
    /// Gives back `size` bytes at `addr` that [`DmaAlloc::alloc`] returned.
    fn free(&mut self, addr: u64, size: u64);
}
