//! An IOAS's IOVA space (`io_pagetable.c`): the areas mapped, the ranges reserved by the
//! HWPTs built from it (outside their domain's aperture), the allowed ranges the IOVA
//! allocator is limited to, and the kernel's rules for each change. Pure bookkeeping: the
//! caller programs the domains after a check here succeeds.

use std::collections::BTreeMap;

use vsva_hw::memory::HostMemory;
use vsva_uapi::iommufd::{
    IommuIoasMap, IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_FLAGS, IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
};

use super::error::IommufdError;

/// The IOVA alignment every IOAS reports and requires (`iopt->iova_alignment`, the 4 KiB
/// page of the VT-d second level).
pub const IOVA_ALIGNMENT: u64 = 4096;

/// One mapped range (`struct iopt_area`): host memory from `hpa`, contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub length: u64,
    /// Host physical address of the first byte.
    pub hpa: u64,
    /// DMA may read.
    pub read: bool,
    /// DMA may write.
    pub write: bool,
}

impl Area {
    /// The last IOVA.
    pub fn last(&self) -> u64 {
        self.iova + (self.length - 1)
    }
}

/// The checks `IOMMU_IOAS_MAP` and `IOMMU_IOAS_MAP_FILE` make before anything is looked up
/// (`iommufd_ioas_map`, `iommufd_ioas_map_file`): unknown flags EOPNOTSUPP, an IOVA or
/// length of `U64_MAX` EOVERFLOW, neither readable nor writeable EINVAL.
pub(crate) fn check_map(
    what: &'static str,
    flags: u32,
    iova: u64,
    length: u64,
) -> Result<(), IommufdError> {
    if flags & !IOMMU_IOAS_MAP_FLAGS != 0 {
        return Err(IommufdError::not_supported(what, "unknown flags"));
    }
    if iova == u64::MAX || length == u64::MAX {
        return Err(IommufdError::Overflow(what));
    }
    if flags & (IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE) == 0 {
        return Err(IommufdError::invalid(
            what,
            "neither readable nor writeable",
        ));
    }
    Ok(())
}

/// The area an `IOMMU_IOAS_MAP` adds to `iopt` (`iommufd_ioas_map`): the VMM's memory at
/// `user_va` (resolved through its windows in `mem`, EFAULT otherwise; 4 KiB aligned,
/// EINVAL) at `iova` with FIXED_IOVA, else at an IOVA the allocator picks; READABLE
/// and/or WRITEABLE (EINVAL without either); unknown flags or a non-zero reserved field
/// EOPNOTSUPP; `iova`/`length` of `U64_MAX` EOVERFLOW. Nothing is changed.
pub fn map_area(iopt: &Iopt, mem: &HostMemory, cmd: &IommuIoasMap) -> Result<Area, IommufdError> {
    const WHAT: &str = "iommu_ioas_map";
    if cmd.__reserved != 0 {
        return Err(IommufdError::not_supported(WHAT, "reserved"));
    }
    check_map(WHAT, cmd.flags, cmd.iova, cmd.length)?;
    let iova = if cmd.flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0 {
        iopt.check_fixed(cmd.iova, cmd.length)?;
        cmd.iova
    } else {
        iopt.alloc_iova(cmd.length, Some(cmd.user_va))?
    };
    let hpa = mem
        .resolve_user(cmd.user_va, cmd.length)
        .map_err(|_| IommufdError::Fault("user_va"))?;
    if hpa.0 % IOVA_ALIGNMENT != 0 {
        return Err(IommufdError::invalid(WHAT, "user_va not 4 KiB aligned"));
    }
    Ok(Area {
        iova,
        length: cmd.length,
        hpa: hpa.0,
        read: cmd.flags & IOMMU_IOAS_MAP_READABLE != 0,
        write: cmd.flags & IOMMU_IOAS_MAP_WRITEABLE != 0,
    })
}

/// The IOVA space of one IOAS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Iopt {
    areas: BTreeMap<u64, Area>,
    /// Reserved `[start, last]` ranges with the object that reserved them.
    reserved: Vec<(u64, u64, u32)>,
    /// Allowed `[start, last]` ranges, sorted; empty allows everything.
    allowed: Vec<(u64, u64)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// `[iova, iova + length - 1]`, or EOVERFLOW (EINVAL for an empty range).
