//! Passthrough devices: the guest's first-level PASID entries shadowed to the host.
//!
//! The guest cannot program the physical IOMMU, so the vIOMMU watches what it programs in
//! its own tables and repeats it on the VM's VFIO container (the seed's vSVA flow):
//! - a PASID-cache invalidation (§6.5.2.2) makes the vIOMMU read the guest PASID entries it
//!   selects; a present first-level entry becomes a bind of the guest table (FLPTR, a GPA)
//!   to the same PASID on the host, a cleared entry an unbind, a changed one an unbind and
//!   a bind. A context-cache invalidation re-checks what is bound under the contexts it
//!   selects, so a device the guest takes away loses its bindings.
//! - With CAP.CM set the unit may cache not-present entries, so after a PASID-cache
//!   invalidation a request must see every entry the guest made present before it, not
//!   only those that were cached (§6.1, §6.5.2.2); for the shadow, every such entry that
//!   can be bound must be. Only a PASID the VM holds can be: guest PASIDs come from the
//!   host set through the virtual command interface (§10.4.44), and the host refuses the
//!   others. So the entries a flush makes the vIOMMU read are those of the PASIDs it
//!   handed out or has bound, never the guest's whole PASID directory: a global or
//!   domain-selective flush costs work in proportion to the VM's PASIDs, whatever the
//!   guest's tables hold, and a PASID the VM does not hold costs no read and no host call.
//! - Within one pass over the invalidation queue, each (device, PASID) is reconciled at
//!   most once and each guest entry read at most once: every descriptor of the pass was
//!   queued before the pass began, so whatever the guest wrote before queueing it is
//!   already in the tables when the pass first reads them (§6.5.2: only the completion of a
//!   later wait descriptor is ordered after an invalidation). For the same reason a host
//!   invalidation is forwarded at most once per pass while no binding changes. A queue
//!   full of flushes so costs what one flush costs.
//! - An entry is bound only if the host entry the bind data yields behaves as the guest's
//!   would ([`refusal`]); otherwise nothing is bound for it and the vIOMMU records a
//!   non-recoverable fault, SPT.4 (invalid programming of the PASID entry, §7.1.3), in the
//!   guest's fault recording registers unless FPD is set on the way to the entry.
//! - IOTLB and PASID-based IOTLB invalidations (§6.5.2.3-4) become `CACHE_INVALIDATE` of
//!   the host IOTLB for the bound PASIDs they select; PASID-based device-TLB invalidations
//!   (§6.5.2.6) become device-TLB invalidations. The host's VT-d driver has no domain
//!   granularity, and invalidates device TLBs by address only (Linux v5.10
//!   `inv_type_granu_table`), so a global or domain-selective invalidation becomes one
//!   PASID-selective invalidation per bound PASID it covers.
//! - A PASID-granular host IOTLB invalidation also invalidates the whole range of the
//!   PASID in the device TLBs of the container (Linux v5.10 `intel_iommu_sva_invalidate`
//!   takes IOTLB invalidations as inclusive for a vIOMMU's sake). Software must request
//!   the IOTLB invalidation before the device-TLB invalidation it pairs with (§6.5.2.5),
//!   so a device-TLB invalidation of a PASID whose previous descriptor (waits aside)
//!   forwarded such an IOTLB invalidation to the same container is not forwarded: what
//!   the device cached since was translated from the tables the guest had flushed, as it
//!   would be after the skipped call. Linux's flush of a new binding (PASID cache, PASID
//!   IOTLB, whole-range device TLB, each waited for) so costs one host invalidation
//!   instead of three.
//!
//! The PASID that requests without PASID use (the context entry's RID_PASID) is never
//! bound: such requests from a passthrough device use the host's second level.

use smallvec::SmallVec;
use std::collections::BTreeMap;

use foldhash::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_SVA_VTD_GPASID_CD,
    IOMMU_SVA_VTD_GPASID_EAFE, IOMMU_SVA_VTD_GPASID_EMTE, IOMMU_SVA_VTD_GPASID_PCD,
    IOMMU_SVA_VTD_GPASID_PWT, IOMMU_SVA_VTD_GPASID_SRE,
};
use vsva_uapi::{
    error::Errno, request::BindGpasid, request::CacheInvalidate, request::InvGranularity,
};
use vsva_vtd::context::read_context_entry;
use vsva_vtd::inv_desc::{ContextCacheGranularity, IotlbGranularity, PasidCacheGranularity};
use vsva_vtd::pasid::{read_pasid_dir_entry, read_pasid_entry};
use vsva_vtd::regs::{AddressType, FaultRecord, Interrupt, RequestType};
use vsva_vtd::{
    addr::DomainId, addr::Gpa, addr::Pasid, addr::SourceId, context::ScalableContextEntry,
    fault::FaultReason, inv_desc::AddrRange, inv_desc::InvDesc, pasid::PasidEntry, pasid::Pgtt,
};

