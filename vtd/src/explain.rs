//! Walk explanations: the whole translation of one request from the root table down, with
//! every entry read, bypassing the caches, for a person asking why a DMA faulted (the
//! steps of §3.4 to §3.9 as [`crate::request::translate`] takes them on a miss).

use std::fmt;

use crate::addr::{Pasid, SourceId};
use crate::fault::FaultReason;
use crate::flpte::FlFormat;
use crate::pasid::{lookup_pasid_entry, PasidLookup};
use crate::request::{walk_pasid_entry, Request, RootState};
use crate::root::Capabilities;
use crate::slpte::SlFormat;
use crate::walk::{Translation, WalkRecord};
use vsva_mem::PhysMem;

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

impl Explanation {
    /// Explains how `req` is translated now under `root` by a unit with `caps` and the
    /// paging `formats`, from the tables in `mem`: no cache is used, and accessed/dirty
    /// bits are set as a walk sets them.
    pub fn of<M: PhysMem>(
        mem: &M,
        root: RootState,
        caps: &Capabilities,
        formats: (FlFormat, SlFormat),
        req: Request,
    ) -> Explanation {
        let mut walk = WalkRecord::default();
        let (root, lookup) = match root {
            RootState::Scalable(rta) => (
                Some(rta),
                lookup_pasid_entry(mem, rta, req.sid, req.pasid, caps).map_err(|f| f.reason),
            ),
            RootState::NotScalable | RootState::Disabled => (None, Err(FaultReason::Rta1)),
        };
        let result = match &lookup {
            Ok(l) => walk_pasid_entry(mem, &l.entry, formats, req.addr, req.access, &mut walk)
                .map_err(|f| f.reason),
            Err(r) => Err(*r),
        };
        Explanation {
            sid: req.sid,
            pasid: req.pasid,
            addr: req.addr,
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
                let e = l.entry.decode();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::tests::CAPS;
    use crate::testutil::TestMemory;
    use crate::walk::AccessRequest;

    fn formats() -> (FlFormat, SlFormat) {
        (FlFormat::new(46, true).unwrap(), SlFormat::new(46).unwrap())
    }

    fn request() -> Request {
        Request {
            sid: SourceId::from_rid(0x0108),
            pasid: Some(Pasid::new(5).unwrap()),
            addr: 0x5000,
            access: AccessRequest::READ,
        }
    }

    #[test]
    fn without_a_scalable_root_table_the_request_faults_rta1_and_reads_nothing() {
        let mem = TestMemory::new(0x10000);
        for root in [RootState::Disabled, RootState::NotScalable] {
            let e = Explanation::of(&mem, root, &CAPS, formats(), request());
            assert_eq!(e.root, None);
            assert_eq!(e.lookup, Err(FaultReason::Rta1));
            assert_eq!(e.result, Err(FaultReason::Rta1));
            assert!(e.walk.steps.is_empty());
            assert!(e.to_string().contains("result: fault RTA.1"), "{e}");
        }
    }

    #[test]
    fn an_absent_context_entry_is_the_fault_above_the_page_tables() {
        // A zeroed root table: the root entry is not present.
        let mem = TestMemory::new(0x10000);
        let e = Explanation::of(
            &mem,
            RootState::Scalable(0x1000),
            &CAPS,
            formats(),
            request(),
        );
        assert_eq!(e.root, Some(0x1000));
        let reason = e.lookup.as_ref().unwrap_err();
        assert_eq!(e.result, Err(*reason));
        assert!(e.walk.steps.is_empty());
        assert!(
            e.to_string().contains("above the page tables: fault"),
            "{e}"
        );
    }
}
