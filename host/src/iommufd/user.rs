//! `copy_from_user` / `copy_to_user` for the user pointers iommufd structures carry
//! (`data_uptr`, `allowed_iovas`): the VMM's memory is what it has mapped of host memory
//! (its registered windows, [`HostMemory::resolve_user`]), so a pointer is resolved there
//! and anything else faults, whatever the VMM passes.

use vsva_hw::memory::HostMemory;
use vsva_mem::PhysMem;
use vsva_uapi::error::UapiError;

use super::error::IommufdError;

/// The `len` bytes at user address `uptr` (`-EFAULT` unless they lie in one window).
pub fn copy_from_user(mem: &HostMemory, uptr: u64, len: usize) -> Result<Vec<u8>, IommufdError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let hpa = mem
        .resolve_user(uptr, len as u64)
        .map_err(|_| IommufdError::Fault("user pointer"))?;
    let mut buf = vec![0u8; len];
    mem.read(hpa.0, &mut buf)
        .map_err(|_| IommufdError::Fault("user pointer"))?;
    Ok(buf)
}

/// Writes `bytes` at user address `uptr` (`-EFAULT` unless they lie in one window).
pub fn copy_to_user(mem: &HostMemory, uptr: u64, bytes: &[u8]) -> Result<(), IommufdError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let hpa = mem
        .resolve_user(uptr, bytes.len() as u64)
        .map_err(|_| IommufdError::Fault("user pointer"))?;
    mem.write(hpa.0, bytes)
        .map_err(|_| IommufdError::Fault("user pointer"))
}

/// Bytes of an entry array read from user memory at once: one window look-up for many
/// small entries, and a bounded buffer whatever `entry_len` the VMM names.
const CHUNK: usize = 4096;

/// Reads an array of `entry_num` entries of `entry_len` bytes (at least `known`) from
/// user address `uptr`, as the kernel's `iommu_copy_struct_from_user_array` does entry by
/// entry, but looking the user's windows up once per [`CHUNK`] bytes rather than once per
/// entry. `each` gets each entry's index and its first `known` bytes after the tail past
/// `known` is checked zero (E2BIG); the first error, its own or a fault, stops the array
/// after the entries before it were handed over.
pub fn for_each_user_entry<E: From<IommufdError>>(
    mem: &HostMemory,
    array: UserArray,
    known: usize,
    what: &'static str,
    mut each: impl FnMut(u32, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let len = array.entry_len as usize;
    debug_assert!(len >= known);
    if known > CHUNK {
        return Err(IommufdError::invalid(what, "entry structure above a chunk").into());
    }
    let per = (CHUNK / len.max(1)).max(1) as u32;
    // On the stack: an array costs no allocation, whatever its length.
    let mut buf = [0u8; CHUNK];
    let mut first = 0u32;
    while first < array.entry_num {
        let n = per.min(array.entry_num - first);
        let bytes = n as usize * len;
        // One look-up and one read for a chunk of small entries; entry by entry for a
        // large one, or when the chunk does not lie in one window, so that the entries
        // before the one that faults are still handed over.
        let chunk = (bytes <= CHUNK)
            .then(|| array.at(first, what).ok())
            .flatten()
            .and_then(|a| mem.resolve_user(a, bytes as u64).ok())
            .and_then(|hpa| mem.read(hpa.0, &mut buf[..bytes]).ok());
        if chunk.is_some() {
            for i in 0..n {
                let entry = &buf[i as usize * len..(i as usize + 1) * len];
                if entry[known..].iter().any(|&b| b != 0) {
                    return Err(IommufdError::from(UapiError::TrailingBytes {
                        what,
                        size: array.entry_len,
                        known,
                    })
                    .into());
                }
                each(first + i, &entry[..known])?;
            }
        } else {
            for i in first..first + n {
                let hpa = mem
                    .resolve_user(array.at(i, what)?, len as u64)
                    .map_err(|_| IommufdError::Fault("user pointer"))?;
                read_entry(mem, hpa.0, array.entry_len, &mut buf[..known], what)?;
                each(i, &buf[..known])?;
            }
        }
        first += n;
    }
    Ok(())
}

/// An array in user memory: `entry_num` entries of `entry_len` bytes from `uptr`.
#[derive(Clone, Copy, Debug)]
pub struct UserArray {
    pub uptr: u64,
    pub entry_len: u32,
    pub entry_num: u32,
}

impl UserArray {
    /// The user address of entry `i` (EFAULT past the end of the address space).
    fn at(&self, i: u32, what: &'static str) -> Result<u64, IommufdError> {
        u64::from(i)
            .checked_mul(u64::from(self.entry_len))
            .and_then(|off| self.uptr.checked_add(off))
            .ok_or(IommufdError::Fault(what))
    }
}

/// Reads the first `head.len()` bytes of the `size`-byte entry at `hpa` into `head` and
/// checks the rest is zero, a bounded piece at a time.
fn read_entry(
    mem: &HostMemory,
    hpa: u64,
    size: u32,
    head: &mut [u8],
    what: &'static str,
) -> Result<(), IommufdError> {
    let fault = |_| IommufdError::Fault("user pointer");
    mem.read(hpa, head).map_err(fault)?;
    let known = head.len();
    let mut piece = [0u8; 256];
    let mut off = known;
    while off < size as usize {
        let n = piece.len().min(size as usize - off);
        mem.read(hpa + off as u64, &mut piece[..n]).map_err(fault)?;
        if piece[..n].iter().any(|&b| b != 0) {
            return Err(UapiError::TrailingBytes { what, size, known }.into());
        }
        off += n;
    }
    Ok(())
}