use crate::error::{HostCall, VIommuError};
use crate::host::HostSva;
use crate::stats::Counters;
use crate::viommu::{lock, VIommu};

/// Bytes of the 4-KiB granules host invalidations are counted in.
const GRANULE: u64 = 4096;
/// Half of the 64-bit address space.
const HALF_SPACE: u64 = 1 << 63;

/// A bound PASID: what the host was given, and the guest domain id of the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The bind data passed to the host.
    pub bind: BindGpasid,
    /// The DID of the guest PASID entry, which the guest's invalidations name.
    pub did: DomainId,
    /// The guest entry's WPE, passed to a host that carries it ([`HostSva::carries_wpe`]);
    /// always false for one that does not.
    pub wpe: bool,
}

impl Binding {
    /// Whether `other` asks the host for the same binding.
    fn same_host_binding(&self, other: &Binding) -> bool {
        self.bind == other.bind && self.wpe == other.wpe
    }
}

/// A device assigned to the VM through VFIO.
pub(crate) struct Passthrough {
    pub guest_sid: SourceId,
    pub host_sid: SourceId,
    pub host: Arc<dyn HostSva>,
    /// The shadow table: what is bound on the host, by PASID.
    pub bound: BTreeMap<Pasid, Binding>,
}

/// Why a valid first-level guest PASID entry is not bound: the host entry the v5.10 bind
/// data yields would not behave as the guest's (docs/fidelity.md, "vIOMMU: guest
/// PASID-entry fields to host bind").
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// SRE and WPE set: the bind data has no WPE, and a host entry with SRE but WPE clear
    /// lets supervisor writes through read-only pages (§3.6.2, the CR0.WP = 0 rule).
    #[error("SRE with WPE: the bind data cannot carry WPE")]
    SupervisorWriteProtect,
    /// ERE set: the bind data has no ERE, and the host entry's ERE clear would refuse the
    /// execute requests the guest allowed (SPT.5).
    #[error("ERE: the bind data cannot carry ERE")]
    ExecuteRequests,
}

/// Whether the vIOMMU refuses to bind the first-level guest entry `entry`.
///
/// The host entry gets ERE, WPE, NXE and SMEP clear. WPE only matters for supervisor
/// requests, which SRE clear refuses anyway (SPT.6), so it is refused only with SRE set.
/// NXE and SMEP only matter for execute requests, which ERE clear refuses (SPT.5), so with
/// ERE refused they never make a difference.
pub fn refusal(entry: &PasidEntry) -> Option<Refusal> {
    refusal_for(entry, false)
}

/// Whether the vIOMMU refuses to bind `entry` on a host whose bind carries WPE
/// (`carries_wpe`, iommufd's `IOMMU_VTD_S1_WPE`) or not: with WPE carried, only ERE is
/// refused.
pub fn refusal_for(entry: &PasidEntry, carries_wpe: bool) -> Option<Refusal> {
    if entry.sre && entry.wpe && !carries_wpe {
        Some(Refusal::SupervisorWriteProtect)
    } else if entry.ere {
        Some(Refusal::ExecuteRequests)
    } else {
        None
    }
}

/// The bind data of a present first-level guest PASID entry for `pasid` (gpasid ==
/// hpasid). The uAPI of Linux v5.10 carries SRE, EAFE and the memory-type fields; WPE,
/// NXE, SMEP and ERE have no flag and are not passed (see [`refusal`] for when that makes
/// the entry unbindable).
pub fn bind_data(pasid: Pasid, entry: &PasidEntry) -> BindGpasid {
    let flags = [
        (entry.sre, IOMMU_SVA_VTD_GPASID_SRE),
        (entry.eafe, IOMMU_SVA_VTD_GPASID_EAFE),
        (entry.pcd, IOMMU_SVA_VTD_GPASID_PCD),
        (entry.pwt, IOMMU_SVA_VTD_GPASID_PWT),
        (entry.emte, IOMMU_SVA_VTD_GPASID_EMTE),
        (entry.cd, IOMMU_SVA_VTD_GPASID_CD),
    ];
    BindGpasid {
        hpasid: pasid,
        gpasid: Some(pasid),
        gpgd: Gpa(entry.flptptr),
        addr_width: entry.flpm.input_width(),
        vtd_flags: flags
            .iter()
            .filter(|(set, _)| *set)
            .fold(0, |acc, (_, f)| acc | f),
        pat: entry.pat,
        emt: entry.emt as u32,
    }
}

