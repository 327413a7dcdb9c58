//! Dirty tracking of a second-level domain against the physical VT-d model: the kernel
//! selftest's `iommufd_dirty_tracking` sequences restated at the driver level
//! (enforce_dirty, set_dirty_tracking, device_dirty_capability, get_dirty_bitmap and
//! get_dirty_bitmap_no_clear, with page sizes and bitmap buffer offsets), the flushes that
//! keep a harvested page trackable through the IOTLB and the device TLB, nested entries,
//! and a property: the harvested bitmaps are exactly the pages the device wrote.

use std::collections::BTreeSet;
use std::sync::Arc;
use vsva_mem::PhysMem;

use proptest::prelude::*;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::container::IommuBackend;
use vsva_host::driver::{DirtyBitmap, DriverError, HostIommu, VtdDomain, RID_PASID};
use vsva_hw::dma::regs::CTRL_ATS_EN;
use vsva_hw::dma::{
    CompletionRequest, Descriptor, DmaAccess, DmaEngine, DmaEngineConfig, DmaPort, Operation,
};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_uapi::request::{BindGpasid, DmaMap};
use vsva_vtd::{addr::Gpa, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId};

const SID: SourceId = SourceId::from_rid(0x0028);

struct Rig {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Iommu>,
    unit: Arc<HostIommu>,
    hpa: Hpa,
    ram: GuestMemoryMmap,
}

impl Rig {
    /// A unit (SLADS as `slads` says) and `ram` bytes of VM memory at a 2 MiB aligned HPA.
    fn new(slads: bool, ram: u64) -> Rig {
        let mem = HostMemory::new(256 << 20).unwrap();
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let mut config = IommuConfig::default();
        config.caps.slads = slads;
        let hw = Iommu::new(mem.clone(), config).unwrap();
        let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
        let hpa = frames.alloc_range(ram, 2 << 20).unwrap();
        let ram = mem.guest_memory(&[(Gpa(0), hpa, ram)]).unwrap();
        Rig {
            mem,
            frames,
            hw,
            unit,
            hpa,
            ram,
        }
    }

    /// A dirty-tracking domain with `size` bytes of VM memory mapped at IOVA 0 and the
    /// device attached.
    fn domain(&self, size: u64) -> VtdDomain {
        let mut d = VtdDomain::new_dirty_tracking(&self.unit).unwrap();
        d.map_dma(&self.map(0, size)).unwrap();
        d.attach_device(SID).unwrap();
        d
    }

    fn map(&self, iova: u64, size: u64) -> DmaMap {
        DmaMap {
            iova: Iova(iova),
            vaddr: self.ram.get_host_address(GuestAddress(iova)).unwrap() as u64,
            size,
            read: true,
            write: true,
        }
    }

    /// The device writes 8 bytes at `iova` (an untranslated request).
    fn write(&self, iova: u64, value: u64) {
        let t = self.hw.remap(SID, None, iova, DmaAccess::WRITE).unwrap();
        self.mem
            .write(t.hpa_of(iova).0, &value.to_le_bytes())
            .unwrap();
    }

    /// The device reads 8 bytes at `iova`.
    fn read(&self, iova: u64) -> u64 {
        let t = self.hw.remap(SID, None, iova, DmaAccess::READ).unwrap();
        let mut b = [0u8; 8];
        self.mem.read(t.hpa_of(iova).0, &mut b).unwrap();
        u64::from_le_bytes(b)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.mem.release_guest_memory(&self.ram);
        self.frames.free(self.hpa).unwrap();
    }
}

/// The dirty pages (page_size granularity) of `[iova, iova + length)`, as IOVAs.
fn harvest(d: &VtdDomain, iova: u64, length: u64, page_size: u64, no_clear: bool) -> BTreeSet<u64> {
    let mut buf = vec![0u8; DirtyBitmap::bytes_needed(length, page_size) as usize];
    let mut b = DirtyBitmap::new(iova, length, page_size, &mut buf).unwrap();
    d.read_and_clear_dirty(&mut b, no_clear).unwrap();
    (0..length / page_size)
        .map(|n| iova + n * page_size)
        .filter(|&a| b.is_dirty(a))
        .collect()
}

fn errno<T>(r: Result<T, DriverError>) -> i32 {
    r.map(|_| 0).unwrap_or_else(|e| e.errno())
}

