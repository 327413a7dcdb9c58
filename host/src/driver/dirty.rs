//! Dirty tracking over the second level (VT-d 3.x §3.7.2, §9.8: with SLADE set in the
//! PASID entry the unit sets D in the leaf that maps each page it writes), read out the
//! way iommufd asks for it: `IOMMU_HWPT_GET_DIRTY_BITMAP`'s bitmap, one bit per
//! `page_size` bytes of IOVA from the range's start, little-endian, in a user buffer
//! (`iova_bitmap`), filled by `intel_iommu_read_and_clear_dirty`'s walk, which tests
//! and clears D leaf by leaf.
//!
//! The walk is [`crate::harvest`]'s over second-level entries: a range costs one 64-bit
//! read per present leaf plus its tables' entries above.

use vsva_mem::PhysMem;
use vsva_vtd::{slpte::SlLevels, slpte::SlPte};

use super::error::DriverError;
use crate::harvest::{DirtyFormat, DirtyWalk, Slot};

/// The IOVA alignment of a bitmap range: the smallest page the second level maps
/// (iommufd's `iopt->iova_alignment`).
const IOVA_ALIGNMENT: u64 = 4096;

/// A dirty bitmap for the range `[iova, iova + length)`: bit `n` (bit `n % 8` of byte
/// `n / 8`, the little-endian 64-bit words of `iommu_hwpt_get_dirty_bitmap.data`) stands
/// for the `page_size` bytes at `iova + n * page_size`. Recording only sets bits; the
/// caller clears the buffer beforehand, as iommufd's users do.
#[derive(Debug)]
pub struct DirtyBitmap<'a> {
    iova: u64,
    /// The range's last byte.
    last: u64,
    shift: u32,
    bytes: &'a mut [u8],
}

impl<'a> DirtyBitmap<'a> {
    /// The bytes a bitmap of `length` bytes of IOVA at `page_size` granularity takes: a
    /// whole number of 64-bit words (0 for a range the checks of [`DirtyBitmap::new`]
    /// refuse).
    pub fn bytes_needed(length: u64, page_size: u64) -> u64 {
        if page_size == 0 {
            return 0;
        }
        (length / page_size).div_ceil(64) * 8
    }

    /// Checks a bitmap range as iommufd does (`iommufd_check_iova_range`): an empty range
    /// or one that is not aligned to 4 KiB or to `page_size`, or a `page_size` that is not
    /// a power of two, is EINVAL; a range that wraps is EOVERFLOW. Returns the bytes its
    /// bitmap takes ([`DirtyBitmap::bytes_needed`]).
    pub fn check_range(iova: u64, length: u64, page_size: u64) -> Result<u64, DriverError> {
        const WHAT: &str = "dirty bitmap range";
        if length == 0 {
            return Err(DriverError::invalid(WHAT, "empty"));
        }
        let last = iova
            .checked_add(length - 1)
            .ok_or(DriverError::Overflow { iova, length })?;
        let end = last.wrapping_add(1);
        if (iova | end) % IOVA_ALIGNMENT != 0 {
            return Err(DriverError::invalid(WHAT, "not aligned to 4 KiB"));
        }
        if !page_size.is_power_of_two() {
            return Err(DriverError::invalid(
                WHAT,
                format!("page size {page_size:#x} is not a power of two"),
            ));
        }
        if (iova | end) & (page_size - 1) != 0 {
            return Err(DriverError::invalid(
                WHAT,
                format!("not aligned to the page size {page_size:#x}"),
            ));
        }
        Ok(Self::bytes_needed(length, page_size))
    }

    /// A bitmap over `bytes` for `[iova, iova + length)` at `page_size` granularity, the
    /// range checked by [`DirtyBitmap::check_range`]; a buffer shorter than
    /// [`DirtyBitmap::bytes_needed`] is EFAULT, as the kernel's copy out would fault.
    pub fn new(
        iova: u64,
        length: u64,
        page_size: u64,
        bytes: &'a mut [u8],
    ) -> Result<Self, DriverError> {
        let needed = Self::check_range(iova, length, page_size)?;
        if (bytes.len() as u64) < needed {
            return Err(DriverError::Memory(format!(
                "dirty bitmap buffer of {} bytes, {needed} needed",
                bytes.len()
            )));
        }
        Ok(DirtyBitmap {
            iova,
            last: iova + (length - 1),
            shift: page_size.trailing_zeros(),
            bytes,
        })
    }