/// The host invalidations of `cache` that cover a guest invalidation's range of `pasid`:
/// the range in 4-KiB granules. The whole address space (2^64 bytes) has no granule count:
/// the IOTLB takes it as a PASID-selective invalidation, the device TLB, which the host
/// driver only invalidates by address, as its two halves.
fn range_invalidations(
    cache: u8,
    pasid: Pasid,
    range: AddrRange,
    leaf: bool,
    out: &mut impl FnMut(CacheInvalidate),
) {
    let addr = |addr, granule_size, nb_granules| CacheInvalidate {
        cache,
        granularity: InvGranularity::Addr {
            pasid: Some(pasid),
            archid: None,
            addr,
            granule_size,
            nb_granules,
            leaf,
        },
    };
    match (range.start, range.last) {
        (0, u64::MAX) if cache == IOMMU_CACHE_INV_TYPE_IOTLB => out(pasid_selective(cache, pasid)),
        (0, u64::MAX) => {
            out(addr(0, HALF_SPACE, 1));
            out(addr(HALF_SPACE, HALF_SPACE, 1));
        }
        (start, last) => out(addr(start, GRANULE, (last - start) / GRANULE + 1)),
    }
}

fn pasid_selective(cache: u8, pasid: Pasid) -> CacheInvalidate {
    CacheInvalidate {
        cache,
        granularity: InvGranularity::Pasid {
            pasid: Some(pasid),
            archid: None,
        },
    }
}

/// The host invalidations one guest descriptor asks for, for one passthrough device with
/// the bindings `bound`.
///
/// - IOTLB invalidate (§6.5.2.3), any granularity: in scalable mode even a page-selective
///   one removes every first-level entry of the domain, so each bound PASID of the domain
///   (of every domain, for global) is invalidated whole.
/// - PASID-based IOTLB invalidate (§6.5.2.4): the PASID, whole or the 2^AM pages at ADDR.
/// - PASID-based device-TLB invalidate (§6.5.2.6) for this device: the PASID's range in
///   the device TLB, and with G set the range in every other bound PASID as well (the host
///   cannot select global mappings alone).
pub fn host_invalidations(
    desc: &InvDesc,
    guest_sid: SourceId,
    bound: &BTreeMap<Pasid, Binding>,
) -> Vec<CacheInvalidate> {
    let mut invs = Vec::new();
    each_host_invalidation(desc, guest_sid, bound, &mut |inv| invs.push(inv));
    invs
}

/// [`host_invalidations`], each handed to `out` in order as it is made: the forwarding
/// path gathers them without a list of their own.
fn each_host_invalidation(
    desc: &InvDesc,
    guest_sid: SourceId,
    bound: &BTreeMap<Pasid, Binding>,
    out: &mut impl FnMut(CacheInvalidate),
) {
    let iotlb = IOMMU_CACHE_INV_TYPE_IOTLB;
    match *desc {
        InvDesc::Iotlb {
            granularity, did, ..
        } => bound
            .iter()
            .filter(|(_, b)| granularity == IotlbGranularity::Global || b.did == did)
            .for_each(|(&p, _)| out(pasid_selective(iotlb, p))),
        InvDesc::PasidIotlb { did, pasid, .. } => match bound.get(&pasid) {
            Some(b) if b.did == did => match desc.range() {
                Some(range) => {
                    let ih = matches!(desc, InvDesc::PasidIotlb { ih: true, .. });
                    range_invalidations(iotlb, pasid, range, ih, out);
                }
                None => out(pasid_selective(iotlb, pasid)),
            },
            _ => {}
        },
        InvDesc::PasidDevIotlb {
            sid, pasid, global, ..
        } if sid == guest_sid => {
            let Some(range) = desc.range() else {
                return;
            };
            for &p in bound.keys().filter(|&&p| p == pasid || global) {
                range_invalidations(IOMMU_CACHE_INV_TYPE_DEV_IOTLB, p, range, false, out);
            }
        }
        _ => {}
    }
}

/// The PASID-granular host IOTLB invalidations one guest descriptor forwarded and the host
/// carried out, by container and PASID: each also invalidated the PASID's whole range in
/// the container's device TLBs.
#[derive(Default)]
pub(crate) struct InclusiveFlushes(Vec<(Arc<dyn HostSva>, Pasid)>);