/// `device_dirty_capability` and `enforce_dirty`: the unit reports the capability from
/// ECAP.SLADS, and a dirty-tracking domain on a unit without it is EOPNOTSUPP; a domain
/// allocated without dirty tracking refuses both operations with EOPNOTSUPP.
#[test]
fn capability_follows_slads_and_only_dirty_domains_track() {
    let with = Rig::new(true, 4 << 20);
    assert!(with.unit.dirty_tracking_supported());
    let without = Rig::new(false, 4 << 20);
    assert!(!without.unit.dirty_tracking_supported());
    assert_eq!(
        errno(VtdDomain::new_dirty_tracking(&without.unit)),
        libc::EOPNOTSUPP
    );
    assert_eq!(without.unit.domain_ids_in_use(), 0, "nothing left behind");
    let mut plain = VtdDomain::new(&with.unit).unwrap();
    assert!(!plain.dirty_tracking_capable());
    assert_eq!(errno(plain.set_dirty_tracking(true)), libc::EOPNOTSUPP);
    let mut buf = [0u8; 8];
    let mut b = DirtyBitmap::new(0, 64 * PAGE_SIZE, PAGE_SIZE, &mut buf).unwrap();
    assert_eq!(
        errno(plain.read_and_clear_dirty(&mut b, false)),
        libc::EOPNOTSUPP
    );
}

/// `set_dirty_tracking`: enable and disable set and clear SLADE in the device's RID_PASID
/// entry (and twice the same is fine); reading the bitmap while tracking is off is EINVAL;
/// a device attached while tracking is on gets SLADE, and without SLADE writes leave no
/// trace.
#[test]
fn set_dirty_tracking_sets_slade_in_every_entry() {
    let rig = Rig::new(true, 4 << 20);
    let mut d = rig.domain(1 << 20);
    let slade = || rig.unit.pasid_entry(SID, RID_PASID).unwrap().slade;
    assert!(!slade());
    rig.write(0x3000, 1);
    let mut buf = [0u8; 64];
    let mut b = DirtyBitmap::new(0, 1 << 20, PAGE_SIZE, &mut buf).unwrap();
    assert_eq!(errno(d.read_and_clear_dirty(&mut b, false)), libc::EINVAL);
    d.set_dirty_tracking(true).unwrap();
    d.set_dirty_tracking(true).unwrap();
    assert!(slade() && d.dirty_tracking());
    assert!(harvest(&d, 0, 1 << 20, PAGE_SIZE, false).is_empty());
    rig.write(0x3000, 2);
    assert_eq!(
        harvest(&d, 0, 1 << 20, PAGE_SIZE, false),
        BTreeSet::from([0x3000])
    );
    d.set_dirty_tracking(false).unwrap();
    d.set_dirty_tracking(false).unwrap();
    assert!(!slade() && !d.dirty_tracking());
    // Re-attached while tracking: the new RID_PASID entry has SLADE.
    d.set_dirty_tracking(true).unwrap();
    d.detach_device(SID);
    d.attach_device(SID).unwrap();
    assert!(slade());
}

/// Enabling clears what was dirty before: a page written while tracking was off and D
/// still set from an earlier round is not reported.
#[test]
fn enabling_starts_from_a_clean_second_level() {
    let rig = Rig::new(true, 4 << 20);
    let mut d = rig.domain(1 << 20);
    d.set_dirty_tracking(true).unwrap();
    rig.write(0x5000, 1);
    d.set_dirty_tracking(false).unwrap();
    d.set_dirty_tracking(true).unwrap();
    assert!(harvest(&d, 0, 1 << 20, PAGE_SIZE, false).is_empty());
    // And the flush that came with it lets the next write set D again.
    rig.write(0x5000, 2);
    assert_eq!(
        harvest(&d, 0, 1 << 20, PAGE_SIZE, false),
        BTreeSet::from([0x5000])
    );
}

