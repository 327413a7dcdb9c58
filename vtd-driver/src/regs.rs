//! How the driver reaches a remapping unit's registers.

use vsva_vtd::regs::RegError;

/// 4- and 8-byte reads and writes at offsets of a remapping unit's register page (VT-d
/// §10.4): the host driver's go to the physical unit, the guest driver's to the vIOMMU.
pub trait Registers {
    /// Reads `size` bytes at `offset`.
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError>;
    /// Writes the low `size` bytes of `value` at `offset`.
    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError>;

    /// Reads a 32-bit register.
    fn read32(&self, offset: u64) -> Result<u32, RegError> {
        self.read(offset, 4).map(|v| v as u32)
    }
}
