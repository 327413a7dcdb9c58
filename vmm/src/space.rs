//! Address spaces of a virtual IOMMU as vm-memory [`Iommu`](vm_memory::Iommu)s, so that device models written
//! against vm-memory's `IoMemory` (`IommuMemory` over the guest's `GuestMemoryMmap`) DMA
//! through the guest's tables unchanged: one (requester, PASID) space of the vIOMMU
//! ([`IommuAddressSpace`]), one (StreamID, SubstreamID) space of the vSMMU
//! ([`SmmuAddressSpace`]).
//!
//! Each address space keeps a vm-memory [`Iotlb`] filled from its unit's translations. It
//! is one more TLB of the unit: the guest's invalidations remove from it what they remove
//! from a TLB of that unit, and nothing else does, so a stale translation stays in use
//! until the guest invalidates it. Both units share this machinery ([`SpaceUnit`]); what
//! differs is how they translate a run of pages and which cached runs an invalidation
//! covers ([`SpaceScope`]).
//!
//! A miss is filled a run per walk: the unit walks to the first page and continues along
//! the leaf table it ended in while the entries map the next pages contiguously with the
//! same rights, up to the end of the access. The run is cached as one entry, so that an
//! invalidation that covers any of its pages removes all of them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak};

use vm_memory::iommu::{Error, IotlbFails, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::viommu::lock;

/// How many times a translation is retried when invalidations keep racing with it.
const FILL_ATTEMPTS: usize = 4;

/// Which cached pages of an address space an invalidation removes.
pub(crate) trait SpaceScope: Copy + Send + Sync + 'static {
    /// Which address space of the unit (its requester, PASID or SubstreamID, privilege).
    type Key: Copy + fmt::Debug + Send + Sync + 'static;
    /// What a translated page's TLB entry is tagged with (domain id and PASID, ASID).
    type Tag: Copy + PartialEq + fmt::Debug + Send + Sync + 'static;

    /// Whether the invalidation removes the cached page `page` of the space `key`, whose
    /// entries came from `tag` (`None`: untranslated pages, cached while the unit did not
    /// translate); `global`: the page's leaf serves every tag.
    fn covers(&self, key: &Self::Key, tag: Option<Self::Tag>, page: &CachedPage) -> bool;
}

/// One run of pages an address space holds (or what a later run left of it): its input
/// bytes `start..=last`, and whether its leaves are global (nG = 0: the TLB entry serves
/// every ASID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CachedPage {
    pub start: u64,
    pub last: u64,
    pub global: bool,
}

/// Pages the unit translated for an address space: a run of consecutive pages of one size
/// whose output is contiguous, with the same tag and rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpaceRun<T> {
    /// The tag of the structure the translation came from (`None`: untranslated).
    pub tag: Option<T>,
    /// The leaves are global.
    pub global: bool,
    /// The size in bytes of each page (a power of two).
    pub size: u64,
    /// The guest physical address of the first page's first byte.
    pub output: u64,
    /// Writes are allowed without another walk (writable and dirty).
    pub writable: bool,
    /// The run's length in bytes: a multiple of `size`.
    pub len: u64,
}

impl<T: PartialEq> SpaceRun<T> {
    /// Grows the run, whose first page holds `addr`, by the pages after it up to the one
    /// holding `last`, while the page `next` translates at each page's first byte continues
    /// it: same size, tag and rights, output right after the run's. Stops at the first page
    /// that does not (or that `next` does not translate: its fault is for a request of its
    /// own to meet), and at the top of the address space.
    pub fn grow(&mut self, addr: u64, last: u64, mut next: impl FnMut(u64) -> Option<Self>) {
        let base = addr & !(self.size - 1);
        while let Some(page) = base.checked_add(self.len).filter(|&p| p <= last) {
            let continues = next(page).is_some_and(|t| {
                t.size == self.size
                    && t.tag == self.tag
                    && t.global == self.global
                    && t.writable == self.writable
                    && Some(t.output) == self.output.checked_add(self.len)
            });
            if !continues {
                return;
            }
            self.len += self.size;
        }
    }
}

/// The last input byte of the table that holds the entry translating `addr`, where each of
/// the table's entries maps `1 << entry_shift` bytes and the table resolves `index_bits`
/// bits: a run continued along a leaf table stops there.
pub(crate) fn table_last(addr: u64, entry_shift: u32, index_bits: u32) -> u64 {
    let span = entry_shift + index_bits;
    if span >= 64 {
        u64::MAX
    } else {
        addr | ((1 << span) - 1)
    }
}