/// `get_dirty_bitmap` and `get_dirty_bitmap_no_clear`: the device writes every even page
/// of the buffer; the bitmap has exactly the even bits, at 4 KiB and at 2 KiB granularity
/// (two bits per page), in a user buffer at offset 0, a page offset and an unaligned
/// offset, with the bytes around it untouched. Read again, it is empty; with NO_CLEAR it
/// stays until a clearing read.
#[test]
fn get_dirty_bitmap_reports_the_written_pages_once_unless_no_clear() {
    const BUFFER: u64 = 0x8_0000;
    const LEN: u64 = 128 * PAGE_SIZE;
    let rig = Rig::new(true, 4 << 20);
    let mut d = rig.domain(1 << 20);
    d.set_dirty_tracking(true).unwrap();
    for page_size in [PAGE_SIZE, PAGE_SIZE / 2] {
        for offset in [0usize, 2048, 0xff1] {
            for no_clear in [false, true] {
                for page in (0..LEN / PAGE_SIZE).step_by(2) {
                    rig.write(BUFFER + page * PAGE_SIZE + 8, page);
                }
                let needed = DirtyBitmap::bytes_needed(LEN, page_size) as usize;
                let mut user = vec![0x5au8; offset + needed + 64];
                user[offset..offset + needed].fill(0);
                let reported = |user: &mut [u8]| {
                    let mut b = DirtyBitmap::new(
                        BUFFER,
                        LEN,
                        page_size,
                        &mut user[offset..offset + needed],
                    )
                    .unwrap();
                    d.read_and_clear_dirty(&mut b, no_clear).unwrap()
                };
                assert_eq!(reported(&mut user), LEN / PAGE_SIZE / 2);
                let per_page = (PAGE_SIZE / page_size) as usize;
                for bit in 0..(LEN / page_size) as usize {
                    let set = user[offset + bit / 8] & (1 << (bit % 8)) != 0;
                    assert_eq!(
                        set,
                        (bit / per_page) % 2 == 0,
                        "bit {bit} {page_size} {offset}"
                    );
                }
                assert!(user[..offset].iter().all(|&b| b == 0x5a));
                assert!(user[offset + needed..].iter().all(|&b| b == 0x5a));
                user[offset..offset + needed].fill(0);
                let again = reported(&mut user);
                if no_clear {
                    assert_eq!(again, LEN / PAGE_SIZE / 2, "NO_CLEAR leaves D set");
                    assert_eq!(
                        harvest(&d, BUFFER, LEN, PAGE_SIZE, false).len() as u64,
                        LEN / PAGE_SIZE / 2
                    );
                } else {
                    assert_eq!(again, 0, "read already");
                    assert!(user[offset..offset + needed].iter().all(|&b| b == 0));
                }
                assert!(harvest(&d, BUFFER, LEN, PAGE_SIZE, false).is_empty());
            }
        }
    }
}

/// A harvest flushes the IOTLB over what it cleared: a page written, harvested, and
/// written again through its cached translation is reported again. Without the flush the
/// IOTLB entry, filled with D set, would serve the second write without setting D.
#[test]
fn a_page_written_again_after_a_harvest_is_reported_again() {
    let rig = Rig::new(true, 4 << 20);
    let mut d = rig.domain(1 << 20);
    d.set_dirty_tracking(true).unwrap();
    for round in 0..3u64 {
        rig.write(0x7000, round);
        rig.write(0x7008, round);
        assert_eq!(
            harvest(&d, 0, 1 << 20, PAGE_SIZE, false),
            BTreeSet::from([0x7000]),
            "round {round}"
        );
    }
    // A read through the cached translation dirties nothing.
    assert_eq!(rig.read(0x7000), 2);
    assert!(harvest(&d, 0, 1 << 20, PAGE_SIZE, false).is_empty());
}

/// The same through the device TLB: an ATS device caches the write permission it got when
/// D was set, so the harvest's device-TLB invalidation is what makes its next write come
/// back for a translation that sets D.
#[test]
fn an_ats_device_writing_again_after_a_harvest_is_reported_again() {
    let rig = Rig::new(true, 4 << 20);
    // The device is there before it is attached: the driver reads its ATS capability then.
    let dev = Arc::new(DmaEngine::new(DmaEngineConfig::new(SID), rig.hw.clone()).unwrap());
    rig.hw.attach_endpoint(dev.clone());
    let mut d = rig.domain(1 << 20);
    d.set_dirty_tracking(true).unwrap();
    dev.enable(CTRL_ATS_EN).unwrap();
    let fill = |dst: u64, pattern: u64| {
        let desc = Descriptor {
            pasid: None,
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::None,
            op: Operation::Fill {
                pattern,
                dst,
                size: 64,
            },
        };
        dev.portal_write(0, &desc.encode()).unwrap();
        dev.process();
    };
    for round in 1..=3u64 {
        fill(0x9000, round);
        assert!(dev.devtlb_len() > 0, "the device cached the translation");
        assert_eq!(
            harvest(&d, 0, 1 << 20, PAGE_SIZE, false),
            BTreeSet::from([0x9000]),
            "round {round}"
        );
        let mut b = [0u8; 8];
        rig.mem.read(rig.hpa.0 + 0x9000, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), round);
    }
    rig.hw.detach_endpoint(SID);
}

