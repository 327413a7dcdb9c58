//! The PCIe-level contract between a DMA device and the IOMMU in front of it.
//!
//! The device sees the IOMMU as [`DmaPort`]: untranslated requests (address type
//! "untranslated", translated by the IOMMU on the way), ATS translation requests (PCIe ATS,
//! VT-d §4.2) and translated requests to the HPAs they return, and PRI page requests (PCIe
//! PRI, VT-d §7.4). The IOMMU sees the device as [`AtsEndpoint`]: it forwards device-TLB
//! invalidations (VT-d §6.5.2.5, §6.5.2.6) and page group responses (VT-d §6.5.2.9) to
//! it.

use std::fmt;

use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::{addr::Hpa, addr::Pasid, addr::SourceId, fault::FaultReason, inv_desc::AddrRange};

use crate::drain::RequestDrain;
use crate::memory::{HostMemory, PAGE_SIZE};

/// The kind of a DMA access, as the request carries it (PCIe request type plus the PASID
/// prefix's Execute-Requested and Privileged-Mode-Requested bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DmaAccess {
    /// A read request.
    pub read: bool,
    /// A write request.
    pub write: bool,
    /// Execute-Requested (ER) in the PASID prefix.
    pub execute: bool,
    /// Privileged-Mode-Requested (PMR) in the PASID prefix: a supervisor access.
    pub privileged: bool,
}

impl DmaAccess {
    /// A user-mode read.
    pub const READ: DmaAccess = DmaAccess {
        read: true,
        write: false,
        execute: false,
        privileged: false,
    };
    /// A user-mode write.
    pub const WRITE: DmaAccess = DmaAccess {
        read: false,
        write: true,
        execute: false,
        privileged: false,
    };

    /// The same access in privileged (supervisor) mode or not.
    pub const fn with_privileged(self, privileged: bool) -> Self {
        DmaAccess { privileged, ..self }
    }
}

impl fmt::Display for DmaAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |on, c| if on { c } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            flag(self.read, 'r'),
            flag(self.write, 'w'),
            flag(self.execute, 'x'),
            flag(self.privileged, 's')
        )
    }
}

/// A failed translation, as the IOMMU reports it to the device.
///
/// `reason` is the VT-d fault reason code of the condition (§7.1.3). `recoverable` says
/// whether the device may resolve it with a page request: the fault is a
/// not-present/permission fault on a translation whose PASID entry (or context entry, for
/// requests without PASID) enables page requests (§7.4). A non-recoverable fault is recorded
/// by the IOMMU in its fault recording registers and is final for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA translation fault, reason {reason:#04x}{}", if *.recoverable { " (recoverable)" } else { "" })]
pub struct DmaFault {
    /// VT-d fault reason code (§7.1.3); 0 for an ATS completion that grants too little.
    pub reason: u8,
    /// Whether a page request may resolve the fault.
    pub recoverable: bool,
}

impl DmaFault {
    /// The scalable-mode fault condition the reason code stands for, if any.
    pub const fn condition(&self) -> Option<FaultReason> {
        FaultReason::from_code(self.reason)
    }
}

/// The translation of one page: the page of the device address space containing the
/// requested address maps to `size` contiguous bytes at `hpa` (both aligned to `size`).
///
/// The fields are private so that a translation is always a naturally aligned power-of-two
/// page of at least 4 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaTranslation {
    hpa: Hpa,
    size: u64,
}

impl DmaTranslation {
    /// A page of `size` bytes (a power of two, at least 4 KiB) at `hpa` (aligned to `size`).
    pub const fn new(hpa: Hpa, size: u64) -> Option<Self> {
        if size.is_power_of_two() && size >= PAGE_SIZE && hpa.is_aligned(size) {
            Some(DmaTranslation { hpa, size })
        } else {
            None
        }
    }

    /// The host physical address of the page.
    pub const fn hpa(&self) -> Hpa {
        self.hpa
    }

    /// The page size in bytes.
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// The first device address of the page that contains `addr`.
    pub const fn page_start(&self, addr: u64) -> u64 {
        addr & !(self.size - 1)
    }

    /// The host physical address that device address `addr` (inside the page) maps to.
    pub const fn hpa_of(&self, addr: u64) -> Hpa {
        Hpa(self.hpa.0 | (addr & (self.size - 1)))
    }
}

/// A run of device addresses one untranslated request was answered for
/// ([`DmaPort::remap_run`]): `len` bytes from `start` map to `len` contiguous bytes at
/// `hpa`. A run is made of whole translated pages (each a [`DmaTranslation`] of the
/// IOMMU), so it never splits a page and ends where the next page does not continue it in
/// host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaRun {
    start: u64,
    hpa: Hpa,
    len: u64,
}