/// A virtual IOMMU whose address spaces an [`AddressSpace`] serves.
pub(crate) trait SpaceUnit: Send + Sync + 'static {
    /// Its invalidations.
    type Scope: SpaceScope;

    /// Translates the page holding `addr` for the space `key`, `write` or read, with one
    /// walk; a fault is recorded as the unit records it, and its text returned. The run
    /// answered continues with the pages after it, up to the one holding `last`, that the
    /// same leaf table maps contiguously with the same rights (each entry updated as a walk
    /// of its page updates it): so that an invalidation of any page of the run, or of the
    /// table entry above it, is one the space's scope removes the whole run with.
    fn translate_run(
        &self,
        key: &<Self::Scope as SpaceScope>::Key,
        addr: u64,
        write: bool,
        last: u64,
    ) -> Result<SpaceRun<<Self::Scope as SpaceScope>::Tag>, String>;

    /// The unit's address spaces.
    fn spaces(&self) -> &Spaces<Self::Scope>;
}

/// What one address space caches: the vm-memory IOTLB and the pages in it.
struct Cached<S: SpaceScope> {
    /// The tag of every translated page cached (one structure at a time).
    tag: Option<S::Tag>,
    /// The pages cached, by first input byte.
    pages: BTreeMap<u64, CachedPage>,
}

/// The IOTLB of one address space, as the unit's invalidations see it.
pub(crate) struct SpaceTlb<S: SpaceScope> {
    key: S::Key,
    cached: Mutex<Cached<S>>,
    iotlb: RwLock<Iotlb>,
    /// Advanced by every invalidation: a translation started before one is not cached.
    epoch: AtomicU64,
}

impl<S: SpaceScope> SpaceTlb<S> {
    fn read(&self) -> RwLockReadGuard<'_, Iotlb> {
        self.iotlb.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the pages `scope` covers. The epoch advances whatever the scope, so that a
    /// translation in flight, whose tag is not known yet, is not cached.
    fn invalidate(&self, scope: S) {
        let mut cached = lock(&self.cached);
        let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let tag = cached.tag;
        cached.pages.retain(|_, page| {
            let covered = scope.covers(&self.key, tag, page);
            if covered {
                iotlb.invalidate_mapping(GuestAddress(page.start), span(page));
            }
            !covered
        });
        if cached.pages.is_empty() {
            cached.tag = None;
        }
    }

    /// Caches a translated run at `base` as one entry, unless an invalidation happened since
    /// the translation started (`epoch`) or the run's tag is not the tag of what is cached
    /// (then what is cached goes: it came from a structure the unit no longer uses). The
    /// entries it overlaps keep only what lies outside it.
    fn cache(&self, epoch: u64, base: u64, run: &SpaceRun<S::Tag>) -> Result<(), Error> {
        let mut cached = lock(&self.cached);
        let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        if self.epoch.load(Ordering::Acquire) != epoch {
            return Ok(());
        }
        if cached.tag != run.tag {
            iotlb.invalidate_all();
            cached.pages.clear();
            cached.tag = run.tag;
        }
        // The last page of the address space ends at 2^64, which the IOTLB's ranges
        // cannot hold: its last byte stays untranslated.
        let last = base + (run.len - 1).min(u64::MAX - 1 - base);
        trim(&mut cached.pages, base, last);
        let entry = CachedPage {
            start: base,
            last,
            global: run.global,
        };
        let perms = if run.writable {
            Permissions::ReadWrite
        } else {
            Permissions::Read
        };
        iotlb.set_mapping(
            GuestAddress(base),
            GuestAddress(run.output),
            span(&entry),
            perms,
        )?;
        cached.pages.insert(base, entry);
        Ok(())
    }
}

/// Cuts `base..=last` out of the entries of `pages` (which do not overlap each other): an
/// entry it overlaps keeps its parts before and after, which the IOTLB still maps.
fn trim(pages: &mut BTreeMap<u64, CachedPage>, base: u64, last: u64) {
    let overlapped: Vec<CachedPage> = pages
        .range(..=last)
        .rev()
        .map(|(_, page)| *page)
        .take_while(|page| page.last >= base)
        .collect();
    for page in overlapped {
        pages.remove(&page.start);
        if page.start < base {
            let before = CachedPage {
                last: base - 1,
                ..page
            };
            pages.insert(page.start, before);
        }
        if page.last > last {
            let after = CachedPage {
                start: last + 1,
                ..page
            };
            pages.insert(last + 1, after);
        }
    }
}

/// The length of a cached page (below 2^64 by construction).
fn span(page: &CachedPage) -> usize {
    (page.last - page.start + 1) as usize
}