impl InclusiveFlushes {
    /// Forgets every recorded invalidation.
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    /// Whether `inv` is a device-TLB invalidation on `host` of a PASID whose whole range
    /// a recorded invalidation covered.
    fn covers(&self, host: &Arc<dyn HostSva>, inv: &CacheInvalidate) -> bool {
        inv.cache == IOMMU_CACHE_INV_TYPE_DEV_IOTLB
            && inv
                .pasid()
                .is_some_and(|p| self.0.iter().any(|(h, q)| *q == p && Arc::ptr_eq(h, host)))
    }

    /// Records `inv`, forwarded to `host`, if it is a PASID-granular IOTLB invalidation
    /// (the only ones that take a reference to `host`).
    fn record(&mut self, host: &Arc<dyn HostSva>, inv: &CacheInvalidate) {
        if let (IOMMU_CACHE_INV_TYPE_IOTLB, InvGranularity::Pasid { pasid: Some(p), .. }) =
            (inv.cache, &inv.granularity)
        {
            self.0.push((Arc::clone(host), *p));
        }
    }
}

/// Which PASIDs of a device a shadow synchronisation looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncScope {
    /// Every PASID the VM holds or has bound.
    All,
    /// Those whose guest entry or binding has this domain id.
    Domain(DomainId),
    /// One PASID, if its guest entry or binding has this domain id.
    Pasid(DomainId, Pasid),
    /// The bound PASIDs only.
    Bound,
}

/// What one pass over the invalidation queue has shadowed (see the module doc): what it
/// read of the guest's tables and which (device, PASID) it has reconciled. A register-based
/// invalidation is a pass of its own.
#[derive(Default)]
pub(crate) struct SyncPass {
    /// The scalable-mode context entry of each device looked at, if valid.
    contexts: HashMap<SourceId, Option<ScalableContextEntry>>,
    /// The valid first-level entry of each (device, PASID) read, if any.
    entries: HashMap<(SourceId, Pasid), Option<PasidEntry>>,
    /// The (device, PASID) pairs reconciled.
    done: HashSet<(SourceId, Pasid)>,
    /// A global PASID-cache invalidation was shadowed: every later one is covered.
    all: bool,
    /// The domains a domain-selective PASID-cache invalidation was shadowed for.
    domains: HashSet<DomainId>,
    /// The host invalidations carried out since the pass began or a binding last changed.
    forwarded: Forwarded,
    /// The host invalidations gathered and not yet sent, in order: they go down together
    /// ([`VIommu::flush_invalidations`]) before any other host call, before an
    /// invalidation wait completes, and when the pass ends.
    pending: Vec<(Arc<dyn HostSva>, CacheInvalidate)>,
    /// One host's share of `pending` while it is sent (empty between sends, kept for its
    /// room).
    batch: Vec<CacheInvalidate>,
}

impl fmt::Debug for SyncPass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncPass")
            .field("contexts", &self.contexts)
            .field("entries", &self.entries)
            .field("done", &self.done)
            .field("all", &self.all)
            .field("domains", &self.domains)
            .field("forwarded", &self.forwarded)
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// How many distinct host invalidations a pass keeps in a list before it hashes them: an
/// `mprotect` or `munmap` forwards one or two per pass.
const FORWARDED_LISTED: usize = 8;

/// The host invalidations a pass carried out: a short list scanned in order (cheaper than
/// hashing a key for the one or two of the usual pass), moved to a hashed set once it is
/// full, so a queue of many distinct invalidations still takes constant time for each.
/// Held inline: a pass allocates only when it outgrows the list the first time.
#[derive(Debug, Default)]
struct Forwarded {
    listed: SmallVec<[ForwardKey; FORWARDED_LISTED]>,
    hashed: HashSet<ForwardKey>,
}

impl Forwarded {
    /// Adds `key`; whether it was not there yet.
    fn insert(&mut self, key: ForwardKey) -> bool {
        if self.hashed.is_empty() {
            if self.listed.contains(&key) {
                return false;
            }
            if self.listed.len() < FORWARDED_LISTED {
                self.listed.push(key);
                return true;
            }
            self.hashed.extend(self.listed.drain(..));
        }
        self.hashed.insert(key)
    }

    /// Forgets every invalidation (each part keeps its room).
    fn clear(&mut self) {
        self.listed.clear();
        self.hashed.clear();
    }
}

