//! Walk explanations of the model: [`vsva_vtd::explain::Explanation`] of a request under
//! the model's root table, capabilities and paging formats.

use vsva_vtd::explain::Explanation;
use vsva_vtd::{addr::Pasid, addr::SourceId, request::Request, walk::AccessRequest};

use super::Iommu;

impl Iommu {
    /// Explains how a request would be translated now, from the tables in memory (the
    /// caches are neither used nor changed; accessed/dirty bits are set as a walk would).
    pub fn explain(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Explanation {
        let req = Request::new(sid, pasid, addr, access);
        Explanation::of(
            &*self.mem,
            self.root_state(),
            &self.caps,
            self.formats(),
            req,
        )
    }
}