/// The live address spaces of a unit.
pub(crate) struct Spaces<S: SpaceScope>(Mutex<Vec<Weak<SpaceTlb<S>>>>);

impl<S: SpaceScope> Default for Spaces<S> {
    fn default() -> Self {
        Spaces(Mutex::default())
    }
}

impl<S: SpaceScope> Spaces<S> {
    /// A new, empty IOTLB for the space `key`, which the unit's invalidations reach.
    fn register(&self, key: S::Key) -> Arc<SpaceTlb<S>> {
        let tlb = Arc::new(SpaceTlb {
            key,
            cached: Mutex::new(Cached {
                tag: None,
                pages: BTreeMap::new(),
            }),
            iotlb: RwLock::new(Iotlb::new()),
            epoch: AtomicU64::new(0),
        });
        let mut spaces = lock(&self.0);
        spaces.retain(|w| w.strong_count() > 0);
        spaces.push(Arc::downgrade(&tlb));
        tlb
    }

    /// Passes an invalidation to every address space.
    pub fn invalidate(&self, scope: S) {
        let spaces: Vec<_> = lock(&self.0).iter().filter_map(|w| w.upgrade()).collect();
        for s in spaces {
            s.invalidate(scope);
        }
    }
}

/// One address space of `U`, for vm-memory's `IommuMemory`.
pub(crate) struct AddressSpace<U: SpaceUnit> {
    unit: Arc<U>,
    tlb: Arc<SpaceTlb<U::Scope>>,
}

impl<U: SpaceUnit> AddressSpace<U> {
    pub(crate) fn new(unit: Arc<U>, key: <U::Scope as SpaceScope>::Key) -> Self {
        let tlb = unit.spaces().register(key);
        AddressSpace { unit, tlb }
    }

    /// Which address space it is.
    pub(crate) fn key(&self) -> &<U::Scope as SpaceScope>::Key {
        &self.tlb.key
    }

    /// Translates the pages the lookup could not serve, a run per walk, and caches them.
    fn fill(&self, fails: &IotlbFails, access: Permissions) -> Result<(), Error> {
        for range in fails.misses.iter().chain(&fails.access_fails) {
            let end = range.base.0 + range.length as u64;
            let mut addr = range.base.0;
            while addr < end {
                let epoch = self.tlb.epoch.load(Ordering::Acquire);
                let run = self
                    .unit
                    .translate_run(&self.tlb.key, addr, access.has_write(), end - 1)
                    .map_err(|reason| Error::CannotResolve {
                        iova_range: IovaRange {
                            base: GuestAddress(addr),
                            length: (end - addr) as usize,
                        },
                        reason,
                    })?;
                let base = addr & !(run.size - 1);
                self.tlb.cache(epoch, base, &run)?;
                match base.checked_add(run.len) {
                    Some(next) => addr = next,
                    None => break,
                }
            }
        }
        Ok(())
    }

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<RwLockReadGuard<'_, Iotlb>>, Error> {
        let range = || IovaRange { base: iova, length };
        if iova.0.checked_add(length as u64).is_none() {
            return Err(Error::CannotResolve {
                iova_range: range(),
                reason: "the range wraps around the address space".into(),
            });
        }
        for _ in 0..FILL_ATTEMPTS {
            match Iotlb::lookup(self.tlb.read(), iova, length, access) {
                Ok(it) => return Ok(it),
                Err(fails) => self.fill(&fails, access)?,
            }
        }
        Err(Error::CannotResolve {
            iova_range: range(),
            reason: "invalidations kept removing the translation".into(),
        })
    }
}

