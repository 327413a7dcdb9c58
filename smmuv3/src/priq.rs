//! PRI queue entries (IHI 0070 §8): 16 bytes per PCIe page request message that the SMMU
//! receives from a function, for software to answer with CMD_PRI_RESP.

use crate::field::{bits, get, put};

/// One page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PriqEntry {
    /// StreamID of the requesting function.
    pub sid: u32,
    /// SubstreamID (PASID), when SSV is set.
    pub ssid: Option<u32>,
    /// Privileged-mode access requested.
    pub privileged: bool,
    /// Execute access requested.
    pub exec: bool,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// Last: the last request of its page request group (a response is due).
    pub last: bool,
    /// PRGIndex: the page request group.
    pub prg_index: u16,
    /// The page address (bits 63:12).
    pub addr: u64,
}

impl PriqEntry {
    /// The two words of the entry.
    pub fn encode(&self) -> [u64; 2] {
        let flag = |b: bool, bit: u32| (b as u64) << bit;
        [
            self.sid as u64
                | self.ssid.map_or(0, |s| put(s as u64, 51, 32) | 1 << 63)
                | flag(self.privileged, 58)
                | flag(self.exec, 59)
                | flag(self.read, 60)
                | flag(self.write, 61)
                | flag(self.last, 62),
            put(self.prg_index as u64, 8, 0) | (self.addr & bits(63, 12)),
        ]
    }

    /// Decodes an entry; bits outside the fields are ignored.
    pub fn decode(raw: [u64; 2]) -> Self {
        let [d0, d1] = raw;
        PriqEntry {
            sid: d0 as u32,
            ssid: (d0 & 1 << 63 != 0).then_some(get(d0, 51, 32) as u32),
            privileged: d0 & 1 << 58 != 0,
            exec: d0 & 1 << 59 != 0,
            read: d0 & 1 << 60 != 0,
            write: d0 & 1 << 61 != 0,
            last: d0 & 1 << 62 != 0,
            prg_index: get(d1, 8, 0) as u16,
            addr: d1 & bits(63, 12),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_entry() {
        let e = PriqEntry {
            sid: 0x10,
            ssid: Some(0x42),
            privileged: false,
            exec: false,
            read: true,
            write: true,
            last: true,
            prg_index: 0x1a5,
            addr: 0x7f00_1234_5000,
        };
        let raw = e.encode();
        assert_eq!(raw, [0xf000_0042_0000_0010, 0x7f00_1234_51a5]);
        assert_eq!(PriqEntry::decode(raw), e);
        // Without SSV the SubstreamID field is ignored.
        let no_ssid = PriqEntry::decode([raw[0] & !(1 << 63), raw[1]]);
        assert_eq!(no_ssid.ssid, None);
        assert_eq!(no_ssid.encode()[0], 0x7000_0000_0000_0010);
    }
}
