//! Event queue records (IHI 0070 §7.3): 32 bytes, four little-endian words, with the event
//! type in bits 7:0, then SSV, SubstreamID and StreamID in the first word.
//!
//! The translation-related records (F_UUT, F_TRANSLATION, F_ADDR_SIZE, F_ACCESS,
//! F_PERMISSION, F_WALK_EABT, F_TLB_CONFLICT, F_BAD_ATS_TREQ, F_TRANSL_FORBIDDEN,
//! E_PAGE_REQUEST) carry the transaction's attributes in the second word (STAG, Stall,
//! PnU, InD, RnW, NSIPA, S2, CLASS) and its address in the third; the fourth holds the
//! IPA (bits 51:12) of the translation faults or the fetch address (bits 51:3) of
//! F_STE_FETCH, F_CD_FETCH and F_WALK_EABT. The Span field of E_PAGE_REQUEST is not
//! modelled (vsva's page requests come through PRI).

use crate::field::{bits, field_enum, get, put};
use crate::lookup::ConfigFault;
use crate::walk::{AccessRequest, FaultClass, FaultKind, FaultStage, WalkFault};

field_enum! {
    /// The event type (§7.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum EventType {
        /// F_UUT: an unsupported upstream transaction.
        Uut = 0x01,
        /// C_BAD_STREAMID.
        BadStreamId = 0x02,
        /// F_STE_FETCH.
        SteFetch = 0x03,
        /// C_BAD_STE.
        BadSte = 0x04,
        /// F_BAD_ATS_TREQ.
        BadAtsTreq = 0x05,
        /// F_STREAM_DISABLED.
        StreamDisabled = 0x06,
        /// F_TRANSL_FORBIDDEN.
        TranslForbidden = 0x07,
        /// C_BAD_SUBSTREAMID.
        BadSubstreamId = 0x08,
        /// F_CD_FETCH.
        CdFetch = 0x09,
        /// C_BAD_CD.
        BadCd = 0x0a,
        /// F_WALK_EABT.
        WalkEabt = 0x0b,
        /// F_TRANSLATION.
        Translation = 0x10,
        /// F_ADDR_SIZE.
        AddrSize = 0x11,
        /// F_ACCESS.
        Access = 0x12,
        /// F_PERMISSION.
        Permission = 0x13,
        /// F_TLB_CONFLICT.
        TlbConflict = 0x20,
        /// F_CFG_CONFLICT.
        CfgConflict = 0x21,
        /// E_PAGE_REQUEST.
        PageRequest = 0x24,
    }
}

/// Which words a record of a type carries beyond the first.
struct Layout {
    attributes: bool,
    input: bool,
    addr2: u64,
}

impl EventType {
    fn layout(self) -> Layout {
        use EventType::*;
        let (attributes, input, addr2) = match self {
            Translation | AddrSize | Access | Permission | TlbConflict => {
                (true, true, bits(51, 12))
            }
            WalkEabt => (true, true, bits(51, 3)),
            Uut | BadAtsTreq | TranslForbidden | PageRequest => (true, true, 0),
            SteFetch | CdFetch => (false, false, bits(51, 3)),
            BadStreamId | BadSte | StreamDisabled | BadSubstreamId | BadCd | CfgConflict => {
                (false, false, 0)
            }
        };
        Layout {
            attributes,
            input,
            addr2,
        }
    }
}

/// Why a record could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("unknown event type {0:#x}")]
pub struct UnknownEvent(pub u8);

/// One event record. Fields a type does not carry are zero (or `false`, or CLASS CD).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    /// The event type.
    pub event_type: EventType,
    /// StreamID.
    pub sid: u32,
    /// SubstreamID, when SSV is set.
    pub ssid: Option<u32>,
    /// STAG: the stall tag of a stalled transaction.
    pub stag: u16,
    /// Stall: the transaction is stalled and waits for CMD_RESUME.
    pub stall: bool,
    /// PnU: a privileged transaction.
    pub pnu: bool,
    /// InD: an instruction fetch.
    pub ind: bool,
    /// RnW: a read.
    pub rnw: bool,
    /// NSIPA: the IPA is Non-secure.
    pub nsipa: bool,
    /// S2: stage 2 faulted.
    pub s2: bool,
    /// CLASS: what stage 2 was translating.
    pub class: FaultClass,
    /// InputAddr: the transaction's address.
    pub input_addr: u64,
    /// The IPA of a stage-2 translation fault (bits 51:12), or the fetch address of
    /// F_STE_FETCH, F_CD_FETCH and F_WALK_EABT (bits 51:3).
    pub addr2: u64,
}

