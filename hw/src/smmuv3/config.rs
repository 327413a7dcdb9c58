//! The configuration cache (IHI 0070 §16.2): STEs by StreamID and CDs by (StreamID, CD
//! index), kept until CMD_CFGI_STE, CMD_CFGI_STE_RANGE, CMD_CFGI_CD or CMD_CFGI_CD_ALL
//! removes them (§4.3). CMD_CFGI_ALL (STE_RANGE with Range 31) removes every STE and CD;
//! the STE commands leave the CDs of the stream cached, as the spec allows.

use std::collections::HashMap;

use vsva_smmuv3::{cd::ContextDescriptor, cmd::Cmd, ste::Ste, walk::S1Config};

/// A cached CD with the stage-1 configuration derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedCd {
    /// The CD.
    pub cd: ContextDescriptor,
    /// Its TTB0 configuration.
    pub s1: S1Config,
}

/// The configuration cache.
#[derive(Debug, Default)]
pub struct ConfigCache {
    stes: HashMap<u32, Ste>,
    cds: HashMap<(u32, u32), CachedCd>,
}

impl ConfigCache {
    /// The cached STE of `sid`.
    pub fn ste(&self, sid: u32) -> Option<Ste> {
        self.stes.get(&sid).copied()
    }

    /// Caches the STE of `sid`.
    pub fn insert_ste(&mut self, sid: u32, ste: Ste) {
        self.stes.insert(sid, ste);
    }

    /// The cached CD `index` of `sid`.
    pub fn cd(&self, sid: u32, index: u32) -> Option<CachedCd> {
        self.cds.get(&(sid, index)).copied()
    }

    /// Caches CD `index` of `sid`.
    pub fn insert_cd(&mut self, sid: u32, index: u32, cd: CachedCd) {
        self.cds.insert((sid, index), cd);
    }

    /// Number of cached STEs.
    pub fn stes(&self) -> usize {
        self.stes.len()
    }

    /// Number of cached CDs.
    pub fn cds(&self) -> usize {
        self.cds.len()
    }

    /// Applies a CMD_CFGI_* command; other commands change nothing.
    pub fn invalidate(&mut self, cmd: &Cmd) {
        match *cmd {
            Cmd::CfgiSte { sid, .. } => {
                self.stes.remove(&sid);
            }
            Cmd::CfgiSteRange { range: 31, .. } => {
                self.stes.clear();
                self.cds.clear();
            }
            Cmd::CfgiSteRange { sid, range } => {
                let shift = range as u32 + 1;
                self.stes.retain(|&s, _| s >> shift != sid >> shift);
            }
            Cmd::CfgiCd { sid, ssid, .. } => {
                self.cds.remove(&(sid, ssid));
            }
            Cmd::CfgiCdAll { sid } => self.cds.retain(|&(s, _), _| s != sid),
            _ => {}
        }
    }
}
