//! The page request descriptor (VT-d §7.5.1.1): what the remapping unit writes into the
//! page request queue for each page request it receives.

use crate::addr::{Pasid, SourceId};
use crate::field::flag;

/// Descriptor type of a page request descriptor.
pub const PAGE_REQUEST_TYPE: u64 = 0x1;
/// Size of one page request queue slot.
pub const PAGE_REQUEST_DESC_SIZE: u64 = 32;

/// A decoded page request descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRequestDesc {
    /// Requester id (RID, bits 31:16).
    pub rid: SourceId,
    /// PASID (bits 51:32), when PASID present (bit 8) is set.
    pub pasid: Option<Pasid>,
    /// Execute requested (bit 52).
    pub exe: bool,
    /// Privileged mode requested (bit 53).
    pub pm: bool,
    /// Read requested (bit 64).
    pub read: bool,
    /// Write requested (bit 65).
    pub write: bool,
    /// Last page in group (bit 66).
    pub lpig: bool,
    /// Page request group index (bits 75:67).
    pub prg_index: u16,
    /// Page address (bits 127:76).
    pub addr: u64,
    /// Private data (bits 255:128), when private data present (bit 9) is set.
    pub private_data: Option<[u64; 2]>,
}

/// Why a 256-bit value is not a page request descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageRequestDescError {
    /// The descriptor type (bits 7:0) is not 1; the value is that type.
    #[error("descriptor type {0:#x} is not a page request")]
    Type(u64),
    /// Reserved bits of the first quadword are set; the value holds those bits.
    #[error("reserved bits {0:#x} set in page request descriptor")]
    Reserved(u64),
}

const PASID_PRESENT: u64 = 1 << 8;
const PRIV_DATA_PRESENT: u64 = 1 << 9;
const EXE: u64 = 1 << 52;
const PM: u64 = 1 << 53;
const QW0_RESERVED: u64 = 0x3f << 10 | 0x3ff << 54;

impl PageRequestDesc {
    /// The four qwords of the descriptor.
    pub fn encode(&self) -> [u64; 4] {
        let mut q0 = PAGE_REQUEST_TYPE | (self.rid.rid() as u64) << 16;
        if let Some(p) = self.pasid {
            q0 |= PASID_PRESENT | (p.raw() as u64) << 32;
        }
        if self.private_data.is_some() {
            q0 |= PRIV_DATA_PRESENT;
        }
        q0 |= flag(self.exe, EXE) | flag(self.pm, PM);
        let q1 = self.read as u64
            | (self.write as u64) << 1
            | (self.lpig as u64) << 2
            | ((self.prg_index & 0x1ff) as u64) << 3
            | (self.addr & !0xfff);
        let [p0, p1] = self.private_data.unwrap_or_default();
        [q0, q1, p0, p1]
    }

    /// Decodes a descriptor, rejecting other types and set reserved bits.
    pub fn decode(raw: [u64; 4]) -> Result<Self, PageRequestDescError> {
        let [q0, q1, p0, p1] = raw;
        if q0 & 0xff != PAGE_REQUEST_TYPE {
            return Err(PageRequestDescError::Type(q0 & 0xff));
        }
        if q0 & QW0_RESERVED != 0 {
            return Err(PageRequestDescError::Reserved(q0 & QW0_RESERVED));
        }
        let pasid = (q0 & PASID_PRESENT != 0).then(|| Pasid::from_low_bits(q0 >> 32));
        Ok(PageRequestDesc {
            rid: SourceId::from_rid((q0 >> 16) as u16),
            pasid,
            exe: q0 & EXE != 0,
            pm: q0 & PM != 0,
            read: q1 & 1 != 0,
            write: q1 & 2 != 0,
            lpig: q1 & 4 != 0,
            prg_index: ((q1 >> 3) & 0x1ff) as u16,
            addr: q1 & !0xfff,
            private_data: (q0 & PRIV_DATA_PRESENT != 0).then_some([p0, p1]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_the_spec_layout() {
        let d = PageRequestDesc {
            rid: SourceId::new(0x12, 3, 1).unwrap(),
            pasid: Some(Pasid::new(0xabcde).unwrap()),
            exe: false,
            pm: true,
            read: true,
            write: true,
            lpig: true,
            prg_index: 0x1a5,
            addr: 0x7fff_1234_5000,
            private_data: None,
        };
        // qw0: type 1, PASID present (bit 8), RID 0x1219 at 31:16, PASID at 51:32, PM (53).
        // qw1: RD, WR, LPIG, PRGI 0x1a5 at 11:3, address at 63:12.
        assert_eq!(d.encode(), [0x002a_bcde_1219_0101, 0x7fff_1234_5d2f, 0, 0]);
        assert_eq!(PageRequestDesc::decode(d.encode()), Ok(d));
    }

    #[test]
    fn rejects_other_types_and_reserved_bits() {
        assert_eq!(
            PageRequestDesc::decode([0x2, 0, 0, 0]),
            Err(PageRequestDescError::Type(2))
        );
        assert_eq!(
            PageRequestDesc::decode([0x1 | 1 << 12, 0, 0, 0]),
            Err(PageRequestDescError::Reserved(1 << 12))
        );
    }

    proptest! {
        #[test]
        fn round_trips(rid: u16, pasid in proptest::option::of(0u32..1 << 20), exe: bool, pm: bool,
                       read: bool, write: bool, lpig: bool, prgi in 0u16..512, page in 0u64..1 << 52,
                       private in proptest::option::of(any::<[u64; 2]>())) {
            let d = PageRequestDesc {
                rid: SourceId::from_rid(rid),
                pasid: pasid.map(|p| Pasid::new(p).unwrap()),
                exe, pm, read, write, lpig, prg_index: prgi, addr: page << 12, private_data: private,
            };
            prop_assert_eq!(PageRequestDesc::decode(d.encode()), Ok(d));
        }
    }
}
