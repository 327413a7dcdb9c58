//! The guest's command queue (IHI 0070 §4): commands are read from guest RAM between
//! CMDQ_CONS and CMDQ_PROD while CR0.CMDQEN is set and GERROR.CMDQ_ERR is inactive, and
//! carried out in order; an illegal command stops the queue at it with CERROR_ILL, an
//! unreadable one with CERROR_ABT (§7.1).

use vsva_smmuv3::regs::{cr0, gerror};
use vsva_smmuv3::{Cmd, CmdError, Irq, PriResp, Queue, SyncCs};
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_PASID,
};
use vsva_uapi::{CacheInvalidate, InvGranularity, PageResponse, PageResponseCode};
use vsva_vtd::{Pasid, PhysMem};

use super::stream::HostConfig;
use super::VSmmu;
use crate::error::HostCall;
use crate::viommu::lock;

/// The translation granule the invalidations of a command name: CMD_TLBI_NH_VA and
/// CMD_TLBI_NH_VAA without a range (IDR3.RIL is not offered) and CMD_ATC_INV are in 4 KiB
/// units.
const PAGE: u64 = 4096;

/// The host invalidation that stands for a guest TLB or configuration cache command, for
/// a device whose CD table the host walks. `None` for a command that invalidates nothing
/// of the guest's stage 1 (or is not an invalidation).
///
/// | Command | `iommu_cache_invalidate_info` |
/// |---|---|
/// | CMD_TLBI_NH_ALL, CMD_TLBI_NSNH_ALL | IOTLB, domain |
/// | CMD_TLBI_NH_ASID | IOTLB, PASID granularity with the ASID as arch id |
/// | CMD_TLBI_NH_VA | IOTLB, one 4 KiB granule at the address, ASID as arch id, Leaf |
/// | CMD_TLBI_NH_VAA | the same without arch id (every ASID) |
/// | CMD_CFGI_CD | PASID cache, the SubstreamID |
/// | CMD_CFGI_CD_ALL, CMD_CFGI_ALL | PASID cache, domain |
/// | CMD_ATC_INV | device IOTLB, the 2^Size pages at the address (with the SubstreamID unless Global); PASID or domain granularity when the span is 2^52 pages or more |
pub fn host_invalidation(cmd: &Cmd) -> Option<CacheInvalidate> {
    let iotlb = |granularity| CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity,
    };
    let pasid_cache = |granularity| CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_PASID,
        granularity,
    };
    let page = |archid: Option<u32>, addr: u64, leaf: bool| InvGranularity::Addr {
        pasid: None,
        archid,
        addr,
        granule_size: PAGE,
        nb_granules: 1,
        leaf,
    };
    Some(match *cmd {
        Cmd::TlbiNhAll { .. } | Cmd::TlbiNsnhAll => iotlb(InvGranularity::Domain),
        Cmd::TlbiNhAsid { asid, .. } => iotlb(InvGranularity::Pasid {
            pasid: None,
            archid: Some(asid.into()),
        }),
        Cmd::TlbiNhVa { asid, addr, .. } => iotlb(page(Some(asid.into()), addr.addr, addr.leaf)),
        Cmd::TlbiNhVaa { addr, .. } => iotlb(page(None, addr.addr, addr.leaf)),
        Cmd::CfgiCd { ssid, .. } => pasid_cache(InvGranularity::Pasid {
            // The field is 20 bits wide: every value is a PASID.
            pasid: Pasid::new(ssid).ok(),
            archid: None,
        }),
        Cmd::CfgiCdAll { .. } | Cmd::CfgiSteRange { range: 31, .. } => {
            pasid_cache(InvGranularity::Domain)
        }
        Cmd::AtcInv {
            ssid,
            global,
            addr,
            size,
            ..
        } => {
            let pasid = ssid.filter(|_| !global).and_then(|s| Pasid::new(s).ok());
            let granularity = if size < 52 {
                InvGranularity::Addr {
                    pasid,
                    archid: None,
                    addr: addr & !((PAGE << size) - 1),
                    granule_size: PAGE,
                    nb_granules: 1 << size,
                    leaf: false,
                }
            } else if pasid.is_some() {
                InvGranularity::Pasid {
                    pasid,
                    archid: None,
                }
            } else {
                InvGranularity::Domain
            };
            CacheInvalidate {
                cache: IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
                granularity,
            }
        }
        _ => return None,
    })
}

