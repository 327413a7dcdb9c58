//! The physical VT-d IOMMU model (scalable mode).
//!
//! Tables live in host memory; the model reads them as hardware does and caches what it
//! reads (context cache, PASID cache, IOTLB, paging-structure caches) until an invalidation
//! descriptor removes it.

mod cached_walk;
mod entry_cache;
mod explain;
pub mod iotlb;
mod mmio;
mod overtaken;
mod port;
pub mod pscache;
mod qi;
mod runs;
mod seqset;
mod stale;
#[cfg(test)]
mod tests;
mod translate;

use foldhash::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crossbeam_utils::CachePadded;
use vsva_vtd::regs::{Cap, Ecap, Interrupt, RegError, RegisterFile, SharedRegisterFile};
use vsva_vtd::{
    addr::SourceId, context::ScalableContextEntry, flpte::FlFormat, flpte::InvalidAddressWidth,
    pasid::ValidPasidEntry, request::RootState, root::Capabilities, root::EntryChecks,
    slpte::SlFormat, walk::PageSize,
};

use crate::dma::port::{AtsEndpoint, PcieCapabilities};
use crate::drain::RequestDrain;
use crate::memory::HostMemory;
use entry_cache::{EntryCache, RetagFilter, CONTEXT_KEY, PASID_KEY};
use iotlb::Iotlb;
use overtaken::FillLog;
use pscache::PagingStructureCaches;
use runs::RunCache;

pub use overtaken::OvertakenFill;
pub use stale::StaleTranslation;
pub use translate::{DmaMapping, Source};

/// What the model implements: the capability and extended capability fields that decide
/// which entries are valid, and the host address width.
#[derive(Clone, Copy, Debug)]
pub struct IommuConfig {
    /// The capability fields (CAP/ECAP) the model reports and checks entries against.
    pub caps: Capabilities,
    /// Re-walk the tables on every IOTLB hit and after every walk that used the
    /// paging-structure caches, and report stale translations.
    pub strict: bool,
}

impl Default for IommuConfig {
    /// A scalable-mode IOMMU with every feature the table entries can name (first-level,
    /// second-level, nested and pass-through translation, PASIDs, device TLBs, page
    /// requests, ...), 3- and 4-level second-level tables and 48-bit host addresses.
    fn default() -> Self {
        IommuConfig {
            caps: Capabilities::full(48, 0b0110),
            strict: false,
        }
    }
}

/// Counters of the model's work.
#[derive(Debug, Default)]
pub struct IommuStats {
    /// Page walks done after IOTLB misses.
    pub walks: Counter,
    /// Page-table entries read by those walks (first and second level).
    pub table_reads: Counter,
    /// Invalidation descriptors processed.
    pub descriptors: AtomicU64,
    /// Faults handed to the fault recording registers.
    pub faults: AtomicU64,
    /// Page requests queued.
    pub page_requests: AtomicU64,
}

/// Threads that own a slot of every [`Counter`]; later threads share its overflow.
const COUNTER_SLOTS: usize = 8;

/// A counter that the miss path adds to with no atomic read-modify-write and no cache
/// line shared between threads: each of the first `COUNTER_SLOTS` threads that count
/// (in the process) owns a slot, which only it writes, with a plain load and store; later
/// threads add to a shared overflow atomically. A read sums them.
#[derive(Debug, Default)]
pub struct Counter {
    slots: [CachePadded<AtomicU64>; COUNTER_SLOTS],
    overflow: CachePadded<AtomicU64>,
}

/// The calling thread's slot of every [`Counter`], assigned when it first counts, never
/// reused: `None` for the threads after the first [`COUNTER_SLOTS`].
fn counter_slot() -> Option<usize> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|&slot| (slot < COUNTER_SLOTS).then_some(slot))
}

impl Counter {
    /// The count (the sum of the slots; `order` is that of each slot's load).
    pub fn load(&self, order: Ordering) -> u64 {
        self.slots
            .iter()
            .chain([&self.overflow])
            .fold(0u64, |sum, s| sum.wrapping_add(s.load(order)))
    }

