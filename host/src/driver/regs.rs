//! The physical unit's registers as the shared driver reaches them.

use vsva_hw::iommu::Iommu;
use vsva_vtd::regs::RegError;
use vsva_vtd_driver::Registers;

/// MMIO of the physical VT-d model.
pub(crate) struct Mmio<'a>(pub &'a Iommu);

impl Registers for Mmio<'_> {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.0.mmio_read(offset, size)
    }

    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        self.0.mmio_write(offset, size, value)
    }
}