/// One host invalidation on one container, as a set key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ForwardKey {
    /// The container's address.
    host: usize,
    cache: u8,
    /// `None` for domain granularity, else the PASID and architecture id given.
    tag: Option<(Option<Pasid>, Option<u32>)>,
    /// Address, granule size, number of granules and leaf of an address range.
    range: Option<(u64, u64, u64, bool)>,
}

impl ForwardKey {
    fn new(host: &Arc<dyn HostSva>, inv: &CacheInvalidate) -> Self {
        let (tag, range) = match inv.granularity {
            InvGranularity::Domain => (None, None),
            InvGranularity::Pasid { pasid, archid } => (Some((pasid, archid)), None),
            InvGranularity::Addr {
                pasid,
                archid,
                addr,
                granule_size,
                nb_granules,
                leaf,
            } => (
                Some((pasid, archid)),
                Some((addr, granule_size, nb_granules, leaf)),
            ),
        };
        ForwardKey {
            host: Arc::as_ptr(host).cast::<()>() as usize,
            cache: inv.cache,
            tag,
            range,
        }
    }
}

impl SyncPass {
    /// Starts a new pass: nothing read, nothing reconciled (the sets keep their room, so
    /// a pass allocates only when it outgrows the largest before it).
    pub(crate) fn clear(&mut self) {
        let SyncPass {
            contexts,
            entries,
            done,
            all,
            domains,
            forwarded,
            pending,
            batch,
        } = self;
        contexts.clear();
        entries.clear();
        done.clear();
        *all = false;
        domains.clear();
        forwarded.clear();
        pending.clear();
        batch.clear();
    }

    /// Whether an earlier synchronisation of the pass covered all of `scope`; notes that
    /// this one covers it from now on.
    fn covered(&mut self, scope: SyncScope) -> bool {
        match scope {
            _ if self.all => true,
            SyncScope::All => {
                self.all = true;
                false
            }
            SyncScope::Domain(did) => !self.domains.insert(did),
            SyncScope::Pasid(..) | SyncScope::Bound => false,
        }
    }
}

impl VIommu {
    /// Attaches a passthrough device: `guest_sid` is its requester id in the guest,
    /// `host_sid` on the host, `host` the VM's VFIO container.
    pub fn attach_passthrough(
        &self,
        guest_sid: SourceId,
        host_sid: SourceId,
        host: Arc<dyn HostSva>,
    ) -> Result<(), VIommuError> {
        let mut devices = lock(&self.devices);
        if devices.iter().any(|d| d.guest_sid == guest_sid) {
            return Err(VIommuError::AlreadyAttached(guest_sid));
        }
        if devices.iter().any(|d| d.host_sid == host_sid) {
            return Err(VIommuError::HostDeviceAttached(host_sid));
        }
        devices.push(Passthrough {
            guest_sid,
            host_sid,
            host,
            bound: BTreeMap::new(),
        });
        Ok(())
    }

    /// Detaches a passthrough device, unbinding what is bound for it.
    pub fn detach_passthrough(&self, guest_sid: SourceId) -> Result<(), VIommuError> {
        let mut devices = lock(&self.devices);
        let at = devices
            .iter()
            .position(|d| d.guest_sid == guest_sid)
            .ok_or(VIommuError::NotAttached(guest_sid))?;
        let mut dev = devices.remove(at);
        for pasid in dev.bound.keys().copied().collect::<Vec<_>>() {
            self.reconcile(&mut dev, pasid, None);
        }
        Ok(())
    }

    /// What is bound on the host for a passthrough device, by PASID.
    pub fn bindings(&self, guest_sid: SourceId) -> Result<Vec<(Pasid, Binding)>, VIommuError> {
        lock(&self.devices)
            .iter()
            .find(|d| d.guest_sid == guest_sid)
            .map(|d| d.bound.iter().map(|(&p, &b)| (p, b)).collect())
            .ok_or(VIommuError::NotAttached(guest_sid))
    }

    /// The host side of a PASID-cache invalidation, within the queue pass `pass`; faults
    /// for refused entries add their interrupts to `irqs`.
    pub(crate) fn sync_pasid_cache(
        &self,
        granularity: PasidCacheGranularity,
        did: DomainId,
        pasid: Pasid,
        pass: &mut SyncPass,
        irqs: &mut Vec<Interrupt>,
    ) {
        let scope = match granularity {
            PasidCacheGranularity::Global => SyncScope::All,
            PasidCacheGranularity::DomainSelective => SyncScope::Domain(did),
            PasidCacheGranularity::PasidSelective => SyncScope::Pasid(did, pasid),
        };
        self.sync(scope, pass, irqs, |_| true);
    }