/// A public address space type over [`AddressSpace`] of a unit whose spaces are keyed by
/// three values: the type with its `Iommu` and `Debug`, the unit's `address_space`
/// constructor and an accessor for each value.
macro_rules! address_space {
    (
        $(#[$doc:meta])* $name:ident of $unit:ty;
        $(#[$new_doc:meta])* fn address_space;
        $($(#[$field_doc:meta])* $field:ident: $ty:ty = $idx:tt),+ $(,)?
    ) => {
        $(#[$doc])*
        pub struct $name(crate::space::AddressSpace<$unit>);

        impl $unit {
            $(#[$new_doc])*
            pub fn address_space(self: &std::sync::Arc<Self>, $($field: $ty),+) -> $name {
                $name(crate::space::AddressSpace::new(self.clone(), ($($field),+)))
            }
        }

        impl $name {
            $(
                $(#[$field_doc])*
                pub fn $field(&self) -> $ty {
                    self.0.key().$idx
                }
            )+
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    $(.field(stringify!($field), &self.$field()))+
                    .finish_non_exhaustive()
            }
        }

        impl vm_memory::Iommu for $name {
            type IotlbGuard<'a> = std::sync::RwLockReadGuard<'a, vm_memory::Iotlb>;

            fn translate(
                &self,
                iova: vm_memory::GuestAddress,
                length: usize,
                access: vm_memory::Permissions,
            ) -> Result<vm_memory::iommu::IotlbIterator<Self::IotlbGuard<'_>>, vm_memory::iommu::Error>
            {
                self.0.translate(iova, length, access)
            }
        }
    };
}

address_space! {
    /// A (requester id, PASID) address space of the vIOMMU, for vm-memory's
    /// `IommuMemory`.
    IommuAddressSpace of crate::viommu::VIommu;
    /// The address space that requests of `source_id` with `pasid` (or without PASID) see,
    /// with user or `supervisor` privilege.
    fn address_space;
    /// The requester id of the address space.
    source_id: vsva_vtd::addr::SourceId = 0,
    /// The PASID of the address space (`None`: requests without PASID).
    pasid: Option<vsva_vtd::addr::Pasid> = 1,
    /// Whether its requests are supervisor requests.
    supervisor: bool = 2,
}

address_space! {
    /// A (StreamID, SubstreamID) address space of the vSMMU, for vm-memory's
    /// `IommuMemory`.
    SmmuAddressSpace of crate::vsmmu::VSmmu;
    /// The address space that transactions of the emulated device `stream_id` with
    /// `substream_id` (or without SubstreamID) see, privileged (PnU) or not.
    fn address_space;
    /// The StreamID of the address space.
    stream_id: u32 = 0,
    /// The SubstreamID of the address space (`None`: transactions without one).
    substream_id: Option<u32> = 1,
    /// Whether its transactions are privileged (PnU).
    privileged: bool = 2,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(start: u64, last: u64) -> CachedPage {
        CachedPage {
            start,
            last,
            global: false,
        }
    }

    #[test]
    fn a_run_cached_over_other_entries_leaves_what_lies_outside_it() {
        let mut pages: BTreeMap<u64, CachedPage> =
            [page(0, 0x3fff), page(0x4000, 0x4fff), page(0x8000, 0xbfff)]
                .into_iter()
                .map(|p| (p.start, p))
                .collect();
        trim(&mut pages, 0x1000, 0x8fff);
        assert_eq!(
            pages.into_values().collect::<Vec<_>>(),
            [page(0, 0xfff), page(0x9000, 0xbfff)]
        );
    }

    fn run(output: u64) -> SpaceRun<u16> {
        SpaceRun {
            tag: Some(1),
            global: false,
            size: 0x1000,
            output,
            writable: true,
            len: 0x1000,
        }
    }

    #[test]
    fn a_run_grows_while_the_next_page_continues_it() {
        // Pages below 0x5000 continue the run; the output of 0x5000 jumps.
        let next = |a: u64| {
            Some(run(if a < 0x5000 {
                0x10_0000 + a - 0x1000
            } else {
                0
            }))
        };
        let mut r = run(0x10_0000);
        r.grow(0x1234, u64::MAX, next);
        assert_eq!(r.len, 0x4000);
        // Up to the page holding `last`.
        let mut r = run(0x10_0000);
        r.grow(0x1234, 0x2000, next);
        assert_eq!(r.len, 0x2000);
        // A page of other rights, tag, globality or size, or one that faults, ends it.
        let after = run(0x10_1000);
        for other in [
            SpaceRun {
                writable: false,
                ..after
            },
            SpaceRun {
                tag: Some(2),
                ..after
            },
            SpaceRun {
                global: true,
                ..after
            },
            SpaceRun {
                size: 0x20_0000,
                ..after
            },
        ] {
            let mut r = run(0x10_0000);
            r.grow(0x1000, u64::MAX, |_| Some(other));
            assert_eq!(r.len, 0x1000, "{other:?}");
        }
        let mut r = run(0x10_0000);
        r.grow(0x1000, u64::MAX, |_| None);
        assert_eq!(r.len, 0x1000);
        // The last page of the address space has no page after it.
        let mut r = run(0);
        r.grow(u64::MAX, u64::MAX, |a| Some(run(a)));
        assert_eq!(r.len, 0x1000);
    }

    #[test]
    fn a_leaf_table_ends_where_its_entries_stop_resolving_the_address() {
        assert_eq!(table_last(0x20_1234, 12, 9), 0x3f_ffff);
        assert_eq!(table_last(0x7f00_4020_1234, 21, 9), 0x7f00_7fff_ffff);
        assert_eq!(table_last(0x1234, 48, 16), u64::MAX);
    }
}
