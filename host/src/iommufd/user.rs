//! `copy_from_user` / `copy_to_user` for the user pointers iommufd structures carry
//! (`data_uptr`, `allowed_iovas`): the VMM's memory is what it has mapped of host memory
//! (its registered windows, [`HostMemory::resolve_user`]), so a pointer is resolved there
//! and anything else faults, whatever the VMM passes.

use vsva_hw::HostMemory;
use vsva_vtd::PhysMem;

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
