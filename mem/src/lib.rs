//! The memory an IOMMU model reads its tables from and writes results to.
//!
//! A physical IOMMU (VT-d or SMMUv3) reads host physical memory; a vIOMMU reads guest
//! physical memory. Walkers and table decoders of both architectures are written against
//! [`PhysMem`] so every model uses the same code.

/// A failed access to physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The access does not lie inside the memory.
    #[error("address {addr:#x}+{len:#x} is outside physical memory")]
    OutOfRange {
        /// First byte of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: u64,
    },
    /// An 8-byte access that is not 8-byte aligned.
    #[error("address {addr:#x} is not aligned to {align} bytes")]
    Unaligned {
        /// Address of the access.
        addr: u64,
        /// Alignment it needs, in bytes.
        align: u64,
    },
}

/// Byte-addressed physical memory with atomic 64-bit accesses for table entries.
///
/// Table entries are read and updated 64 bits at a time and atomically, as the hardware
/// does (VT-d §3.6.2 and §3.7.2: accessed/dirty updates are locked atomic operations).
pub trait PhysMem {
    /// Reads an 8-byte aligned little-endian 64-bit value.
    fn read_u64(&self, addr: u64) -> Result<u64, MemError>;

    /// Reads `out.len()` consecutive 8-byte aligned values from `addr`, each atomically as
    /// [`PhysMem::read_u64`] reads it (a table entry wider than 64 bits); fails if any of
    /// them would. A memory may check the whole range once.
    fn read_u64s(&self, addr: u64, out: &mut [u64]) -> Result<(), MemError> {
        for (i, q) in out.iter_mut().enumerate() {
            *q = self.read_u64(addr + 8 * i as u64)?;
        }
        Ok(())
    }

    /// Atomically ORs `bits` into the 8-byte aligned value at `addr`; returns the old value.
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError>;

    /// Atomically replaces the value at `addr` with `new` if it still equals `old`.
    /// Returns the value found.
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError>;

    /// Writes an 8-byte aligned little-endian 64-bit value.
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError>;