impl DmaRun {
    /// The run of the one page `t` that contains device address `addr`.
    pub const fn page(t: DmaTranslation, addr: u64) -> Self {
        DmaRun {
            start: t.page_start(addr),
            hpa: t.hpa(),
            len: t.size(),
        }
    }

    /// Adds the page `next` (the translation of the device address [`DmaRun::end`]) when
    /// it continues the run in host memory; otherwise leaves the run as it is and returns
    /// `false`.
    pub fn extend(&mut self, next: DmaTranslation) -> bool {
        let Some(end) = self.end() else {
            return false;
        };
        let continues =
            next.page_start(end) == end && self.hpa.0.checked_add(self.len) == Some(next.hpa().0);
        match self.len.checked_add(next.size()) {
            Some(len) if continues => {
                self.len = len;
                true
            }
            _ => false,
        }
    }

    /// Extends the run page by page while the run ends at or before `last` (the device
    /// address of the last byte wanted) and `next` answers the translation of the run's
    /// end with a page that continues it (see [`DmaRun::extend`]); stops at the first
    /// `None` or discontinuity.
    pub fn grow_to(
        mut self,
        last: u64,
        mut next: impl FnMut(u64) -> Option<DmaTranslation>,
    ) -> Self {
        while let Some(end) = self.end().filter(|&end| end <= last) {
            if !next(end).is_some_and(|t| self.extend(t)) {
                break;
            }
        }
        self
    }

    /// The first device address of the run.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// The run's length in bytes (at least a page).
    pub const fn size(&self) -> u64 {
        self.len
    }

    /// The device address after the run; `None` when the run reaches the top of the
    /// address space.
    pub const fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }

    /// Whether device address `addr` lies in the run.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr - self.start < self.len
    }

    /// Bytes from `addr` (in the run) to the run's end.
    pub const fn bytes_from(&self, addr: u64) -> u64 {
        self.len - (addr - self.start)
    }

    /// The host physical address that device address `addr` (in the run) maps to.
    pub const fn hpa_of(&self, addr: u64) -> Hpa {
        Hpa(self.hpa.0 + (addr - self.start))
    }
}

/// A successful ATS translation completion (PCIe ATS; VT-d §4.2.3): the page with the
/// permissions the IOMMU grants for it. The device caches it in its device TLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AtsCompletion {
    /// The translated page.
    pub page: DmaTranslation,
    /// Access rights granted; `privileged` is the mode the translation was requested for.
    pub perm: DmaAccess,
}

impl AtsCompletion {
    /// Whether the completion lets a request `access` the page: every right it asks for
    /// granted, in the privilege mode the translation was requested for.
    pub fn grants(&self, access: DmaAccess) -> bool {
        let p = self.perm;
        (!access.read || p.read)
            && (!access.write || p.write)
            && (!access.execute || p.execute)
            && access.privileged == p.privileged
    }
}

/// A PRI Page Request Message (PCIe PRI; VT-d §7.4.1): "make `addr` accessible for
/// `access`". The device issues one request per group, so `last` (Last Page In Group) is
/// always set by this device but kept for the IOMMU's page request descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRequestMessage {
    /// Requester id of the device.
    pub sid: SourceId,
    /// PASID of the faulting request; `None` for a request without PASID.
    pub pasid: Option<Pasid>,
    /// Page-aligned (4 KiB) device address.
    pub addr: u64,
    /// The access to make possible (read/write, execute, privileged).
    pub access: DmaAccess,
    /// Page Request Group Index, 9 bits.
    pub prgi: u16,
    /// Last Page In Group (L).
    pub last: bool,
}

/// The largest Page Request Group Index plus one (9 bits, PCIe PRI).
pub const PRG_INDEX_COUNT: u16 = 512;