    /// The range's first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The range's last byte.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether the bit of the page holding `iova` is set (false outside the range).
    pub fn is_dirty(&self, iova: u64) -> bool {
        if iova < self.iova || iova > self.last {
            return false;
        }
        let bit = (iova - self.iova) >> self.shift;
        self.bytes[(bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    /// Sets the bits of every page that `[start, start + len)` overlaps inside the range
    /// (`iommu_dirty_bitmap_record`).
    pub fn record(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = start.saturating_add(len - 1).min(self.last);
        let start = start.max(self.iova);
        if start > last {
            return;
        }
        let first_bit = (start - self.iova) >> self.shift;
        let last_bit = (last - self.iova) >> self.shift;
        let mut bit = first_bit;
        while bit <= last_bit {
            let byte = (bit / 8) as usize;
            if bit % 8 == 0 && last_bit - bit >= 7 {
                // Whole bytes at once: a large page at a small granularity is many bits.
                let whole = ((last_bit - bit + 1) / 8) as usize;
                self.bytes[byte..byte + whole].fill(0xff);
                bit += whole as u64 * 8;
            } else {
                self.bytes[byte] |= 1 << (bit % 8);
                bit += 1;
            }
        }
    }
}

/// What a harvest found: the covering range of the leaves whose D it cleared (for the
/// IOTLB flush that must follow, `iommu_iotlb_gather_add_range`), and their count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Harvest {
    /// The first and last byte of IOVA covered by the cleared leaves.
    pub cleared: Option<(u64, u64)>,
    /// The number of dirty leaves seen.
    pub dirty: u64,
}

/// Tests D in every present leaf of the second level at `root` (`levels` deep) that maps a
/// byte of `[start, last]`, calling `record(page_iova, page_bytes)` for each leaf with D
/// set, and with `clear` clears it (`dma_sl_pte_test_and_clear_dirty`).
pub(crate) fn harvest<M: PhysMem + ?Sized>(
    mem: &M,
    root: u64,
    levels: SlLevels,
    start: u64,
    last: u64,
    clear: bool,
    record: &mut dyn FnMut(u64, u64),
) -> Result<Harvest, DriverError> {
    let top = levels.levels();
    let last = last.min((1u64 << levels.input_width()) - 1);
    let mut cleared: Option<(u64, u64)> = None;
    let mut widen = |iova: u64, span: u64| {
        let page_last = iova + (span - 1);
        cleared = Some(match cleared {
            Some((lo, hi)) => (lo.min(iova), hi.max(page_last)),
            None => (iova, page_last),
        });
    };
    let mut walk = DirtyWalk {
        start,
        last,
        clear,
        record,
        cleaned: &mut widen,
        dirty: 0,
    };
    if start <= last {
        walk.visit::<SecondLevel, M>(mem, root, top, 0)?;
    }
    let dirty = walk.dirty;
    Ok(Harvest { cleared, dirty })
}

/// The second level as [`DirtyFormat`]: levels count down to 1, D is bit 9.
struct SecondLevel;

impl DirtyFormat for SecondLevel {
    fn shift(level: u8) -> u32 {
        12 + 9 * (u32::from(level) - 1)
    }

    fn below(level: u8) -> u8 {
        level - 1
    }

    fn slot(entry: u64, level: u8) -> Slot {
        let pte = SlPte(entry);
        if !pte.present() {
            Slot::Invalid
        } else if pte.is_leaf(level) {
            Slot::Leaf
        } else {
            Slot::Table(pte.table_address())
        }
    }

    fn dirty(entry: u64) -> bool {
        entry & SlPte::D != 0
    }

    fn cleaned(entry: u64) -> u64 {
        entry & !SlPte::D
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_as_iommufd_checks_them() {
        let mut buf = [0u8; 64];
        let errno = |iova, length, page_size, buf: &mut [u8]| {
            DirtyBitmap::new(iova, length, page_size, buf)
                .map(|_| 0)
                .unwrap_or_else(|e| e.errno())
        };
        assert_eq!(errno(0, 0, 4096, &mut buf), libc::EINVAL);
        assert_eq!(
            errno(u64::MAX - 4095, 8192, 4096, &mut buf),
            libc::EOVERFLOW
        );
        assert_eq!(errno(0x800, 4096, 2048, &mut buf), libc::EINVAL);
        assert_eq!(errno(0, 0x1800, 2048, &mut buf), libc::EINVAL);
        assert_eq!(errno(0, 4096, 0, &mut buf), libc::EINVAL);
        assert_eq!(errno(0, 3 * 4096, 3 * 4096, &mut buf), libc::EINVAL);
        assert_eq!(errno(0x1000, 0x2000, 0x2000, &mut buf), libc::EINVAL);
        // 65 pages need two words.
        assert_eq!(errno(0, 65 * 4096, 4096, &mut buf[..8]), libc::EFAULT);
        assert_eq!(errno(0, 65 * 4096, 4096, &mut buf[..16]), 0);
        assert_eq!(DirtyBitmap::bytes_needed(65 * 4096, 4096), 16);
        assert_eq!(DirtyBitmap::bytes_needed(64 * 4096, 4096), 8);
        // The top of the address space: the end wraps to 0, which is aligned.
        assert_eq!(errno(u64::MAX - 4095, 4096, 4096, &mut buf), 0);
    }

    #[test]
    fn recording_sets_exactly_the_bits_of_the_overlapped_pages() {
        let mut buf = [0u8; 32];
        let mut b = DirtyBitmap::new(0x10_0000, 128 * 2048, 2048, &mut buf).unwrap();
        // A 4 KiB page is two 2 KiB bits; a range before or after the bitmap is nothing.
        b.record(0x10_1000, 4096);
        b.record(0, 0x10_0000);
        b.record(0x10_0000 + 128 * 2048, 4096);
        assert!(b.is_dirty(0x10_1000) && b.is_dirty(0x10_1800));
        assert!(!b.is_dirty(0x10_0800) && !b.is_dirty(0x10_2000));
        // A large page overlapping the end sets every bit up to the end, whole bytes too.
        b.record(0x10_0000 + 100 * 2048, 1 << 21);
        for n in 0..128u64 {
            let want = n == 2 || n == 3 || n >= 100;
            assert_eq!(b.is_dirty(0x10_0000 + n * 2048), want, "bit {n}");
        }
        assert_eq!(buf[0], 0b1100);
        assert_eq!(buf[12], 0b1111_0000);
        assert_eq!(&buf[13..16], &[0xff; 3]);
        assert_eq!(&buf[16..], &[0; 16]);
    }
}