    /// Writes `words` to consecutive 8-byte aligned values from `addr`, in ascending order,
    /// each atomically as [`PhysMem::write_u64`] writes it (a table entry wider than 64
    /// bits); fails if any of them would. A memory may check the whole range once, before
    /// writing any.
    fn write_u64s(&self, addr: u64, words: &[u64]) -> Result<(), MemError> {
        for (i, q) in words.iter().enumerate() {
            self.write_u64(addr + 8 * i as u64, *q)?;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Copies `buf` to `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError>;
}

/// Forwards every access to the memory behind a reference or a shared pointer, so
/// `&M`, `Box<M>` and `Arc<M>` (and `Arc<dyn PhysMem>`) are memories too, without
/// wrapper types (as vm-device composes ownership with blanket impls).
macro_rules! forward_phys_mem {
    ($($ty:ty),*) => {$(
        impl<M: PhysMem + ?Sized> PhysMem for $ty {
            fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
                (**self).read_u64(addr)
            }
            fn read_u64s(&self, addr: u64, out: &mut [u64]) -> Result<(), MemError> {
                (**self).read_u64s(addr, out)
            }
            fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
                (**self).fetch_or_u64(addr, bits)
            }
            fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
                (**self).compare_exchange_u64(addr, old, new)
            }
            fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
                (**self).write_u64(addr, value)
            }
            fn write_u64s(&self, addr: u64, words: &[u64]) -> Result<(), MemError> {
                (**self).write_u64s(addr, words)
            }
            fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
                (**self).read(addr, buf)
            }
            fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
                (**self).write(addr, buf)
            }
        }
    )*};
}

forward_phys_mem!(&M, Box<M>, std::sync::Arc<M>);

/// A window of a larger memory: address `a` of the window is address `base + a` of the
/// memory behind it, for `a` below `size` (guest RAM that is one range of host memory, as
/// the guest's page-table code and the tests address it). Accesses that do not lie wholly
/// inside the window are out of range, reported with the window's own address.
#[derive(Clone, Copy, Debug)]
pub struct MemWindow<M> {
    mem: M,
    base: u64,
    size: u64,
}

impl<M: PhysMem> MemWindow<M> {
    /// The `size` bytes of `mem` from `base`.
    pub const fn new(mem: M, base: u64, size: u64) -> Self {
        MemWindow { mem, base, size }
    }

    /// Where `[addr, addr + len)` of the window lies in the memory behind it.
    fn at(&self, addr: u64, len: u64) -> Result<u64, MemError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(self.base + addr),
            _ => Err(MemError::OutOfRange { addr, len }),
        }
    }
}

impl<M: PhysMem> PhysMem for MemWindow<M> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.mem.read_u64(self.at(addr, 8)?)
    }
    fn read_u64s(&self, addr: u64, out: &mut [u64]) -> Result<(), MemError> {
        self.mem
            .read_u64s(self.at(addr, 8 * out.len() as u64)?, out)
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.mem.fetch_or_u64(self.at(addr, 8)?, bits)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        self.mem.compare_exchange_u64(self.at(addr, 8)?, old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.mem.write_u64(self.at(addr, 8)?, value)
    }
    fn write_u64s(&self, addr: u64, words: &[u64]) -> Result<(), MemError> {
        self.mem
            .write_u64s(self.at(addr, 8 * words.len() as u64)?, words)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(self.at(addr, buf.len() as u64)?, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.mem.write(self.at(addr, buf.len() as u64)?, buf)
    }
}

/// Guest RAM as the vIOMMU and the guest see it: vm-memory's `GuestMemoryMmap`, addressed
/// by guest physical address. 64-bit accesses are atomic operations on the host mapping of
/// the region that holds them; byte copies may span adjacent regions.
#[cfg(feature = "vm-memory")]
mod guest_ram {
    use super::{MemError, PhysMem};
    use std::sync::atomic::{AtomicU64, Ordering};
    use vm_memory::{
        Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
        GuestRegionMmap, MemoryRegionAddress,
    };

    /// The region that holds all of `[addr, addr + len)`, with `addr`'s offset in it; one
    /// region lookup and one bounds check, no error built on the way.
    fn within(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<(&GuestRegionMmap, u64)> {
        let region = mem.find_region(GuestAddress(addr))?;
        let offset = addr - region.start_addr().0;
        let end = offset.checked_add(len)?;
        (end <= region.len()).then_some((region, offset))
    }

    /// The atomic view of the 8 bytes at `addr`, which must lie inside one region and be
    /// 8-byte aligned both as a guest address and in the host mapping.
    fn atomic(mem: &GuestMemoryMmap, addr: u64) -> Result<&AtomicU64, MemError> {
        if addr % 8 != 0 {
            return Err(MemError::Unaligned { addr, align: 8 });
        }
        let (region, offset) = within(mem, addr, 8).ok_or(MemError::OutOfRange { addr, len: 8 })?;
        // `offset + 8` is inside the region's mapping (`within`), so the pointer is too.
        let ptr = region.as_ptr().wrapping_add(offset as usize);
        if ptr as usize % 8 != 0 {
            return Err(MemError::Unaligned { addr, align: 8 });
        }
        // SAFETY: the 8 bytes at `ptr` lie inside the region's mapping (checked above), which
        // lives as long as `mem` is borrowed, and `ptr` is 8-byte aligned. Guest RAM is shared
        // memory that is only accessed atomically or by byte copies.
        Ok(unsafe { AtomicU64::from_ptr(ptr.cast()) })
    }

    /// The atomic view of the `n` words from `addr` when they lie inside one region and are
    /// 8-byte aligned, both as guest addresses and in the host mapping.
    fn words(mem: &GuestMemoryMmap, addr: u64, n: usize) -> Option<&[AtomicU64]> {
        // A word slice is at most `isize::MAX` bytes: the length fits.
        let (region, offset) = within(mem, addr, 8 * n as u64)?;
        // `offset + 8 * n` is inside the region's mapping (`within`), so the pointer is too.
        let ptr = region.as_ptr().wrapping_add(offset as usize);
        if addr % 8 != 0 || ptr as usize % 8 != 0 {
            return None;
        }
        // SAFETY: the `8 * n` bytes at `ptr` lie inside the region's mapping (checked
        // above), which lives as long as `mem` is borrowed, and `ptr` is 8-byte aligned.
        // Guest RAM is shared memory that is only accessed atomically or by byte copies.
        Some(unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), n) })
    }

    /// The address of word `i` of the `n` from `addr`, for the word-by-word path.
    fn word_at(addr: u64, i: usize, n: usize) -> Result<u64, MemError> {
        addr.checked_add(8 * i as u64).ok_or(MemError::OutOfRange {
            addr,
            len: 8 * n as u64,
        })
    }

    /// Whether `[addr, addr + len)` is backed by guest RAM without a hole.
    fn check(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Result<(), MemError> {
        let out_of_range = MemError::OutOfRange {
            addr,
            len: len as u64,
        };
        if addr.checked_add(len as u64).is_none() {
            return Err(out_of_range);
        }
        if len == 0 {
            return Ok(());
        }
        if GuestMemoryBackend::check_range(mem, GuestAddress(addr), len) {
            Ok(())
        } else {
            Err(out_of_range)
        }
    }

    impl PhysMem for GuestMemoryMmap {
        fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
            Ok(atomic(self, addr)?.load(Ordering::Acquire))
        }

        /// One region lookup and one bounds check for the whole range (a root, context or
        /// PASID entry), each word still loaded atomically; a range that leaves its region,
        /// or an unaligned one, takes the per-word path, with the errors the default gives.
        fn read_u64s(&self, addr: u64, out: &mut [u64]) -> Result<(), MemError> {
            let Some(words) = words(self, addr, out.len()) else {
                let n = out.len();
                for (i, q) in out.iter_mut().enumerate() {
                    *q = self.read_u64(word_at(addr, i, n)?)?;
                }
                return Ok(());
            };
            for (q, w) in out.iter_mut().zip(words) {
                *q = w.load(Ordering::Acquire);
            }
            Ok(())
        }

        fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
            Ok(atomic(self, addr)?.fetch_or(bits, Ordering::AcqRel))
        }

        fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
            let a = atomic(self, addr)?;
            Ok(
                match a.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(v) | Err(v) => v,
                },
            )
        }

        fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
            atomic(self, addr)?.store(value, Ordering::Release);
            Ok(())
        }

        /// As `read_u64s`: one lookup for a range inside one region, each word a release
        /// store in ascending order; otherwise word by word.
        fn write_u64s(&self, addr: u64, values: &[u64]) -> Result<(), MemError> {
            let Some(words) = words(self, addr, values.len()) else {
                for (i, q) in values.iter().enumerate() {
                    self.write_u64(word_at(addr, i, values.len())?, *q)?;
                }
                return Ok(());
            };
            for (w, q) in words.iter().zip(values) {
                w.store(*q, Ordering::Release);
            }
            Ok(())
        }

        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
            // Inside one region (a table entry, a descriptor, a page): one bounds check and
            // one copy; a copy across regions, or a refused one, takes the general path.
            if let Some((region, offset)) = within(self, addr, buf.len() as u64) {
                if let Ok(slice) = region.get_slice(MemoryRegionAddress(offset), buf.len()) {
                    slice.copy_to(buf);
                    return Ok(());
                }
            }
            check(self, addr, buf.len())?;
            if buf.is_empty() {
                return Ok(());
            }
            self.read_slice(buf, GuestAddress(addr))
                .map_err(|_| MemError::OutOfRange {
                    addr,
                    len: buf.len() as u64,
                })
        }

        fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
            if let Some((region, offset)) = within(self, addr, buf.len() as u64) {
                if let Ok(slice) = region.get_slice(MemoryRegionAddress(offset), buf.len()) {
                    slice.copy_from(buf);
                    return Ok(());
                }
            }
            check(self, addr, buf.len())?;
            if buf.is_empty() {
                return Ok(());
            }
            self.write_slice(buf, GuestAddress(addr))
                .map_err(|_| MemError::OutOfRange {
                    addr,
                    len: buf.len() as u64,
                })
        }
    }

    #[cfg(test)]
    mod tests {
        use crate::{MemError, PhysMem};
        use vm_memory::{GuestAddress, GuestMemoryMmap};

        /// Two regions with a hole between them: [0x1000, 0x3000) and [0x3000, 0x4000)
        /// adjacent, then [0x8000, 0x9000).
        fn ram() -> GuestMemoryMmap {
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x1000), 0x2000),
                (GuestAddress(0x3000), 0x1000),
                (GuestAddress(0x8000), 0x1000),
            ])
            .unwrap()
        }

        #[test]
        fn atomics_are_little_endian_and_shared_with_byte_copies() {
            let mem = ram();
            mem.write_u64(0x1ff8, 0x0807_0605_0403_0201).unwrap();
            let mut b = [0u8; 8];
            mem.read(0x1ff8, &mut b).unwrap();
            assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(
                mem.fetch_or_u64(0x1ff8, 0xff00).unwrap(),
                0x0807_0605_0403_0201
            );
            assert_eq!(mem.read_u64(0x1ff8).unwrap(), 0x0807_0605_0403_ff01);
            assert_eq!(
                mem.compare_exchange_u64(0x1ff8, 1, 2).unwrap(),
                0x0807_0605_0403_ff01
            );
            assert_eq!(mem.read_u64(0x1ff8).unwrap(), 0x0807_0605_0403_ff01);
            assert_eq!(
                mem.compare_exchange_u64(0x1ff8, 0x0807_0605_0403_ff01, 7)
                    .unwrap(),
                0x0807_0605_0403_ff01
            );
            assert_eq!(mem.read_u64(0x1ff8).unwrap(), 7);
            // The last word of a region and the first of the next one.
            mem.write_u64(0x2ff8, 9).unwrap();
            mem.write_u64(0x3000, 10).unwrap();
            assert_eq!(mem.read_u64(0x8ff8).unwrap(), 0);
        }

        #[test]
        fn byte_copies_span_adjacent_regions_but_not_holes() {
            let mem = ram();
            let data: Vec<u8> = (0..32).collect();
            mem.write(0x2ff0, &data).unwrap();
            let mut back = [0u8; 32];
            mem.read(0x2ff0, &mut back).unwrap();
            assert_eq!(&back[..], &data[..]);
            assert_eq!(mem.read_u64(0x3000).unwrap(), 0x1716_1514_1312_1110);

            // A copy that runs into the hole changes nothing.
            let before = mem.read_u64(0x3ff8).unwrap();
            assert_eq!(
                mem.write(0x3ff8, &[0xaa; 16]),
                Err(MemError::OutOfRange {
                    addr: 0x3ff8,
                    len: 16
                })
            );
            assert_eq!(mem.read_u64(0x3ff8).unwrap(), before);
            assert_eq!(
                mem.read(u64::MAX - 3, &mut [0; 8]),
                Err(MemError::OutOfRange {
                    addr: u64::MAX - 3,
                    len: 8
                })
            );
            assert_eq!(mem.write(0x4000, &[]), Ok(()));
        }

        #[test]
        fn bad_atomics_are_refused() {
            let mem = ram();
            assert_eq!(
                mem.read_u64(0x1004),
                Err(MemError::Unaligned {
                    addr: 0x1004,
                    align: 8
                })
            );
            for addr in [0x0, 0x4000, 0x7ff8, 0x9000, !7u64] {
                assert_eq!(
                    mem.write_u64(addr, 1),
                    Err(MemError::OutOfRange { addr, len: 8 })
                );
                assert_eq!(
                    mem.fetch_or_u64(addr, 1),
                    Err(MemError::OutOfRange { addr, len: 8 })
                );
            }
        }

        #[test]
        fn a_word_must_not_straddle_a_region_end() {
            // A region whose length is not a multiple of 8: its last 4 bytes cannot hold a
            // word even though the guest address is aligned.
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x1004)]).unwrap();
            assert_eq!(
                mem.read_u64(0x2000),
                Err(MemError::OutOfRange {
                    addr: 0x2000,
                    len: 8
                })
            );
            assert_eq!(mem.read_u64(0x1ff8), Ok(0));
        }

        #[test]
        fn word_ranges_read_as_each_word_and_refuse_what_each_word_would() {
            let mem = ram();
            // Written as one range across two adjacent regions (word by word), and inside one.
            let values: Vec<u64> = (0..8).map(|i| 0x100 + i).collect();
            mem.write_u64s(0x2fe0, &values).unwrap();
            mem.write_u64s(0x3010, &values[6..]).unwrap();
            for (i, a) in (0x2fe0..0x3020).step_by(8).enumerate() {
                assert_eq!(mem.read_u64(a), Ok(0x100 + i as u64));
            }
            assert_eq!(
                mem.write_u64s(0x2fe4, &values),
                Err(MemError::Unaligned {
                    addr: 0x2fe4,
                    align: 8
                })
            );
            assert_eq!(
                mem.write_u64s(0x8ff8, &values[..2]),
                Err(MemError::OutOfRange {
                    addr: 0x9000,
                    len: 8
                })
            );
            // Inside one region, and across two adjacent ones (word by word).
            for addr in [0x2fe0, 0x2ff0, 0x3000] {
                let mut out = [0u64; 4];
                mem.read_u64s(addr, &mut out).unwrap();
                let each: Vec<u64> = (0..4)
                    .map(|i| mem.read_u64(addr + 8 * i).unwrap())
                    .collect();
                assert_eq!(out.to_vec(), each);
            }
            let mut out = [0u64; 2];
            assert_eq!(
                mem.read_u64s(0x2fe4, &mut out),
                Err(MemError::Unaligned {
                    addr: 0x2fe4,
                    align: 8
                })
            );
            // Into the hole after the second region: the first word outside fails.
            assert_eq!(
                mem.read_u64s(0x3ff8, &mut out),
                Err(MemError::OutOfRange {
                    addr: 0x4000,
                    len: 8
                })
            );
            assert_eq!(
                mem.read_u64s(!7u64, &mut out),
                Err(MemError::OutOfRange {
                    addr: !7u64,
                    len: 8
                })
            );
        }
    }
}

#[cfg(test)]
mod window_tests {
    use super::{MemError, MemWindow, PhysMem};
    use crate::testutil::TestMemory;

    #[test]
    fn a_window_offsets_every_access_and_refuses_what_leaves_it() {
        let mem = TestMemory::new(0x4000);
        let w = MemWindow::new(&mem, 0x1000, 0x2000);
        w.write_u64(0x8, 0xaa).unwrap();
        assert_eq!(mem.read_u64(0x1008), Ok(0xaa));
        assert_eq!(w.fetch_or_u64(0x8, 0x100), Ok(0xaa));
        assert_eq!(w.compare_exchange_u64(0x8, 0x1aa, 7), Ok(0x1aa));
        assert_eq!(mem.read_u64(0x1008), Ok(7));
        w.write(0x1ffc, &[1, 2, 3, 4]).unwrap();
        let mut b = [0; 4];
        mem.read(0x2ffc, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        // The last 8 bytes fit; one byte more does not, and nothing is written.
        assert_eq!(w.read_u64(0x1ff8), Ok(0x0403_0201_0000_0000));
        let out = Err(MemError::OutOfRange {
            addr: 0x1ffd,
            len: 4,
        });
        assert_eq!(w.write(0x1ffd, &[9; 4]), out);
        assert_eq!(
            w.read_u64(0x2000),
            Err(MemError::OutOfRange {
                addr: 0x2000,
                len: 8
            })
        );
        assert_eq!(
            w.read_u64(u64::MAX - 3),
            Err(MemError::OutOfRange {
                addr: u64::MAX - 3,
                len: 8
            })
        );
        assert_eq!(mem.read_u64(0x3000), Ok(0));
    }
}

/// Memory for unit tests, for this crate and (with the `testutil` feature) the IOMMU cores'.
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;
