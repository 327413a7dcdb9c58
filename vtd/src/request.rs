//! What a remapping unit decides about one DMA request (VT-d §3.4 to §3.9): the translation
//! state its registers latch, and the fault a request ends in.

use std::fmt;

use crate::addr::{Pasid, SourceId};
use crate::fault::FaultReason;
use crate::regs::{RegisterFile, Ttm};

/// How requests are translated now: GSTS.TES and the root table RTADDR_REG latched (§10.4.5,
/// §10.4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootState {
    /// GSTS.TES clear: requests go to memory untranslated.
    Disabled,
    /// Translation enabled with a root table that is not in scalable mode (legacy, or a
    /// reserved TTM): every request faults (RTA.1, or RTA.2 with a PASID).
    NotScalable,
    /// Translation enabled, scalable-mode root table at this address.
    Scalable(u64),
}

impl RootState {
    /// Root word bit: GSTS.TES is set.
    const TES: u64 = 1;
    /// Root word bit: the latched root table is in scalable mode.
    const SCALABLE: u64 = 2;
    /// The low bits of a root word this type leaves to the unit for flags of its own (the
    /// root table address is 4-KiB aligned, and bits 0 and 1 are taken).
    pub const UNIT_FLAGS: u64 = 0xffc;

    /// The root word of `regs`: the latched root table address with the translation enable
    /// and the table mode in its low bits, so that a request reads its state in one load.
    pub fn word(regs: &RegisterFile) -> u64 {
        let rt = regs.root_table();
        let mut word = rt.addr & !0xfff;
        if rt.ttm == Ttm::Scalable {
            word |= Self::SCALABLE;
        }
        if regs.translation_enabled() {
            word |= Self::TES;
        }
        word
    }

    /// The state a root word holds (flags of the unit ignored).
    #[inline(always)]
    pub const fn from_word(word: u64) -> Self {
        if word & Self::TES == 0 {
            RootState::Disabled
        } else if word & Self::SCALABLE == 0 {
            RootState::NotScalable
        } else {
            RootState::Scalable(word & !0xfff)
        }
    }

    /// The latched scalable-mode root table of a root word, whether or not translation is
    /// enabled: where a unit reads the tables it shadows.
    pub const fn scalable_table(word: u64) -> Option<u64> {
        if word & Self::SCALABLE != 0 {
            Some(word & !0xfff)
        } else {
            None
        }
    }

    /// The fault of every request while the root table is not in scalable mode: RTA.2 for a
    /// request with PASID, RTA.1 without (§7.1.3).
    pub const fn not_scalable_fault(pasid: Option<Pasid>) -> FaultReason {
        if pasid.is_some() {
            FaultReason::Rta2
        } else {
            FaultReason::Rta1
        }
    }
}

/// A DMA request the remapping unit could not translate: the fault condition, and what
/// decides whether and how it is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub struct TranslationFault {
    /// The requester.
    pub sid: SourceId,
    /// The PASID the request carried, if any.
    pub pasid: Option<Pasid>,
    /// The address requested.
    pub addr: u64,
    /// The fault condition.
    pub reason: FaultReason,
    /// Fault processing disabled by an FPD field on the way: not recorded.
    pub fpd: bool,
    /// A first-level not-present or permission fault under a context entry with PRE set:
    /// a translation request may resolve it with a page request (§7.4).
    pub recoverable: bool,
}

impl fmt::Display for TranslationFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {:#x} (sid {}, ", self.reason, self.addr, self.sid)?;
        match self.pasid {
            Some(p) => write!(f, "{p})"),
            None => write!(f, "no PASID)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_word_holds_the_enable_the_mode_and_the_table() {
        assert_eq!(RootState::from_word(0), RootState::Disabled);
        // A latched scalable table is kept with translation off, for shadowing.
        let off = 0x5000 | RootState::SCALABLE;
        assert_eq!(RootState::from_word(off), RootState::Disabled);
        assert_eq!(RootState::scalable_table(off), Some(0x5000));
        let on = off | RootState::TES;
        assert_eq!(RootState::from_word(on), RootState::Scalable(0x5000));
        // Unit flags do not change the state.
        assert_eq!(
            RootState::from_word(on | RootState::UNIT_FLAGS),
            RootState::Scalable(0x5000)
        );
        let legacy = 0x5000 | RootState::TES;
        assert_eq!(RootState::from_word(legacy), RootState::NotScalable);
        assert_eq!(RootState::scalable_table(legacy), None);
        let p = Pasid::new(1).unwrap();
        assert_eq!(RootState::not_scalable_fault(Some(p)), FaultReason::Rta2);
        assert_eq!(RootState::not_scalable_fault(None), FaultReason::Rta1);
    }

    #[test]
    fn a_fault_names_the_reason_the_address_and_the_requester() {
        let f = TranslationFault {
            sid: SourceId::from_rid(0x18),
            pasid: None,
            addr: 0x1000,
            reason: FaultReason::Sfl2,
            fpd: false,
            recoverable: false,
        };
        assert!(f.to_string().contains("0x1000"), "{f}");
        assert!(f.to_string().ends_with("no PASID)"), "{f}");
    }
}