impl VSmmu {
    /// Consumes every produced command, in order (the caller holds the command lock).
    pub(super) fn consume_commands(&self, irqs: &mut Vec<Irq>) {
        let (queue, enabled) = {
            let regs = lock(&self.regs);
            let enabled =
                regs.cr0ack() & cr0::CMDQEN != 0 && regs.active_gerrors() & gerror::CMDQ_ERR == 0;
            (regs.cmdq(), enabled)
        };
        if !enabled {
            return;
        }
        let mut cons = queue.cons;
        let mut error = None;
        while !(Queue { cons, ..queue }).is_empty() {
            let addr = queue.entry_address(cons, 16);
            let raw = match (
                self.mem.read_u64(addr),
                self.mem.read_u64(addr.wrapping_add(8)),
            ) {
                (Ok(d0), Ok(d1)) => [d0, d1],
                _ => {
                    error = Some(CmdError::Abt);
                    break;
                }
            };
            match Cmd::decode(raw, &self.config.features) {
                Ok(cmd) => {
                    self.count(|s| s.commands += 1);
                    self.execute(&cmd, irqs);
                }
                Err(e) => {
                    tracing::debug!(?raw, %e, "vSMMU command queue error");
                    error = Some(e);
                    break;
                }
            }
            cons = queue.next(cons);
            // CMDQ_CONS shows each command consumed as soon as it is.
            lock(&self.regs).cmdq_consumed(cons, None);
        }
        if error.is_some() {
            self.count(|s| s.command_errors += 1);
            lock(&self.regs).cmdq_consumed(cons, error);
            irqs.push(Irq::Gerror);
        }
    }

    /// Carries out one legal command.
    fn execute(&self, cmd: &Cmd, irqs: &mut Vec<Irq>) {
        match *cmd {
            Cmd::CfgiSte { sid, .. } => self.resync_streams(|s| s == sid, Some(irqs)),
            Cmd::CfgiSteRange { range: 31, .. } => {
                self.resync_streams(|_| true, None);
                self.forward_invalidation(cmd, |_| true);
            }
            Cmd::CfgiSteRange { sid, range } => {
                let shift = range as u32 + 1;
                self.resync_streams(|s| s >> shift == sid >> shift, None);
            }
            Cmd::CfgiCd { sid, .. } | Cmd::CfgiCdAll { sid } | Cmd::AtcInv { sid, .. } => {
                self.forward_invalidation(cmd, |s| s == sid)
            }
            Cmd::TlbiNhAll { .. }
            | Cmd::TlbiNhAsid { .. }
            | Cmd::TlbiNhVa { .. }
            | Cmd::TlbiNhVaa { .. }
            | Cmd::TlbiNsnhAll => self.forward_invalidation(cmd, |_| true),
            Cmd::PriResp {
                sid,
                ssid,
                prg_index,
                resp,
            } => self.forward_page_response(sid, ssid, prg_index, resp),
            Cmd::Sync {
                cs: SyncCs::Irq,
                msi_data,
                msi_addr,
                ..
            } if msi_addr != 0 => {
                // Every earlier command's host calls have returned: the MSI may be written.
                if let Err(e) = self.mem.write(msi_addr, &msi_data.to_le_bytes()) {
                    tracing::debug!(msi_addr, %e, "vSMMU CMD_SYNC MSI write aborted");
                }
            }
            // CS=SEV and CS=NONE complete by CMDQ_CONS passing the command; prefetches are
            // hints; nothing stalls. The EL2 and stage-2 commands are ILLEGAL here (decode
            // refused them).
            _ => {}
        }
    }

    /// Sends the host invalidation of `cmd` to the container of each stream `which`
    /// selects whose CD table the host walks (once per container).
    fn forward_invalidation(&self, cmd: &Cmd, which: impl Fn(u32) -> bool) {
        let Some(inv) = host_invalidation(cmd) else {
            return;
        };
        let mut done: Vec<super::Host> = Vec::new();
        for (_, _, host, config) in self.streams_where(which) {
            if !matches!(config, HostConfig::Translate(_)) || done.iter().any(|h| same(h, &host)) {
                continue;
            }
            let r = host.cache_invalidate(&inv);
            if self.host_call(r, || HostCall::CacheInvalidate(inv)) {
                self.count(|s| s.invalidations += 1);
            }
            done.push(host);
        }
    }

    /// CMD_PRI_RESP to a passthrough device: its page response through the container.
    fn forward_page_response(&self, sid: u32, ssid: Option<u32>, prg_index: u16, resp: PriResp) {
        let Some((_, host_sid, host, _)) = self.streams_where(|s| s == sid).pop() else {
            return;
        };
        let response = PageResponse {
            pasid: ssid.and_then(|s| Pasid::new(s).ok()),
            grpid: prg_index.into(),
            code: match resp {
                PriResp::Success => PageResponseCode::Success,
                PriResp::Deny => PageResponseCode::Invalid,
                PriResp::Fail => PageResponseCode::Failure,
            },
        };
        let r = host.page_response(host_sid, &response);
        self.host_call(r, || HostCall::PageResponse(host_sid, response));
    }
}

/// Whether two hosts are the same container.
fn same(a: &super::Host, b: &super::Host) -> bool {
    std::ptr::addr_eq(std::sync::Arc::as_ptr(a), std::sync::Arc::as_ptr(b))
}
