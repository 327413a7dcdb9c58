//! Primary fault logging, the software side (VT-d §7.2.1, §10.4.14): the fault event
//! handler as intel-iommu's `dmar_fault` (v5.10) runs it.

use vsva_vtd::regs::layout::{fsts, offset};
use vsva_vtd::regs::{Cap, FaultRecord, FRCD_F};

use crate::{Error, Registers};

/// Takes the recorded faults: when FSTS.PPF is set, reads the fault recording registers
/// from FSTS.FRI on, wrapping, while F is set, clearing F of each (a 4-byte write of the
/// record's top dword); then clears FSTS.PFO. Records that do not decode are cleared and
/// left out. Without PPF nothing is read or cleared.
pub fn take_fault_records<R: Registers + ?Sized>(
    regs: &R,
    cap: &Cap,
) -> Result<Vec<FaultRecord>, Error> {
    let status = regs.read32(offset::FSTS)?;
    let mut out = Vec::new();
    if status & fsts::PPF == 0 {
        return Ok(out);
    }
    let base = cap.fault_recording_offset();
    let count = cap.fault_recording_count().max(1);
    let mut index = ((status & fsts::FRI) >> fsts::FRI_SHIFT) as usize % count;
    // Each pass clears one F; the bound keeps a unit that never clears them from holding
    // the handler.
    for _ in 0..count {
        let at = base + 16 * index as u64;
        let high = regs.read(at + 8, 8)?;
        if high & FRCD_F == 0 {
            break;
        }
        let low = regs.read(at, 8)?;
        match FaultRecord::from_raw([low, high]) {
            Some(record) => out.push(record),
            None => tracing::warn!("vt-d: fault record {index} does not decode"),
        }
        regs.write(at + 12, 4, FRCD_F >> 32)?;
        index = (index + 1) % count;
    }
    regs.write(offset::FSTS, 4, fsts::PFO.into())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testunit::Unit;
    use vsva_vtd::regs::{AddressType, RequestType};
    use vsva_vtd::{addr::Pasid, addr::SourceId};

    fn record(i: u64) -> FaultRecord {
        FaultRecord {
            sid: SourceId::from_rid(0x10 + i as u16),
            pasid: Some(Pasid::new(3).unwrap()),
            fault_info: 0x1000 * i,
            reason: 0x71,
            request: RequestType::Read,
            address_type: AddressType::Untranslated,
            privileged: false,
            exe: false,
        }
    }

    #[test]
    fn records_are_taken_from_fri_and_cleared() {
        let unit = Unit::new();
        let cap = unit.regs().cap();
        assert!(cap.fault_recording_count() >= 5);
        assert!(take_fault_records(&unit, &cap).unwrap().is_empty());
        for i in 0..3 {
            unit.regs().record_fault(&record(i));
        }
        let taken = take_fault_records(&unit, &cap).unwrap();
        assert_eq!(taken, (0..3).map(record).collect::<Vec<_>>());
        assert_eq!(unit.regs().fsts() & (fsts::PPF | fsts::PFO), 0);
        // The next records follow FRI around the registers.
        for i in 3..5 {
            unit.regs().record_fault(&record(i));
        }
        let taken = take_fault_records(&unit, &cap).unwrap();
        assert_eq!(taken, (3..5).map(record).collect::<Vec<_>>());
    }
}
