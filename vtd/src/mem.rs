//! The memory a VT-d implementation reads its tables from and writes results to.
//!
//! The physical IOMMU reads host physical memory; the vIOMMU reads guest physical memory.
//! Walkers and table decoders are written against this trait so both use the same code.

/// A failed access to physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The access does not lie inside the memory.
    #[error("address {addr:#x}+{len:#x} is outside physical memory")]
    OutOfRange { addr: u64, len: u64 },
    /// An 8-byte access that is not 8-byte aligned.
    #[error("address {addr:#x} is not aligned to {align} bytes")]
    Unaligned { addr: u64, align: u64 },
}

/// Byte-addressed physical memory with atomic 64-bit accesses for table entries.
///
/// Table entries are read and updated 64 bits at a time and atomically, as the hardware
/// does (VT-d §3.6.2 and §3.7.2: accessed/dirty updates are locked atomic operations).
pub trait PhysMem {
    /// Reads an 8-byte aligned little-endian 64-bit value.
    fn read_u64(&self, addr: u64) -> Result<u64, MemError>;

    /// Atomically ORs `bits` into the 8-byte aligned value at `addr`; returns the old value.
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError>;

    /// Atomically replaces the value at `addr` with `new` if it still equals `old`.
    /// Returns the value found.
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError>;

    /// Writes an 8-byte aligned little-endian 64-bit value.
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError>;

    /// Copies `buf.len()` bytes from `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Copies `buf` to `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError>;
}