/// The device's view of the IOMMU (and, through it, of host memory).
pub trait DmaPort: Send + Sync {
    /// An untranslated request, which the IOMMU remaps: translates `addr` in the address
    /// space of (`sid`, `pasid`) for `access`, checking permissions, and returns the page it
    /// lies in; or the fault.
    fn remap(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<DmaTranslation, DmaFault>;

    /// The same untranslated request, answered for the run of pages from the one that
    /// contains `addr` that continue it in host memory, up to the page that holds byte
    /// `addr + len - 1`: a device moving `len` bytes from `addr` translates once per run
    /// instead of once per page. Every page of the run is translated and checked as
    /// [`DmaPort::remap`] does; the run ends before the first page that does not continue
    /// it or whose translation fails, and that page's fault is reported when the device
    /// asks for it. A port that keeps the runs it answered may answer one that holds
    /// `addr` but begins below its page or ends past `addr + len`. A port that does not
    /// look ahead answers the one page.
    fn remap_run(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
        _len: u64,
    ) -> Result<DmaRun, DmaFault> {
        self.remap(sid, pasid, addr, access)
            .map(|t| DmaRun::page(t, addr))
    }

    /// An ATS translation request for the page containing `addr`, asking for `access`
    /// (PCIe ATS; a request without write asks for a read-only translation). The result
    /// may grant more than asked; the device caches it until invalidated. When the access
    /// cannot be granted the answer is the fault, as for [`DmaPort::remap`] (the
    /// device takes a completion that grants less than asked as a non-recoverable failure
    /// with reason 0).
    fn ats_translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<AtsCompletion, DmaFault>;

    /// A translated request (address type "translated") of `len` bytes at `hpa`, obtained
    /// from an ATS completion: the IOMMU only checks that `sid` may issue translated
    /// requests (device TLB enabled in its context entry, VT-d §9.4 DTE). The access itself
    /// then goes to [`DmaPort::memory`].
    fn check_translated(
        &self,
        sid: SourceId,
        hpa: Hpa,
        len: u64,
        access: DmaAccess,
    ) -> Result<(), DmaFault>;

    /// A page request message. The answer comes later (or immediately, from inside this
    /// call) through [`AtsEndpoint::page_response`] of the device.
    fn page_request(&self, req: PageRequestMessage);

    /// Host memory, where translated HPAs are read and written.
    fn memory(&self) -> &HostMemory;

    /// What the port's invalidations complete through: a device takes a ticket before
    /// [`DmaPort::remap`] and moves the bytes of the translations it got in flight with
    /// that ticket, so that an invalidation that removed them does not complete while they
    /// move, and they are not used after it completed (see [`RequestDrain`]).
    fn request_drain(&self) -> &RequestDrain;
}

/// A PRG Response Message to the device (PCIe PRI). Its response code is the one the
/// page group response descriptor carries (VT-d §6.5.2.9), hence [`ResponseCode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrgResponse {
    /// PASID of the page request answered; `None` for a request without PASID.
    pub pasid: Option<Pasid>,
    /// Page Request Group Index of the group answered.
    pub prgi: u16,
    /// The response code.
    pub code: ResponseCode,
}

/// An ATS invalidate request (PCIe ATS; VT-d §6.5.2.5 device-TLB and §6.5.2.6
/// PASID-based-device-TLB invalidate descriptors): drop the device-TLB entries for `range`,
/// of requests with `pasid` (or without PASID when `None`), or of every PASID when `global`
/// is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DevTlbInvalidation {
    /// The PASID whose entries are dropped; `None` for entries of requests without PASID.
    pub pasid: Option<Pasid>,
    /// Global (G): drop the range's entries of every PASID, whatever `pasid` says.
    pub global: bool,
    /// The naturally aligned range of device addresses to drop.
    pub range: AddrRange,
}

impl DevTlbInvalidation {
    /// The request for the whole address space of `pasid`.
    pub const fn all(pasid: Option<Pasid>) -> Self {
        DevTlbInvalidation {
            pasid,
            global: false,
            range: AddrRange {
                start: 0,
                last: u64::MAX,
            },
        }
    }

    /// The request for the address `addr` with the Size (S) bit, as both descriptors and
    /// the PCIe message carry it ([`AddrRange::from_ats_size`]).
    pub const fn from_size_bit(pasid: Option<Pasid>, global: bool, addr: u64, s: bool) -> Self {
        DevTlbInvalidation {
            pasid,
            global,
            range: AddrRange::from_ats_size(addr, s),
        }
    }
}

/// The ATS Extended Capability of an endpoint (PCIe Base 4.0 §10.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtsCapability {
    /// Invalidate Queue Depth (ATS Capability register bits 4:0): how many invalidate
    /// requests the device accepts at once; 0 means 32.
    pub invalidate_queue_depth: u8,
}

impl AtsCapability {
    /// Most invalidate requests outstanding at once (PCIe §10.5.1.2).
    pub const MAX_QUEUE_DEPTH: u8 = 32;

    /// The queue depth the field encodes, 1 to 32 (Linux `pci_ats_queue_depth`).
    pub const fn queue_depth(&self) -> u8 {
        match self.invalidate_queue_depth & 0x1f {
            0 => Self::MAX_QUEUE_DEPTH,
            q => q,
        }
    }
}

/// The capabilities of an endpoint that an IOMMU driver reads from its configuration
/// space before enabling them: ATS (PCIe §10.5), PRI (§10.4) and PASID (§7.8.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PcieCapabilities {
    /// The ATS capability, if the device has one.
    pub ats: Option<AtsCapability>,
    /// A Page Request Interface.
    pub pri: bool,
    /// Max PASID Width of the PASID capability, if the device has one.
    pub pasid_width: Option<u8>,
}

