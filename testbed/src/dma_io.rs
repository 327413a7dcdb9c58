//! An emulated device's reads and writes through vm-memory (`IommuMemory` over an IOMMU
//! address space, or any other `GuestMemory`): the bytes are gathered from, or scattered
//! to, the slices the range translates to.

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Reads `len` bytes at `addr` of `mem`.
pub fn read<M: GuestMemory>(mem: &M, addr: u64, len: usize) -> Result<Vec<u8>, GuestMemoryError> {
    let mut out = vec![0u8; len];
    let mut at = 0;
    for slice in mem.get_slices(GuestAddress(addr), len, Permissions::Read)? {
        at += slice?.copy_to(&mut out[at..]);
    }
    Ok(out)
}

/// Writes `data` at `addr` of `mem`.
pub fn write<M: GuestMemory>(mem: &M, addr: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
    let mut at = 0;
    for slice in mem.get_slices(GuestAddress(addr), data.len(), Permissions::Write)? {
        let slice = slice?;
        slice.copy_from(&data[at..at + slice.len()]);
        at += slice.len();
    }
    Ok(())
}
