//! The content of a fault recording register (FRCD_REG, VT-d §10.4.14): one recorded
//! non-recoverable fault.

use crate::addr::{Pasid, SourceId};
use crate::field::field_enum;

/// Bit 127 (bit 63 of the upper quadword): F, the register holds an unserviced fault.
pub const FRCD_F: u64 = 1 << 63;

field_enum! {
    /// The type of the faulted request (field T).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum RequestType {
        /// A write request.
        Write = 0,
        /// A read or atomic request.
        Read = 1,
    }
}

field_enum! {
    /// The address type of the faulted request (field AT; PCIe AT field).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum AddressType {
        /// An untranslated request.
        Untranslated = 0,
        /// An ATS translation request.
        TranslationRequest = 1,
        /// A translated request.
        Translated = 2,
    }
}

/// A fault as the hardware records it (§10.4.14).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultRecord {
    /// Fault info (FI): the page address of the faulted request (bits 63:12; the page
    /// offset is not recorded), or the interrupt index in bits 63:48 for interrupt
    /// remapping faults.
    pub fault_info: u64,
    /// Requester id of the faulted request (SID).
    pub sid: SourceId,
    /// Fault reason (FR), such as [`crate::fault::FaultReason::code`].
    pub reason: u8,
    /// PASID of the request, if it carried one (PP and PV).
    pub pasid: Option<Pasid>,
    /// Execute permission requested (EXE).
    pub exe: bool,
    /// Supervisor privilege requested (PRIV).
    pub privileged: bool,
    /// Request type (T).
    pub request: RequestType,
    /// Address type (AT).
    pub address_type: AddressType,
}

impl FaultRecord {
    /// The two quadwords of the register, without the F bit.
    pub fn to_raw(&self) -> [u64; 2] {
        let (pp, pv) = match self.pasid {
            Some(p) => (1, p.raw() as u64),
            None => (0, 0),
        };
        [
            self.fault_info & !0xfff,
            self.sid.rid() as u64
                | (self.privileged as u64) << 29
                | (self.exe as u64) << 30
                | pp << 31
                | (self.reason as u64) << 32
                | pv << 40
                | self.address_type.raw() << 60
                | self.request.raw() << 62,
        ]
    }

    /// Decodes a register's quadwords (the F bit is ignored); `None` when AT holds the
    /// reserved value 3.
    pub fn from_raw(raw: [u64; 2]) -> Option<Self> {
        let [lo, hi] = raw;
        let address_type = AddressType::from_bits((hi >> 60) & 3)?;
        let pasid = (hi & (1 << 31) != 0).then(|| Pasid::from_low_bits(hi >> 40));
        Some(Self {
            fault_info: lo & !0xfff,
            sid: SourceId::from_rid(hi as u16),
            reason: (hi >> 32) as u8,
            pasid,
            exe: hi & (1 << 30) != 0,
            privileged: hi & (1 << 29) != 0,
            request: if hi & (1 << 62) != 0 {
                RequestType::Read
            } else {
                RequestType::Write
            },
            address_type,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let record = FaultRecord {
            fault_info: 0x7f12_3456_7abc,
            sid: SourceId::from_rid(0x0310),
            reason: 0x71,
            pasid: Some(Pasid::new(0x12345).unwrap()),
            exe: true,
            privileged: true,
            request: RequestType::Read,
            address_type: AddressType::Translated,
        };
        let raw = record.to_raw();
        assert_eq!(raw, [0x7f12_3456_7000, 0x6123_4571_e000_0310]);
        assert_eq!(
            FaultRecord::from_raw(raw),
            Some(FaultRecord {
                fault_info: 0x7f12_3456_7000,
                ..record
            })
        );
        let plain = FaultRecord {
            fault_info: 0x1000,
            sid: SourceId::from_rid(1),
            reason: 0x5,
            pasid: None,
            exe: false,
            privileged: false,
            request: RequestType::Write,
            address_type: AddressType::Untranslated,
        };
        assert_eq!(plain.to_raw(), [0x1000, 0x0000_0005_0000_0001]);
        assert_eq!(
            FaultRecord::from_raw([0x1000, 0x0000_0005_0000_0001 | FRCD_F]),
            Some(plain)
        );
        assert_eq!(FaultRecord::from_raw([0, 3 << 60]), None);
    }
}
