//! Walk explanations: the whole translation of one request from the root table down, with
//! every entry read, bypassing the caches, for a person asking why a DMA faulted.

use std::fmt;

use vsva_vtd::pasid::lookup_pasid_entry;
use vsva_vtd::{
    AccessRequest, FaultReason, Pasid, PasidLookup, RootState, SourceId, Translation, WalkRecord,
};

use super::Iommu;
use vsva_vtd::request::walk_pasid_entry;

/// The explanation of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Requester id of the request.
    pub sid: SourceId,
    /// Its PASID, if it carried one.
    pub pasid: Option<Pasid>,
    /// The address it asked to translate.
    pub addr: u64,
    /// Root table address, when translation is enabled in scalable mode.
    pub root: Option<u64>,
    /// What the walk above the page tables found.
    pub lookup: Result<PasidLookup, FaultReason>,
    /// Every page-table entry read, first and second level, in walk order.
    pub walk: WalkRecord,
    /// The outcome.
    pub result: Result<Translation, FaultReason>,
}

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
        let mut walk = WalkRecord::default();
        let (root, lookup) = match self.root_state() {
            RootState::Scalable(rta) => (
                Some(rta),
                lookup_pasid_entry(&*self.mem, rta, sid, pasid, &self.caps).map_err(|f| f.reason),
            ),
            RootState::NotScalable | RootState::Disabled => (None, Err(FaultReason::Rta1)),
        };
        let result = match &lookup {
            Ok(l) => walk_pasid_entry(
                &*self.mem,
                &l.entry,
                self.formats(),
                addr,
                access,
                &mut walk,
            )
            .map_err(|f| f.reason),
            Err(r) => Err(*r),
        };
        Explanation {
            sid,
            pasid,
            addr,
            root,
            lookup,
            walk,
            result,
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pasid = self.pasid.map_or("no PASID".to_string(), |p| p.to_string());
        writeln!(
            f,
            "request: sid {} {} address {:#x}",
            self.sid, pasid, self.addr
        )?;
        match self.root {
            Some(r) => writeln!(f, "root table: {r:#x} (scalable mode)")?,
            None => writeln!(f, "root table: none (translation disabled or legacy mode)")?,
        }
        match &self.lookup {
            Ok(l) => {
                let c = &l.context;
                writeln!(
                    f,
                    "context entry: PASIDE={} PRE={} DTE={} PASID directory {:#x} ({} entries)",
                    c.paside as u8,
                    c.pre as u8,
                    c.dte as u8,
                    c.pasiddirptr,
                    c.pasid_dir_entries()
                )?;
                let e = &l.entry;
                writeln!(
                    f,
                    "PASID entry {}: PGTT={:?} DID={} FLPTR={:#x} FLPM={:?} SLPTR={:#x} AW={:?} SRE={}",
                    l.pasid, e.pgtt, e.did.0, e.flptptr, e.flpm, e.slptptr, e.aw, e.sre as u8
                )?;
            }
            Err(r) => writeln!(f, "above the page tables: fault {r}")?,
        }
        write!(f, "{}", self.walk)?;
        match &self.result {
            Ok(t) => writeln!(
                f,
                "result: HPA {:#x} ({:?} page, r{} w{} x{} u{})",
                t.output,
                t.page_size,
                t.perms.read as u8,
                t.perms.write as u8,
                t.perms.execute as u8,
                t.perms.user as u8
            ),
            Err(r) => writeln!(
                f,
                "result: fault {} (reason {:#04x}): {}",
                r.name(),
                r.code(),
                r.description()
            ),
        }
    }
}