    /// The host side of a context-cache invalidation: the bindings of the devices it
    /// selects are checked against the guest tables.
    pub(crate) fn resync_context(
        &self,
        granularity: ContextCacheGranularity,
        sid: SourceId,
        fm: u8,
        pass: &mut SyncPass,
        irqs: &mut Vec<Interrupt>,
    ) {
        self.sync(SyncScope::Bound, pass, irqs, |dev| {
            granularity.covers(sid, fm, dev)
        });
    }

    /// Unbinds `pasid` from every passthrough device (before the guest frees it).
    pub(crate) fn unbind_everywhere(&self, pasid: Pasid) {
        for dev in lock(&self.devices).iter_mut() {
            if dev.bound.contains_key(&pasid) {
                self.reconcile(dev, pasid, None);
            }
        }
    }

    /// Brings the host bindings of the selected devices in line with the guest tables:
    /// the PASIDs `scope` selects among those the VM holds or has bound, each reconciled
    /// at most once in `pass`.
    fn sync(
        &self,
        scope: SyncScope,
        pass: &mut SyncPass,
        irqs: &mut Vec<Interrupt>,
        device: impl Fn(SourceId) -> bool,
    ) {
        if pass.covered(scope) {
            return;
        }
        // The PASIDs of the VM the scope selects, in order; a few are kept without
        // allocating (a PASID-selective flush selects one at most).
        let held: SmallVec<[Pasid; 4]> = {
            let held = lock(&self.guest_pasids);
            match scope {
                SyncScope::All | SyncScope::Domain(_) => held.iter().copied().collect(),
                SyncScope::Pasid(_, p) => held.get(&p).copied().into_iter().collect(),
                SyncScope::Bound => SmallVec::new(),
            }
        };
        let rta = self.scalable_root();
        for dev in lock(&self.devices).iter_mut() {
            let sid = dev.guest_sid;
            if !device(sid) {
                continue;
            }
            let ctx = *pass.contexts.entry(sid).or_insert_with(|| {
                rta.and_then(|rta| read_context_entry(&self.mem, rta, sid, &self.entry_checks).ok())
            });
            let mut candidates = held.clone();
            match scope {
                SyncScope::Pasid(_, p) if held.is_empty() && dev.bound.contains_key(&p) => {
                    candidates.push(p);
                }
                SyncScope::Pasid(..) => {}
                _ => {
                    candidates.extend(dev.bound.keys().copied());
                    candidates.sort_unstable();
                    candidates.dedup();
                }
            }
            for pasid in candidates {
                if pass.done.contains(&(sid, pasid)) {
                    continue;
                }
                let entry = *pass
                    .entries
                    .entry((sid, pasid))
                    .or_insert_with(|| ctx.as_ref().and_then(|c| self.first_level_entry(c, pasid)));
                let selected = match scope {
                    SyncScope::All | SyncScope::Bound => true,
                    SyncScope::Domain(did) | SyncScope::Pasid(did, _) => {
                        dev.bound.get(&pasid).is_some_and(|b| b.did == did)
                            || entry.is_some_and(|e| e.did == did)
                    }
                };
                if !selected {
                    continue;
                }
                pass.done.insert((sid, pasid));
                let carries_wpe = dev.host.carries_wpe();
                let want = match (ctx, entry) {
                    (Some(ctx), Some(e)) => self.binding(sid, &ctx, pasid, &e, carries_wpe, irqs),
                    _ => None,
                };
                let had = dev.bound.get(&pasid).copied();
                let changes = match (had, want) {
                    (Some(h), Some(w)) => !h.same_host_binding(&w),
                    (h, w) => h.is_some() != w.is_some(),
                };
                if changes {
                    // The invalidations gathered so far were asked of the tables as bound.
                    self.flush_invalidations(pass);
                }
                self.reconcile(dev, pasid, want);
                if dev.bound.get(&pasid).map(|b| (b.bind, b.wpe)) != had.map(|b| (b.bind, b.wpe)) {
                    pass.forwarded.clear();
                }
            }
        }
    }

    /// The guest's present, valid first-level PASID entry of `pasid` under `ctx`, if any.
    fn first_level_entry(&self, ctx: &ScalableContextEntry, pasid: Pasid) -> Option<PasidEntry> {
        if pasid == ctx.rid_pasid || ctx.pasid_for_request(Some(pasid)).is_err() {
            return None;
        }
        read_pasid_entry(&self.mem, ctx, pasid, &self.entry_checks)
            .ok()
            .filter(|e| e.pgtt() == Pgtt::FirstLevel)
            .map(|e| e.decode())
    }