/// A 2 MiB page is one leaf: a write anywhere in it reports every page of it that lies in
/// the bitmap's range.
#[test]
fn a_large_page_is_reported_whole_within_the_range() {
    let rig = Rig::new(true, 4 << 20);
    let mut d = rig.domain(2 << 20);
    assert_eq!(
        d.lookup(Iova(0)).map(|(_, s)| s),
        Some(vsva_vtd::walk::PageSize::Size2M)
    );
    d.set_dirty_tracking(true).unwrap();
    rig.write(0x12_3458, 7);
    let got = harvest(&d, 0x10_0000, 0x4_0000, PAGE_SIZE, true);
    assert_eq!(got.len(), 0x40);
    assert_eq!(got.first(), Some(&0x10_0000));
    let got = harvest(&d, 0, 2 << 20, 1 << 21, false);
    assert_eq!(got, BTreeSet::from([0]));
}

/// Nested entries bound over the domain get SLADE with it: at bind time while tracking,
/// and when tracking is turned off and on.
#[test]
fn nested_entries_follow_the_domains_dirty_tracking() {
    let rig = Rig::new(true, 4 << 20);
    // A device with 20-bit PASIDs on the bus: binding needs them (F15).
    let dev = Arc::new(DmaEngine::new(DmaEngineConfig::new(SID), rig.hw.clone()).unwrap());
    rig.hw.attach_endpoint(dev);
    let mut d = rig.domain(1 << 20);
    let hpasid = Pasid::new(9).unwrap();
    let bind = BindGpasid {
        hpasid,
        gpasid: Some(hpasid),
        gpgd: Gpa(0x2000),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    };
    d.set_dirty_tracking(true).unwrap();
    d.bind_gpasid(&bind).unwrap();
    let slade = |p| rig.unit.pasid_entry(SID, p).unwrap().slade;
    assert!(slade(hpasid) && slade(RID_PASID));
    d.set_dirty_tracking(false).unwrap();
    assert!(!slade(hpasid) && !slade(RID_PASID));
    d.set_dirty_tracking(true).unwrap();
    assert!(slade(hpasid) && slade(RID_PASID));
    d.unbind_gpasid(&bind);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Rounds of random device writes and reads over 256 pages mapped with 4 KiB pages,
    /// each followed by a harvest of a random sub-range (sometimes NO_CLEAR): every
    /// harvest reports exactly the pages of its range written since they were last
    /// cleared, and a final harvest of everything reports exactly the rest.
    #[test]
    fn harvests_report_exactly_the_pages_written(
        rounds in proptest::collection::vec(
            (
                proptest::collection::vec((0u64..256, any::<bool>()), 0..40),
                0u64..256,
                1u64..=256,
                any::<bool>(),
            ),
            1..6,
        ),
    ) {
        let rig = Rig::new(true, 4 << 20);
        let mut d = rig.domain(1 << 20);
        d.set_dirty_tracking(true).unwrap();
        let mut pending = BTreeSet::new();
        for (ops, first, count, no_clear) in rounds {
            for (page, write) in ops {
                let iova = page * PAGE_SIZE + 16;
                if write {
                    rig.write(iova, page);
                    pending.insert(page * PAGE_SIZE);
                } else {
                    rig.read(iova);
                }
            }
            let count = count.min(256 - first);
            let (start, len) = (first * PAGE_SIZE, count.max(1) * PAGE_SIZE);
            if start + len > 256 * PAGE_SIZE {
                continue;
            }
            let want: BTreeSet<u64> =
                pending.range(start..start + len).copied().collect();
            prop_assert_eq!(harvest(&d, start, len, PAGE_SIZE, no_clear), want.clone());
            if !no_clear {
                pending.retain(|p| !want.contains(p));
            }
        }
        prop_assert_eq!(harvest(&d, 0, 256 * PAGE_SIZE, PAGE_SIZE, false), pending);
        prop_assert!(harvest(&d, 0, 256 * PAGE_SIZE, PAGE_SIZE, false).is_empty());
    }
}