impl Event {
    /// A record of `event_type` for a stream, every other field zero.
    pub const fn new(event_type: EventType, sid: u32, ssid: Option<u32>) -> Self {
        Event {
            event_type,
            sid,
            ssid,
            stag: 0,
            stall: false,
            pnu: false,
            ind: false,
            rnw: false,
            nsipa: false,
            s2: false,
            class: FaultClass::Cd,
            input_addr: 0,
            addr2: 0,
        }
    }

    /// The record of a translation fault of a transaction with `access`.
    pub fn from_walk_fault(
        sid: u32,
        ssid: Option<u32>,
        access: AccessRequest,
        f: &WalkFault,
    ) -> Self {
        let event_type = match f.kind {
            FaultKind::WalkEabt => EventType::WalkEabt,
            FaultKind::Translation => EventType::Translation,
            FaultKind::AddrSize => EventType::AddrSize,
            FaultKind::Access => EventType::Access,
            FaultKind::Permission => EventType::Permission,
        };
        let (s2, class, ipa) = match f.stage {
            FaultStage::Stage1 => (false, FaultClass::Cd, 0),
            FaultStage::Stage2 { class, ipa } => (true, class, ipa),
        };
        Event {
            pnu: access.privileged,
            ind: access.instruction,
            rnw: !access.write,
            s2,
            class,
            input_addr: f.input,
            addr2: f.fetch_address.unwrap_or(ipa) & event_type.layout().addr2,
            ..Event::new(event_type, sid, ssid)
        }
    }

    /// The record of a configuration error (a stage-2 fault of a CD fetch is recorded as
    /// that fault).
    pub fn from_config_fault(
        sid: u32,
        ssid: Option<u32>,
        access: AccessRequest,
        f: &ConfigFault,
    ) -> Self {
        let (event_type, addr2) = match *f {
            ConfigFault::BadStreamId => (EventType::BadStreamId, 0),
            ConfigFault::SteFetch { addr } => (EventType::SteFetch, addr),
            ConfigFault::BadSte(_) => (EventType::BadSte, 0),
            ConfigFault::StreamDisabled => (EventType::StreamDisabled, 0),
            ConfigFault::BadSubstreamId => (EventType::BadSubstreamId, 0),
            ConfigFault::CdFetch { addr } => (EventType::CdFetch, addr),
            ConfigFault::BadCd(_) => (EventType::BadCd, 0),
            ConfigFault::Stage2(w) => return Event::from_walk_fault(sid, ssid, access, &w),
        };
        Event {
            addr2: addr2 & bits(51, 3),
            ..Event::new(event_type, sid, ssid)
        }
    }

    /// The four words of the record (fields the type does not carry are left out).
    pub fn encode(&self) -> [u64; 4] {
        let layout = self.event_type.layout();
        let d0 = self.event_type.raw()
            | self.ssid.map_or(0, |s| 1 << 11 | put(s as u64, 31, 12))
            | put(self.sid as u64, 63, 32);
        let flag = |b: bool, bit: u32| (b as u64) << bit;
        let d1 = if layout.attributes {
            self.stag as u64
                | flag(self.stall, 31)
                | flag(self.pnu, 33)
                | flag(self.ind, 34)
                | flag(self.rnw, 35)
                | flag(self.nsipa, 38)
                | flag(self.s2, 39)
                | put(self.class.raw(), 41, 40)
        } else {
            0
        };
        let d2 = if layout.input { self.input_addr } else { 0 };
        [d0, d1, d2, self.addr2 & layout.addr2]
    }

