//! What the driver knows of one attached device (Linux v5.10 `struct device_domain_info`):
//! which of its PCIe ATS, PRI and PASID capabilities the unit lets it use, and the ATS
//! invalidate queue depth and PF requester id its device-TLB invalidations carry.

use vsva_hw::dma::PcieCapabilities;
use vsva_vtd::regs::Ecap;
use vsva_vtd::{addr::Pasid, addr::SourceId, inv_desc::InvDesc};
use vsva_vtd_driver::inv::{dev_iotlb_pf, pfsid, with_queue_depth};

/// An attached device's capabilities as the driver enabled them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceInfo {
    sid: SourceId,
    /// PFSID of its device-TLB invalidations (`info->pfsid`).
    pfsid: SourceId,
    /// ATS enabled, with the device's invalidate queue depth (`info->ats_enabled`,
    /// `info->ats_qdep`, 1 to 32).
    ats_qdep: Option<u8>,
    /// PRI supported (`info->pri_supported`).
    pri: bool,
    /// Max PASID width, when the unit and the device support PASIDs.
    pasid_width: Option<u8>,
}

impl DeviceInfo {
    /// The record of device `sid` with capabilities `caps` (`None`: the device has none of
    /// them) behind a unit with `ecap`, as `dmar_insert_one_dev_info` fills it: ATS when
    /// the unit has ECAP.DT; PRI only with ATS and ECAP.PRS; PASID with ECAP.PASID.
    pub fn new(sid: SourceId, caps: Option<PcieCapabilities>, ecap: &Ecap) -> Self {
        let caps = caps.unwrap_or_default();
        let ats_qdep = caps.ats.filter(|_| ecap.dt).map(|ats| ats.queue_depth());
        DeviceInfo {
            sid,
            pfsid: pfsid(sid, ecap),
            ats_qdep,
            pri: ats_qdep.is_some() && ecap.prs && caps.pri,
            pasid_width: caps.pasid_width.filter(|_| ecap.pasid),
        }
    }

    /// The device's requester id.
    pub fn sid(&self) -> SourceId {
        self.sid
    }

    /// Whether ATS is enabled: the context entry's DTE and the device-TLB invalidations.
    pub fn ats(&self) -> bool {
        self.ats_qdep.is_some()
    }

    /// Whether page requests are enabled: the context entry's PRE.
    pub fn pri(&self) -> bool {
        self.pri
    }

    /// The device's Max PASID Width, when the unit and the device support PASIDs.
    pub fn pasid_width(&self) -> Option<u8> {
        self.pasid_width
    }

    /// Whether the device takes every PASID the unit gives out: `intel_svm_bind_gpasid`
    /// refuses a device whose `pci_max_pasids` is not `PASID_MAX` (20 bits).
    pub fn full_pasid_width(&self) -> bool {
        self.pasid_width
            .is_some_and(|w| u32::from(w) >= Pasid::BITS)
    }

    /// The device-TLB invalidation of `2^order` pages at `addr` for requests with `pasid`
    /// (without PASID for `None`), as `qi_flush_dev_iotlb` and `qi_flush_dev_iotlb_pasid`
    /// build it: MIP is the device's queue depth, 0 from 32 up. `None` when ATS is not
    /// enabled: such a device has no device TLB to invalidate (`info->ats_enabled`).
    pub fn dev_iotlb(&self, pasid: Option<Pasid>, addr: u64, order: u8) -> Option<InvDesc> {
        let qdep = self.ats_qdep?;
        Some(with_queue_depth(
            dev_iotlb_pf(self.sid, self.pfsid, pasid, addr, order),
            qdep,
        ))
    }
}

#[cfg(test)]
mod tests {
    use vsva_hw::dma::AtsCapability;

    use super::*;

    fn caps(qdep: u8, pri: bool, pasid_width: Option<u8>) -> PcieCapabilities {
        PcieCapabilities {
            ats: Some(AtsCapability {
                invalidate_queue_depth: qdep,
            }),
            pri,
            pasid_width,
        }
    }

    fn mip(d: Option<InvDesc>) -> Option<u8> {
        match d? {
            InvDesc::DevIotlb { max_invs_pend, .. }
            | InvDesc::PasidDevIotlb { max_invs_pend, .. } => Some(max_invs_pend),
            other => panic!("not a device-TLB invalidation: {other:?}"),
        }
    }

    #[test]
    fn device_tlb_invalidations_carry_the_queue_depth_and_need_ats() {
        let sid = SourceId::from_rid(0x28);
        let ecap = Ecap {
            dt: true,
            prs: true,
            pasid: true,
            ..Ecap::default()
        };
        let p = Some(Pasid::new(7).unwrap());
        // Queue depth 5 goes into MIP as is (F7); 32 (field 0) does not fit and is 0.
        let five = DeviceInfo::new(sid, Some(caps(5, true, Some(20))), &ecap);
        assert_eq!(mip(five.dev_iotlb(None, 0, 0)), Some(5));
        assert_eq!(mip(five.dev_iotlb(p, 0, 0)), Some(5));
        let max = DeviceInfo::new(sid, Some(caps(0, true, Some(20))), &ecap);
        assert_eq!(mip(max.dev_iotlb(p, 0, 0)), Some(0));
        assert!(five.ats() && five.pri());
        // No ATS on the device, or no ECAP.DT: no device TLB to invalidate, no PRI (F8).
        let no_ats = PcieCapabilities {
            ats: None,
            ..caps(0, true, Some(20))
        };
        for d in [
            DeviceInfo::new(sid, Some(no_ats), &ecap),
            DeviceInfo::new(sid, None, &ecap),
            DeviceInfo::new(
                sid,
                Some(caps(5, true, Some(20))),
                &Ecap { dt: false, ..ecap },
            ),
        ] {
            assert!(!d.ats() && !d.pri(), "{d:?}");
            assert_eq!(d.dev_iotlb(p, 0, 0), None);
        }
        // PRI needs the device's PRI and ECAP.PRS.
        assert!(!DeviceInfo::new(sid, Some(caps(5, false, None)), &ecap).pri());
        assert!(
            !DeviceInfo::new(sid, Some(caps(5, true, None)), &Ecap { prs: false, ..ecap }).pri()
        );
    }
}