pub fn span(iova: u64, length: u64) -> Result<(u64, u64), IommufdError> {
    if length == 0 {
        return Err(IommufdError::invalid("IOVA range", "length 0"));
    }
    iova.checked_add(length - 1)
        .map(|last| (iova, last))
        .ok_or(IommufdError::Overflow("IOVA range"))
}

impl Iopt {
    /// The areas, by IOVA.
    pub fn areas(&self) -> impl Iterator<Item = &Area> {
        self.areas.values()
    }

    fn used(&self, r: (u64, u64)) -> bool {
        self.areas
            .range(..=r.1)
            .next_back()
            .is_some_and(|(_, a)| a.last() >= r.0)
    }

    fn is_reserved(&self, r: (u64, u64)) -> bool {
        self.reserved.iter().any(|&(s, l, _)| overlaps(r, (s, l)))
    }

    /// Whether a new area may go at `[iova, iova + length)` (`iopt_insert_area`): aligned
    /// (EINVAL), not overflowing (EOVERFLOW), clear of reserved ranges (EINVAL) and of
    /// other areas (EEXIST).
    pub fn check_fixed(&self, iova: u64, length: u64) -> Result<(), IommufdError> {
        if (iova | length) % IOVA_ALIGNMENT != 0 {
            return Err(IommufdError::invalid("IOVA range", "not 4 KiB aligned"));
        }
        let r = span(iova, length)?;
        if self.is_reserved(r) {
            return Err(IommufdError::invalid(
                "IOVA range",
                "intersects a reserved range",
            ));
        }
        if self.used(r) {
            return Err(IommufdError::Exists("IOVA range"));
        }
        Ok(())
    }

    /// An IOVA for `length` bytes (`iopt_alloc_iova`): the lowest free, within the
    /// allowed ranges when there are any, aligned to the smaller of `length` rounded up to
    /// a power of two and the alignment of `uptr` (kept so that large pages can map), at
    /// least [`IOVA_ALIGNMENT`] (EINVAL below it); ENOSPC when nothing fits.
    pub fn alloc_iova(&self, length: u64, uptr: Option<u64>) -> Result<u64, IommufdError> {
        span(0, length)?;
        if length % IOVA_ALIGNMENT != 0 {
            return Err(IommufdError::invalid("IOVA range", "not 4 KiB aligned"));
        }
        let pow2 = length.checked_next_power_of_two().unwrap_or(1 << 63);
        let align = match uptr {
            Some(u) if u != 0 => pow2.min(1u64 << u.trailing_zeros()),
            _ => pow2,
        };
        if align < IOVA_ALIGNMENT {
            return Err(IommufdError::invalid(
                "IOVA range",
                "user address not 4 KiB aligned",
            ));
        }
        let windows = if self.allowed.is_empty() {
            vec![(0, u64::MAX)]
        } else {
            self.allowed.clone()
        };
        let mut busy: Vec<(u64, u64)> = self.areas.values().map(|a| (a.iova, a.last())).collect();
        busy.extend(self.reserved.iter().map(|&(s, l, _)| (s, l)));
        busy.sort_unstable();
        for (start, last) in windows {
            let mut at = start.checked_next_multiple_of(align);
            while let Some(p) = at {
                let Some(end) = p.checked_add(length - 1).filter(|&e| e <= last) else {
                    break;
                };
                match busy.iter().find(|&&b| overlaps(b, (p, end))) {
                    None => return Ok(p),
                    Some(&(_, blast)) => {
                        at = blast
                            .checked_add(1)
                            .and_then(|n| n.checked_next_multiple_of(align));
                    }
                }
            }
        }
        Err(IommufdError::NoSpace("IOVA space"))
    }

    /// Adds an area checked with [`Iopt::check_fixed`] or placed by [`Iopt::alloc_iova`].
    pub fn insert(&mut self, area: Area) {
        self.areas.insert(area.iova, area);
    }