/// What the IOMMU sends to an ATS/PRI-capable device: invalidations of its device TLB and
/// responses to its page requests.
pub trait AtsEndpoint: Send + Sync {
    /// The requester id of the device.
    fn source_id(&self) -> SourceId;

    /// The ATS, PRI and PASID capabilities in the device's configuration space.
    fn pcie_capabilities(&self) -> PcieCapabilities;

    /// Processes an invalidate request; when this returns, no later request of the device
    /// uses a dropped entry (the invalidate completion). Returns how many entries dropped.
    fn invalidate_devtlb(&self, inv: DevTlbInvalidation) -> usize;

    /// Processes invalidate requests that arrive together, in order, as one completion:
    /// when this returns, no later request of the device uses an entry any of them
    /// dropped. Returns how many entries dropped. By default one at a time.
    fn invalidate_devtlb_each(&self, invs: &[DevTlbInvalidation]) -> usize {
        invs.iter().map(|&inv| self.invalidate_devtlb(inv)).sum()
    }

    /// Delivers a PRG response message. The device acts on it when it next runs.
    fn page_response(&self, resp: PrgResponse);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translations_are_aligned_power_of_two_pages() {
        assert!(DmaTranslation::new(Hpa(0x1000), 0x1000).is_some());
        assert!(DmaTranslation::new(Hpa(0x1000), 0x20_0000).is_none());
        assert!(DmaTranslation::new(Hpa(0x20_0000), 0x3000).is_none());
        assert!(DmaTranslation::new(Hpa(0), 0x800).is_none());
        let t = DmaTranslation::new(Hpa(0x40_0000), 0x20_0000).unwrap();
        assert_eq!(t.page_start(0x7f_1234_5678), 0x7f_1220_0000);
        assert_eq!(t.hpa_of(0x7f_1234_5678), Hpa(0x54_5678));
    }

    #[test]
    fn runs_grow_by_whole_pages_that_continue_them_in_host_memory() {
        let page = |hpa, size| DmaTranslation::new(Hpa(hpa), size).unwrap();
        let mut run = DmaRun::page(page(0x40_0000, 0x1000), 0x7000_0123);
        assert_eq!(
            (run.start(), run.size(), run.end()),
            (0x7000_0000, 0x1000, Some(0x7000_1000))
        );
        // The next page at the next frame continues it; a 2 MiB page after it would have
        // to start at the run's end in both spaces.
        assert!(run.extend(page(0x40_1000, 0x1000)));
        assert!(!run.extend(page(0x40_3000, 0x1000)), "a gap in host memory");
        assert!(
            !run.extend(page(0x40_0000, 0x20_0000)),
            "a page that does not start at the end"
        );
        assert_eq!(run.size(), 0x2000);
        assert!(
            run.contains(0x7000_1fff) && !run.contains(0x7000_2000) && !run.contains(0x6fff_ffff)
        );
        assert_eq!(run.bytes_from(0x7000_0123), 0x2000 - 0x123);
        assert_eq!(run.hpa_of(0x7000_1234), Hpa(0x40_1234));
        // A run at the top of the address space ends there.
        let mut top = DmaRun::page(page(0x40_0000, 0x1000), u64::MAX);
        assert_eq!(top.end(), None);
        assert!(!top.extend(page(0x40_1000, 0x1000)));
    }

    #[test]
    fn size_bit_encoding_gives_the_range() {
        let p = Some(Pasid::new(5).unwrap());
        let range = |inv: DevTlbInvalidation| (inv.range.start, inv.range.last);
        let four_k = DevTlbInvalidation::from_size_bit(p, false, 0x1234_5000, false);
        assert_eq!(range(four_k), (0x1234_5000, 0x1234_5fff));
        // Bit 12 clear: 8 KiB.
        let eight_k = DevTlbInvalidation::from_size_bit(p, false, 0x1234_4000, true);
        assert_eq!(range(eight_k), (0x1234_4000, 0x1234_5fff));
        // Bits 19:12 set, bit 20 clear: 2 MiB.
        let two_m = DevTlbInvalidation::from_size_bit(p, false, 0x4_000f_f000, true);
        assert_eq!(range(two_m), (0x4_0000_0000, 0x4_001f_ffff));
        let all = DevTlbInvalidation::from_size_bit(p, true, !0xfff, true);
        assert_eq!(range(all), (0, u64::MAX));
        assert_eq!(range(DevTlbInvalidation::all(None)), (0, u64::MAX));
    }
}
