//! Explanations: the whole translation of one transaction from the stream table down,
//! STE, CD and every descriptor read (stage-2 lookups of CD fetches and of stage-1 tables
//! included), for a person asking why a DMA faulted (§3.3, §5.2, §5.4; Arm ARM D8).
//! A model fills one in from its tables, without its caches.

use std::fmt;

use crate::cd::ContextDescriptor;
use crate::lookup::ConfigFault;
use crate::ste::Ste;
use crate::walk::{PageSize, WalkFault, WalkRecord};

/// What the tables say about a transaction, read afresh: the outcome of an explanation, and
/// what a strict model compares a cached translation with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fresh {
    /// A page at `base` of `size`.
    Page {
        /// The output page base.
        base: u64,
        /// The page size.
        size: PageSize,
    },
    /// The stream bypasses translation.
    Bypass,
    /// The stream aborts.
    Abort,
    /// A configuration error.
    Config(ConfigFault),
    /// A translation fault.
    Walk(WalkFault),
}

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