    /// Adds `n`.
    fn add(&self, n: u64) {
        match counter_slot() {
            Some(i) => {
                // Only this thread writes slot `i`, so a load and a store do not lose
                // another thread's addition.
                let slot = &self.slots[i];
                slot.store(
                    slot.load(Ordering::Relaxed).wrapping_add(n),
                    Ordering::Relaxed,
                );
            }
            None => {
                self.overflow.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// log2 of the page sizes a translation can have, smallest first: what a lookup by page
/// (IOTLB, second-level mappings) tries in turn.
const PAGE_SHIFTS: [u8; 3] = [
    PageSize::Size4K.shift() as u8,
    PageSize::Size2M.shift() as u8,
    PageSize::Size1G.shift() as u8,
];

/// Strict mode is on: a flag of the root word (see [`RootState::word`]), so that an IOTLB
/// hit reads one atomic.
const ROOT_STRICT: u64 = 4;
const _: () = assert!(ROOT_STRICT & RootState::UNIT_FLAGS == ROOT_STRICT);

/// Sets of the context cache (of `entry_cache::WAYS` ways): 256 requester ids.
const CONTEXT_SETS: usize = 64;
/// Sets of the PASID cache: 512 requester id and PASID pairs.
const PASID_SETS: usize = 128;

/// Receives the interrupt messages the IOMMU raises (fault, invalidation completion and
/// page request events).
pub type InterruptHandler = Arc<dyn Fn(Interrupt) + Send + Sync>;

/// An [`IommuConfig`] the model cannot implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IommuConfigError {
    /// The host address width is one the entry formats cannot have.
    #[error("host address width: {0}")]
    AddressWidth(#[from] InvalidAddressWidth),
    /// The capabilities do not make valid CAP/ECAP register values.
    #[error("capability registers: {0}")]
    Registers(#[from] RegError),
}

/// The physical IOMMU.
pub struct Iommu {
    mem: Arc<HostMemory>,
    caps: Capabilities,
    /// The entry checks of `caps`, for the context and PASID entries of misses.
    entry_checks: EntryChecks,
    fl_format: FlFormat,
    sl_format: SlFormat,
    regs: SharedRegisterFile,
    /// Held while one thread drains the invalidation queue: the cache invalidations
    /// that drain fetched and has not carried out yet.
    qi_pending: Mutex<qi::Pending>,
    /// The root word ([`RootState::word`]) with the strict-mode flag: one atomic load on the hot path, on a cache line of its own so that the
    /// counters and locks other fields hold, which misses and invalidations write, do not
    /// share it.
    root: CachePadded<AtomicU64>,
    irq_handler: RwLock<Option<InterruptHandler>>,
    endpoints: RwLock<HashMap<u16, Arc<dyn AtsEndpoint>>>,
    /// The context cache, by requester id ([`CONTEXT_SETS`] sets).
    context_cache: EntryCache<ScalableContextEntry, 3>,
    /// Counts context- and PASID-cache invalidations, so that an entry read before one
    /// is not cached after it (see `entry_cache`).
    entry_generation: crate::sync::AtomicU64,
    /// The PASID cache, by requester id and PASID ([`PASID_SETS`] sets).
    pasid_cache: EntryCache<ValidPasidEntry, 3>,
    /// Whether a fresh PASID entry read must retag the IOTLB (a slot per PASID-cache way).
    retag_filter: RetagFilter,
    iotlb: Iotlb,
    /// Runs of IOTLB hits answered to untranslated requests.
    runs: RunCache,
    paging_caches: PagingStructureCaches,
    stale: Mutex<Vec<StaleTranslation>>,
    /// Strict mode: recent IOTLB invalidations and the fills they overtook.
    fills: Mutex<FillLog>,
    /// What the invalidation wait descriptor completes through (see [`RequestDrain`]).
    drain: RequestDrain,
    stats: IommuStats,
}

impl Iommu {
    /// A new IOMMU in front of `mem`, with translation disabled; an error when `config`
    /// asks for a host address width the entry formats cannot have (32 to 52 bits).
    pub fn new(mem: Arc<HostMemory>, config: IommuConfig) -> Result<Arc<Self>, IommuConfigError> {
        let haw = config.caps.haw;
        let regs = RegisterFile::new(cap_register(&config.caps), ecap_register(&config.caps))?;
        Ok(Arc::new(Iommu {
            mem,
            caps: config.caps,
            entry_checks: EntryChecks::new(&config.caps),
            fl_format: FlFormat::new(haw, true)?,
            sl_format: SlFormat::new(haw)?,
            qi_pending: Mutex::default(),
            regs: SharedRegisterFile::new(regs),
            root: CachePadded::new(AtomicU64::new(if config.strict { ROOT_STRICT } else { 0 })),
            irq_handler: RwLock::new(None),
            endpoints: RwLock::default(),
            context_cache: EntryCache::new(CONTEXT_SETS, CONTEXT_KEY),
            entry_generation: crate::sync::AtomicU64::new(0),
            pasid_cache: EntryCache::new(PASID_SETS, PASID_KEY),
            retag_filter: RetagFilter::new(PASID_SETS * entry_cache::WAYS),
            iotlb: Iotlb::default(),
            runs: RunCache::default(),
            paging_caches: PagingStructureCaches::default(),
            stale: Mutex::default(),
            fills: Mutex::default(),
            drain: RequestDrain::new(),
            stats: IommuStats::default(),
        }))
    }

    /// The memory the IOMMU reads tables from and DMA goes to.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }

    /// The capabilities the model implements.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn formats(&self) -> (FlFormat, SlFormat) {
        (self.fl_format, self.sl_format)
    }

    fn root_state(&self) -> RootState {
        RootState::from_word(self.root.load(Ordering::Acquire))
    }

    /// Registers the receiver of interrupt messages (the platform's MSI delivery).
    pub fn set_interrupt_handler(&self, handler: InterruptHandler) {
        *self
            .irq_handler
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// Connects an ATS/PRI-capable device: device-TLB invalidations and page group
    /// responses for its requester id go to it.
    pub fn attach_endpoint(&self, endpoint: Arc<dyn AtsEndpoint>) {
        self.endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(endpoint.source_id().rid(), endpoint);
    }

    /// Disconnects the device of `sid`.
    pub fn detach_endpoint(&self, sid: SourceId) {
        self.endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&sid.rid());
    }

    /// The ATS, PRI and PASID capabilities of the device of `sid` behind this unit, as
    /// the host reads them from its configuration space; `None` without such a device.
    pub fn endpoint_capabilities(&self, sid: SourceId) -> Option<PcieCapabilities> {
        self.endpoint(sid).map(|ep| ep.pcie_capabilities())
    }

    fn endpoint(&self, sid: SourceId) -> Option<Arc<dyn AtsEndpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&sid.rid())
            .cloned()
    }

    /// Whether strict mode is on.
    pub fn strict(&self) -> bool {
        self.root.load(Ordering::Relaxed) & ROOT_STRICT != 0
    }

    /// Turns strict mode on or off.
    pub fn set_strict(&self, on: bool) {
        if on {
            self.root.fetch_or(ROOT_STRICT, Ordering::AcqRel);
        } else {
            self.root.fetch_and(!ROOT_STRICT, Ordering::AcqRel);
        }
    }

    /// The stale translations strict mode has found, oldest first; empties the list.
    pub fn take_stale_translations(&self) -> Vec<StaleTranslation> {
        std::mem::take(&mut self.stale.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Work counters.
    pub fn stats(&self) -> &IommuStats {
        &self.stats
    }

    /// The IOTLB, for inspection.
    pub fn iotlb(&self) -> &Iotlb {
        &self.iotlb
    }

    /// The paging-structure caches and the second-level mappings of nested walks, for
    /// inspection.
    pub fn paging_structure_caches(&self) -> &PagingStructureCaches {
        &self.paging_caches
    }

    /// Number of cached context and PASID entries.
    pub fn cached_entries(&self) -> (usize, usize) {
        (self.context_cache.len(), self.pasid_cache.len())
    }
}

impl fmt::Debug for Iommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iommu")
            .field("root", &self.root_state())
            .field("iotlb_entries", &self.iotlb.len())
            .field("strict", &self.strict())
            .finish_non_exhaustive()
    }
}

/// CAP_REG of the model (§10.4.2): guest address width `caps.haw`, the second-level depths
/// of `caps.sagaw` (3 and 4 levels by default), 2-MiB and 1-GiB pages at both levels,
/// page-selective invalidation, 8 fault recording registers.
fn cap_register(caps: &Capabilities) -> Cap {
    Cap {
        nd: 6,
        sagaw: caps.sagaw,
        mgaw: caps.haw - 1,
        fro: 0x40,
        sllps: 0b11,
        psi: true,
        nfr: 7,
        mamv: 18,
        dwd: true,
        drd: true,
        fl1gp: true,
        fl5lp: caps.fl5lp,
        ..Cap::default()
    }
}

/// ECAP_REG of the model (§10.4.3): scalable mode, 20-bit PASIDs, queued invalidation, and
/// the translation types and features `caps` lists.
fn ecap_register(caps: &Capabilities) -> Ecap {
    Ecap {
        qi: true,
        dt: caps.dt,
        pt: caps.pt,
        sc: caps.sc,
        iro: 0x50,
        mhmv: 0xf,
        mts: caps.mts,
        nest: caps.nest,
        prs: caps.prs,
        ers: caps.ers,
        srs: caps.srs,
        eafs: caps.eafs,
        pss: 19,
        pasid: caps.pasid,
        pds: true,
        smts: true,
        slads: caps.slads,
        slts: caps.slts,
        flts: caps.flts,
        smpwcs: caps.smpwc,
        ..Ecap::default()
    }
}