    /// The binding the guest entry `entry` of `pasid` on device `sid` asks for, or `None`
    /// when it is refused: the refusal is counted, logged and, unless FPD is set in the
    /// context, PASID directory or PASID entry, recorded as an SPT.4 fault of the device
    /// and PASID (its interrupt added to `irqs`).
    fn binding(
        &self,
        sid: SourceId,
        ctx: &ScalableContextEntry,
        pasid: Pasid,
        entry: &PasidEntry,
        carries_wpe: bool,
        irqs: &mut Vec<Interrupt>,
    ) -> Option<Binding> {
        let Some(refused) = refusal_for(entry, carries_wpe) else {
            return Some(Binding {
                bind: bind_data(pasid, entry),
                did: entry.did,
                wpe: carries_wpe && entry.wpe,
            });
        };
        tracing::warn!("vIOMMU: PASID {pasid} of {sid} not bound: {refused}");
        Counters::bump(&self.counters.entries_refused);
        let pde_fpd = read_pasid_dir_entry(&self.mem, ctx, pasid, &self.entry_checks)
            .map_or(true, |pde| pde.fpd);
        if !(ctx.fpd || pde_fpd || entry.fpd) {
            let record = FaultRecord {
                fault_info: 0,
                sid,
                reason: FaultReason::Spt4.code(),
                pasid: Some(pasid),
                exe: refused == Refusal::ExecuteRequests,
                privileged: refused == Refusal::SupervisorWriteProtect,
                request: if refused == Refusal::SupervisorWriteProtect {
                    RequestType::Write
                } else {
                    RequestType::Read
                },
                address_type: AddressType::Untranslated,
            };
            Counters::bump(&self.counters.faults_recorded);
            irqs.extend(self.regs.lock().record_fault(&record).1);
        }
        None
    }

    /// Makes the host binding of `pasid` on `dev` the binding `want` (none: unbound).
    /// A host that replaces bindings gets a changed entry as one bind; if the replace is
    /// refused, the old binding is removed, so the device never keeps using tables the
    /// guest changed.
    fn reconcile(&self, dev: &mut Passthrough, pasid: Pasid, want: Option<Binding>) {
        let have = dev.bound.get(&pasid).copied();
        match (have, want) {
            (None, None) => {}
            (Some(h), Some(w)) if h.same_host_binding(&w) => {
                dev.bound.insert(pasid, w);
            }
            (Some(h), Some(w)) if dev.host.replaces_binding() => {
                let r = dev.host.bind_first_level(&w.bind, w.wpe);
                if self.host_result(r, || HostCall::Bind(w.bind)).is_some() {
                    Counters::bump(&self.counters.binds);
                    dev.bound.insert(pasid, w);
                } else {
                    self.reconcile(dev, pasid, None);
                    debug_assert!(!dev.bound.contains_key(&pasid), "{h:?} unbound");
                }
            }
            (have, want) => {
                if let Some(h) = have {
                    dev.bound.remove(&pasid);
                    let r = dev.host.unbind_gpasid(&h.bind);
                    if self.host_result(r, || HostCall::Unbind(h.bind)).is_some() {
                        Counters::bump(&self.counters.unbinds);
                    }
                }
                if let Some(w) = want {
                    let r = dev.host.bind_first_level(&w.bind, w.wpe);
                    if self.host_result(r, || HostCall::Bind(w.bind)).is_some() {
                        Counters::bump(&self.counters.binds);
                        dev.bound.insert(pasid, w);
                    }
                }
            }
        }
    }

    /// Forwards the host invalidations an IOTLB or device-TLB descriptor asks for. One
    /// container shared by several devices gets each distinct invalidation once; a
    /// device-TLB invalidation `flushed` (the previous descriptor's) covers is not
    /// forwarded. `flushed` is left holding this descriptor's. An invalidation the host
    /// carried out earlier in `pass`, with no binding changed since, is not forwarded
    /// again: whatever the host cached since was translated from the tables as the pass
    /// found them.
    pub(crate) fn forward_invalidation(
        &self,
        desc: &InvDesc,
        flushed: &mut InclusiveFlushes,
        pass: &mut SyncPass,
    ) {
        // This descriptor's calls are appended to the pass's pending ones and marked
        // forwarded as they are found (which also keeps a container shared by several
        // devices from getting one twice): no set or list of its own per descriptor.
        let first = pass.pending.len();
        for dev in lock(&self.devices).iter() {
            each_host_invalidation(desc, dev.guest_sid, &dev.bound, &mut |inv| {
                // `covers` first: it is a short list scan, the insert a hash; an
                // invalidation already forwarded is not inserted again.
                if !flushed.covers(&dev.host, &inv)
                    && pass.forwarded.insert(ForwardKey::new(&dev.host, &inv))
                {
                    pass.pending.push((dev.host.clone(), inv));
                }
            });
        }
        flushed.clear();
        for (host, inv) in &pass.pending[first..] {
            flushed.record(host, inv);
        }
    }

