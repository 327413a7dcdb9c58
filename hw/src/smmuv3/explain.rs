//! Explanations: the whole translation of one transaction from the stream table down,
//! STE, CD and every descriptor read (stage-2 lookups of CD fetches and of stage-1 tables
//! included), for a person asking why a DMA faulted. The caches are neither used nor
//! changed, and no access or dirty flag is set.

use std::fmt;

use vsva_smmuv3::{AccessRequest, ConfigFault, ContextDescriptor, Ste, WalkRecord};

use super::stale::Fresh;
use super::Smmu;

/// The explanation of one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmmuExplanation {
    /// StreamID.
    pub sid: u32,
    /// SubstreamID, when the transaction carries one.
    pub ssid: Option<u32>,
    /// The input address.
    pub addr: u64,
    /// The STE, or why it could not be used.
    pub ste: Result<Ste, ConfigFault>,
    /// The CD, when stage 1 needed one.
    pub cd: Option<Result<ContextDescriptor, ConfigFault>>,
    /// Every descriptor read, in walk order.
    pub walk: WalkRecord,
    /// The outcome.
    pub result: Fresh,
}

impl Smmu {
    /// Explains how a transaction would be translated now, from the tables in memory.
    pub fn explain(
        &self,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
    ) -> SmmuExplanation {
        let mut walk = WalkRecord::default();
        let state = self.lock();
        let (ste, cd, result) = self.resolve(&state, sid, ssid, addr, access, &mut walk);
        SmmuExplanation {
            sid,
            ssid,
            addr,
            ste,
            cd,
            walk,
            result,
        }
    }
}

impl fmt::Display for SmmuExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sid {} ssid {:?} addr {:#x}",
            self.sid, self.ssid, self.addr
        )?;
        match &self.ste {
            Ok(ste) => writeln!(f, "STE: {ste}")?,
            Err(e) => writeln!(f, "STE: {e}")?,
        }
        match &self.cd {
            Some(Ok(cd)) => writeln!(
                f,
                "CD: ASID {} TTB0 {:#x} T0SZ {}",
                cd.asid, cd.ttb0, cd.t0sz
            )?,
            Some(Err(e)) => writeln!(f, "CD: {e}")?,
            None => {}
        }
        if !self.walk.steps.is_empty() {
            writeln!(f, "{}", self.walk)?;
        }
        write!(f, "result: {:?}", self.result)
    }
}