    /// The areas `[iova, iova + length)` removes (`iopt_unmap_iova`): every area inside
    /// it; ENOENT when one is cut by its ends or none is inside; `0, U64_MAX` takes every
    /// area and may find none (`iopt_unmap_all`).
    pub fn unmap_plan(&self, iova: u64, length: u64) -> Result<Vec<Area>, IommufdError> {
        if iova == 0 && length == u64::MAX {
            return Ok(self.areas.values().copied().collect());
        }
        let (start, last) = span(iova, length)?;
        let mut out = Vec::new();
        let first = self
            .areas
            .range(..=start)
            .next_back()
            .filter(|(_, a)| a.last() >= start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        for a in self.areas.range(first..=last).map(|(_, a)| a) {
            if a.iova < start || a.last() > last {
                return Err(IommufdError::NoEntry("IOVA range cuts a mapping"));
            }
            out.push(*a);
        }
        if out.is_empty() {
            return Err(IommufdError::NoEntry("nothing mapped in the IOVA range"));
        }
        Ok(out)
    }

    /// Removes the area at `iova`.
    pub fn remove(&mut self, iova: u64) -> Option<Area> {
        self.areas.remove(&iova)
    }

    /// The host memory behind `[iova, iova + length)` as pieces of areas, which must cover
    /// it without a hole (`iopt_get_pages`: ENOENT otherwise).
    pub fn pages(&self, iova: u64, length: u64) -> Result<Vec<Area>, IommufdError> {
        let (start, last) = span(iova, length)?;
        let mut out = Vec::new();
        let mut at = start;
        loop {
            let a = self
                .areas
                .range(..=at)
                .next_back()
                .map(|(_, a)| a)
                .filter(|a| a.last() >= at)
                .ok_or(IommufdError::NoEntry("IOVA range not fully mapped"))?;
            let end = a.last().min(last);
            out.push(Area {
                iova: at,
                length: end - at + 1,
                hpa: a.hpa + (at - a.iova),
                read: a.read,
                write: a.write,
            });
            if end == last {
                return Ok(out);
            }
            at = end + 1;
        }
    }

    /// The usable IOVA ranges (`IOMMU_IOAS_IOVA_RANGES`): the holes between reserved
    /// ranges.
    pub fn iova_ranges(&self) -> Vec<(u64, u64)> {
        let mut res: Vec<(u64, u64)> = self.reserved.iter().map(|&(s, l, _)| (s, l)).collect();
        res.sort_unstable();
        let mut out = Vec::new();
        let mut at = Some(0u64);
        for (s, l) in res {
            if let Some(a) = at {
                if s > a {
                    out.push((a, s - 1));
                }
                if l >= a {
                    at = l.checked_add(1);
                }
            }
        }
        if let Some(a) = at {
            out.push((a, u64::MAX));
        }
        out
    }

    /// Replaces the allowed ranges (`IOMMU_IOAS_ALLOW_IOVAS`): each `start < last`
    /// (EINVAL), none overlapping another (EINVAL), none intersecting a reserved range
    /// (EADDRINUSE). An empty list allows everything again.
    pub fn set_allowed(&mut self, ranges: &[(u64, u64)]) -> Result<(), IommufdError> {
        let mut sorted = Vec::with_capacity(ranges.len());
        for &(s, l) in ranges {
            if s >= l {
                return Err(IommufdError::invalid("allowed IOVA range", "start >= last"));
            }
            if sorted.iter().any(|&r| overlaps(r, (s, l))) {
                return Err(IommufdError::invalid(
                    "allowed IOVA range",
                    "overlaps another",
                ));
            }
            sorted.push((s, l));
        }
        if sorted.iter().any(|&r| self.is_reserved(r)) {
            return Err(IommufdError::AddrInUse("allowed IOVA range"));
        }
        sorted.sort_unstable();
        self.allowed = sorted;
        Ok(())
    }

    /// Reserves `[start, last]` for `owner` (`iopt_reserve_iova`): EADDRINUSE when an area
    /// or an allowed range intersects it.
    pub fn reserve(&mut self, owner: u32, start: u64, last: u64) -> Result<(), IommufdError> {
        let r = (start, last);
        if self.used(r) || self.allowed.iter().any(|&a| overlaps(a, r)) {
            return Err(IommufdError::AddrInUse("reserved IOVA range"));
        }
        self.reserved.push((start, last, owner));
        Ok(())
    }

    /// Drops every range `owner` reserved.
    pub fn unreserve(&mut self, owner: u32) {
        self.reserved.retain(|&(_, _, o)| o != owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = IOVA_ALIGNMENT;

    fn area(iova: u64, length: u64) -> Area {
        Area {
            iova,
            length,
            hpa: iova + 0x10_0000,
            read: true,
            write: true,
        }
    }

    #[test]
    fn unmap_needs_whole_areas() {
        let mut t = Iopt::default();
        t.insert(area(0x10000, 4 * P));
        t.insert(area(0x20000, P));
        assert_eq!(
            t.unmap_plan(0x10000 + P, P).unwrap_err().errno(),
            libc::ENOENT
        );
        assert_eq!(t.unmap_plan(0x30000, P).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(t.unmap_plan(0x10000, 0).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            t.unmap_plan(u64::MAX, 2).unwrap_err().errno(),
            libc::EOVERFLOW
        );
        assert_eq!(t.unmap_plan(0, 0x40000).unwrap().len(), 2);
        assert_eq!(t.unmap_plan(0, u64::MAX).unwrap().len(), 2);
        assert_eq!(Iopt::default().unmap_plan(0, u64::MAX).unwrap(), vec![]);
    }

    #[test]
    fn reserved_and_allowed_ranges() {
        let mut t = Iopt::default();
        t.reserve(1, 1 << 48, u64::MAX).unwrap();
        assert_eq!(t.iova_ranges(), vec![(0, (1 << 48) - 1)]);
        assert_eq!(t.check_fixed(1 << 48, P).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            t.set_allowed(&[(0, 1 << 48)]).unwrap_err().errno(),
            libc::EADDRINUSE
        );
        assert_eq!(t.set_allowed(&[(5, 5)]).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            t.set_allowed(&[(0, 0x2000), (0x1000, 0x3000)])
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        t.set_allowed(&[(0x40000, 0x7ffff)]).unwrap();
        assert_eq!(t.alloc_iova(P, Some(0x1000)).unwrap(), 0x40000);
        assert_eq!(
            t.reserve(2, 0x50000, 0x50fff).unwrap_err().errno(),
            libc::EADDRINUSE
        );
        t.unreserve(1);
        assert_eq!(t.iova_ranges(), vec![(0, u64::MAX)]);
    }

    proptest! {
        /// Whatever is mapped, an allocated IOVA is aligned, inside an allowed range, and
        /// clear of every area and reserved range; ENOSPC only when no aligned slot is free.
        #[test]
        fn allocated_iovas_are_free_and_aligned(
            maps in proptest::collection::vec((0u64..64, 1u64..8), 0..12),
            len_pages in 1u64..16,
            uptr_shift in 12u32..24,
        ) {
            let mut t = Iopt::default();
            t.set_allowed(&[(0, 64 * P * 2 - 1)]).unwrap();
            for (at, n) in maps {
                if t.check_fixed(at * P, n * P).is_ok() {
                    t.insert(area(at * P, n * P));
                }
            }
            let length = len_pages * P;
            match t.alloc_iova(length, Some(1 << uptr_shift)) {
                Ok(iova) => {
                    let align = length.next_power_of_two().min(1 << uptr_shift);
                    prop_assert_eq!(iova % align, 0);
                    prop_assert!(iova + length - 1 < 128 * P);
                    prop_assert!(t.check_fixed(iova, length).is_ok());
                }
                Err(e) => {
                    prop_assert_eq!(e.errno(), libc::ENOSPC);
                    let align = length.next_power_of_two().min(1 << uptr_shift);
                    let mut p = 0;
                    while p + length <= 128 * P {
                        prop_assert!(t.check_fixed(p, length).is_err());
                        p += align;
                    }
                }
            }
        }
    }
}
