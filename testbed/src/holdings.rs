//! What the host holds on behalf of its VMs: memory, cached translations, domain ids,
//! devices, page request routes and PASIDs. A VM that shut down must leave the host
//! holding what it held before the VM booted; `vsva run teardown`, `vsva demo` and the
//! end-to-end tests all check that with [`HostHoldings`].

use std::fmt;
use std::sync::PoisonError;

use serde::Serialize;
use vsva_hw::iommu::pscache::CachedTables;

use crate::stack::Host;

/// A snapshot of what the host holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostHoldings {
    /// Host memory allocated (guest RAM, page tables, queues).
    pub allocated_bytes: u64,
    /// Domain ids in use by the host driver.
    pub domain_ids: usize,
    /// Devices attached to a domain.
    pub devices: usize,
    /// Page request routes of the host driver.
    pub page_request_routes: usize,
    /// Page request sinks (VFIO fault queues) registered with the host driver.
    pub page_request_sinks: usize,
    /// PASIDs allocated from the host's PASID space.
    pub pasids: usize,
    /// IOTLB entries of the physical IOMMU.
    pub iotlb: usize,
    /// Cached context entries and PASID entries of the physical IOMMU.
    pub context_and_pasid_cache: (usize, usize),
    /// Paging-structure cache entries of the physical IOMMU.
    #[serde(skip)]
    pub paging_structure_caches: CachedTables,
}

impl HostHoldings {
    /// What `host` holds now.
    pub fn of(host: &Host) -> HostHoldings {
        HostHoldings {
            allocated_bytes: host.frames.allocated_bytes(),
            domain_ids: host.unit.domain_ids_in_use(),
            devices: host.unit.attached_devices(),
            page_request_routes: host.unit.page_request_routes(),
            page_request_sinks: host.unit.page_request_sinks(),
            pasids: host
                .pasids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .total_allocated(),
            iotlb: host.iommu.iotlb().len(),
            context_and_pasid_cache: host.iommu.cached_entries(),
            paging_structure_caches: host.iommu.paging_structure_caches().len(),
        }
    }

    /// What `self` holds beyond `before` (each count saturating at zero): what is left
    /// over when `before` was taken before a VM booted and `self` after it shut down.
    pub fn beyond(&self, before: &HostHoldings) -> HostHoldings {
        let pscache = |s: &CachedTables, b: &CachedTables| CachedTables {
            first_level: s.first_level.saturating_sub(b.first_level),
            second_level: s.second_level.saturating_sub(b.second_level),
            nested_mappings: s.nested_mappings.saturating_sub(b.nested_mappings),
        };
        HostHoldings {
            allocated_bytes: self.allocated_bytes.saturating_sub(before.allocated_bytes),
            domain_ids: self.domain_ids.saturating_sub(before.domain_ids),
            devices: self.devices.saturating_sub(before.devices),
            page_request_routes: self
                .page_request_routes
                .saturating_sub(before.page_request_routes),
            page_request_sinks: self
                .page_request_sinks
                .saturating_sub(before.page_request_sinks),
            pasids: self.pasids.saturating_sub(before.pasids),
            iotlb: self.iotlb.saturating_sub(before.iotlb),
            context_and_pasid_cache: (
                self.context_and_pasid_cache
                    .0
                    .saturating_sub(before.context_and_pasid_cache.0),
                self.context_and_pasid_cache
                    .1
                    .saturating_sub(before.context_and_pasid_cache.1),
            ),
            paging_structure_caches: pscache(
                &self.paging_structure_caches,
                &before.paging_structure_caches,
            ),
        }
    }

    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        *self == HostHoldings::default()
    }
}

impl fmt::Display for HostHoldings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ps = &self.paging_structure_caches;
        write!(
            f,
            "{} bytes allocated, {} IOTLB entries, {} context and {} PASID cache entries, {} paging-structure cache entries, {} domain ids in use, {} devices attached, {} page request routes and {} sinks, {} PASIDs allocated",
            self.allocated_bytes,
            self.iotlb,
            self.context_and_pasid_cache.0,
            self.context_and_pasid_cache.1,
            ps.first_level + ps.second_level + ps.nested_mappings,
            self.domain_ids,
            self.devices,
            self.page_request_routes,
            self.page_request_sinks,
            self.pasids
        )
    }
}