    /// Sends the invalidations `pass` gathered, each host's as one batch
    /// ([`HostSva::cache_invalidate_batch`]), hosts in the order they were first asked;
    /// each refused invalidation is counted and kept as a failed host call, as a refused
    /// single call is. Those that were refused were taken as done when later descriptors
    /// of the pass were gathered: the guest is not told either way (hardware cannot be).
    pub(crate) fn flush_invalidations(&self, pass: &mut SyncPass) {
        let mut pending = std::mem::take(&mut pass.pending);
        let mut invs = std::mem::take(&mut pass.batch);
        while let Some((first, _)) = pending.first() {
            invs.clear();
            if pending.iter().all(|(h, _)| Arc::ptr_eq(h, first)) {
                // One host (the usual case: one container per VM) is sent from `pending`
                // as it is, without another reference to it taken and dropped.
                invs.extend(pending.iter().map(|(_, inv)| *inv));
                self.send_invalidations(first, &invs, pass);
                pending.clear();
            } else {
                let host = Arc::clone(first);
                pending.retain(|(h, inv)| {
                    let mine = Arc::ptr_eq(h, &host);
                    if mine {
                        invs.push(*inv);
                    }
                    !mine
                });
                self.send_invalidations(&host, &invs, pass);
            }
        }
        // Empty now; both kept for their room.
        pass.pending = pending;
        pass.batch = invs;
    }

    /// Sends one host's share of a pass's invalidations as one batch and counts each one
    /// the host carried out (see [`Self::flush_invalidations`]).
    fn send_invalidations(
        &self,
        host: &Arc<dyn HostSva>,
        invs: &[CacheInvalidate],
        pass: &SyncPass,
    ) {
        // A batch of one is the single call (what a batch is to each host), without a list
        // of results to allocate.
        let (one, batch);
        let results: &[Result<(), Errno>] = if let [inv] = invs {
            one = [host.cache_invalidate(inv)];
            &one
        } else {
            batch = host.cache_invalidate_batch(invs);
            &batch
        };
        for (i, inv) in invs.iter().enumerate() {
            let r = results.get(i).copied().unwrap_or(Err(Errno::EIO));
            if self
                .host_result(r, || HostCall::CacheInvalidate(*inv))
                .is_some()
            {
                Counters::bump_queued(&self.counters.invalidations_forwarded, pass);
            }
        }
    }

    /// The passthrough device with guest requester id `sid`: its host id and container.
    pub(crate) fn passthrough(&self, sid: SourceId) -> Option<(SourceId, Arc<dyn HostSva>)> {
        lock(&self.devices)
            .iter()
            .find(|d| d.guest_sid == sid)
            .map(|d| (d.host_sid, d.host.clone()))
    }

    /// The guest requester id of the passthrough device with host requester id `host_sid`.
    pub(crate) fn guest_sid_of(&self, host_sid: SourceId) -> Option<SourceId> {
        lock(&self.devices)
            .iter()
            .find(|d| d.host_sid == host_sid)
            .map(|d| d.guest_sid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: usize, addr: u64) -> ForwardKey {
        ForwardKey {
            host,
            cache: 1,
            tag: Some((None, None)),
            range: Some((addr, 4096, 1, true)),
        }
    }

    /// A set before, at and after the list fills: each key is new once, whichever part
    /// holds it, and a cleared set holds none.
    #[test]
    fn forwarded_invalidations_are_a_set_across_the_list_and_the_hash() {
        let mut f = Forwarded::default();
        let n = 3 * FORWARDED_LISTED as u64;
        for round in 0..2 {
            for a in 0..n {
                assert!(f.insert(key(1, a << 12)), "round {round}, new key {a}");
                assert!(!f.insert(key(1, a << 12)), "round {round}, key {a} again");
                assert!(
                    f.insert(key(2, a << 12)),
                    "round {round}, another container"
                );
                for b in 0..=a {
                    assert!(!f.insert(key(1, b << 12)), "round {round}, old key {b}");
                }
            }
            f.clear();
        }
    }
}