    /// Decodes a record: the fields its type carries.
    pub fn decode(raw: [u64; 4]) -> Result<Self, UnknownEvent> {
        let [d0, d1, d2, d3] = raw;
        let event_type = EventType::from_bits(d0 & 0xff).ok_or(UnknownEvent(d0 as u8))?;
        let layout = event_type.layout();
        let ssid = (d0 & 1 << 11 != 0).then_some(get(d0, 31, 12) as u32);
        let mut e = Event::new(event_type, get(d0, 63, 32) as u32, ssid);
        if layout.attributes {
            e.stag = d1 as u16;
            e.stall = d1 & 1 << 31 != 0;
            e.pnu = d1 & 1 << 33 != 0;
            e.ind = d1 & 1 << 34 != 0;
            e.rnw = d1 & 1 << 35 != 0;
            e.nsipa = d1 & 1 << 38 != 0;
            e.s2 = d1 & 1 << 39 != 0;
            // CLASS 0b11 is reserved; it reads as CD.
            e.class = FaultClass::from_bits(get(d1, 41, 40)).unwrap_or(FaultClass::Cd);
        }
        if layout.input {
            e.input_addr = d2;
        }
        e.addr2 = d3 & layout.addr2;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cd::BadCd;

    #[test]
    fn hand_computed_translation_fault() {
        // A stage-2 F_TRANSLATION of CLASS TT on a privileged write of VA 0x7f12_3456_7000
        // from StreamID 0x10, SubstreamID 5.
        let f = WalkFault {
            kind: FaultKind::Translation,
            stage: FaultStage::Stage2 {
                class: FaultClass::Tt,
                ipa: 0x8_1234_5678,
            },
            level: 2,
            input: 0x7f12_3456_7000,
            fetch_address: None,
        };
        let e = Event::from_walk_fault(0x10, Some(5), AccessRequest::WRITE.privileged(), &f);
        assert_eq!(
            e.encode(),
            [
                0x0000_0010_0000_5810,
                0x0000_0182_0000_0000,
                0x7f12_3456_7000,
                0x8_1234_5000
            ]
        );
        assert_eq!(
            Event::decode(e.encode()),
            Ok(Event {
                addr2: 0x8_1234_5000,
                ..e
            })
        );
        // A stage-1 F_PERMISSION read fetch: RnW, InD, no S2.
        let p = WalkFault {
            kind: FaultKind::Permission,
            stage: FaultStage::Stage1,
            ..f
        };
        let e = Event::from_walk_fault(1, None, AccessRequest::FETCH, &p);
        assert_eq!(
            e.encode()[..2],
            [0x0000_0001_0000_0013, 0x0000_000c_0000_0000]
        );
        // F_WALK_EABT carries the fetch address.
        let w = WalkFault {
            kind: FaultKind::WalkEabt,
            fetch_address: Some(0x1_2348),
            ..p
        };
        let e = Event::from_walk_fault(1, None, AccessRequest::READ, &w);
        assert_eq!(e.encode()[3], 0x1_2348);
        assert_eq!(e.event_type.raw(), 0x0b);
    }

    #[test]
    fn configuration_events() {
        let r = AccessRequest::READ;
        for (fault, code) in [
            (ConfigFault::BadStreamId, 0x02),
            (ConfigFault::SteFetch { addr: 0x1040 }, 0x03),
            (ConfigFault::StreamDisabled, 0x06),
            (ConfigFault::BadSubstreamId, 0x08),
            (ConfigFault::CdFetch { addr: 0x2000 }, 0x09),
            (ConfigFault::BadCd(BadCd::NotValid), 0x0a),
        ] {
            let e = Event::from_config_fault(3, Some(9), r, &fault);
            assert_eq!(e.event_type.raw(), code);
            assert_eq!(fault.event_type() as u64, code);
            let raw = e.encode();
            assert_eq!(raw[0], code | 1 << 11 | 9 << 12 | 3 << 32);
            assert_eq!(raw[1..3], [0, 0]);
            assert_eq!(Event::decode(raw), Ok(e));
        }
        assert_eq!(
            Event::from_config_fault(3, None, r, &ConfigFault::SteFetch { addr: 0x1040 }).encode()
                [3],
            0x1040
        );
        // Words a type does not carry are not decoded.
        let mut raw = Event::new(EventType::BadSte, 7, None).encode();
        raw[1] = u64::MAX;
        raw[2] = u64::MAX;
        assert_eq!(
            Event::decode(raw),
            Ok(Event::new(EventType::BadSte, 7, None))
        );
        assert_eq!(Event::decode([0x25, 0, 0, 0]), Err(UnknownEvent(0x25)));
        // Every listed type round-trips.
        for code in [
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x10, 0x11, 0x12,
            0x13, 0x20, 0x21, 0x24,
        ] {
            let t = EventType::from_bits(code).unwrap();
            let e = Event {
                stag: 0x1234,
                stall: true,
                rnw: true,
                s2: true,
                class: FaultClass::In,
                input_addr: 0xdead_b000,
                addr2: 0x1_0000,
                ..Event::new(t, 42, Some(1))
            };
            let back = Event::decode(e.encode()).unwrap();
            assert_eq!(back.encode(), e.encode(), "{t:?}");
        }
    }
}
