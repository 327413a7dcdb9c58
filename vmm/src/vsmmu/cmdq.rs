//! The guest's command queue (IHI 0070 §4): commands are read from guest RAM between
//! CMDQ_CONS and CMDQ_PROD while CR0.CMDQEN is set and GERROR.CMDQ_ERR is inactive, and
//! carried out in order; an illegal command stops the queue at it with CERROR_ILL, an
//! unreadable one with CERROR_ABT (§7.1).

use vsva_mem::PhysMem;
use vsva_smmuv3::{cmd::Cmd, cmd::CmdError, cmd::PriResp, cmd::SyncCs, regs::Irq, regs::Queue};
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_PASID,
};
use vsva_uapi::{
    request::CacheInvalidate, request::InvGranularity, request::PageResponse,
    request::PageResponseCode,
};
use vsva_vtd::addr::Pasid;

use std::sync::Arc;

use super::space::SmmuScope;
use super::stream::HostConfig;
use super::{SmmuIommufd, StreamHost, VSmmu};
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

/// A gathered guest command: its place in the pass, its CMDQ_CONS value, its words.
type Gathered = (usize, u32, [u64; 2]);

/// Guest commands waiting to go to the host as one `IOMMU_HWPT_INVALIDATE` array per
/// vIOMMU.
#[derive(Default)]
struct Batch {
    arrays: Vec<(Arc<SmmuIommufd>, Vec<Gathered>)>,
}

impl Batch {
    fn push(&mut self, fd: &Arc<SmmuIommufd>, at: (usize, u32), cmd: [u64; 2]) {
        let entry = (at.0, at.1, cmd);
        match self.arrays.iter_mut().find(|(f, _)| Arc::ptr_eq(f, fd)) {
            Some((_, cmds)) => cmds.push(entry),
            None => self.arrays.push((fd.clone(), vec![entry])),
        }
    }

    fn is_empty(&self) -> bool {
        self.arrays.is_empty()
    }
}

impl VSmmu {
    /// Consumes every produced command, in order (the caller holds the command lock).
    ///
    /// The invalidations for devices on an iommufd are gathered and sent as one array per
    /// vIOMMU when a command that needs them done comes (CMD_SYNC, an STE or a page
    /// response) and at the end of the pass; CMDQ_CONS passes them only once the host
    /// has carried them out. A command the host refuses stops the queue at it with
    /// CERROR_ILL, as an illegal command would.
    pub(super) fn consume_commands(&self, irqs: &mut Vec<Irq>) {
        let Some(queue) = lock(&self.regs).cmdq_to_consume() else {
            return;
        };
        let mut cons = queue.cons;
        let mut error = None;
        let mut batch = Batch::default();
        let mut n = 0;
        while !(Queue { cons, ..queue }).is_empty() {
            match Cmd::fetch(&self.mem, &queue, cons, &self.config.features) {
                Ok(cmd) => {
                    let ordered = matches!(
                        cmd,
                        Cmd::Sync { .. }
                            | Cmd::CfgiSte { .. }
                            | Cmd::CfgiSteRange { .. }
                            | Cmd::PriResp { .. }
                    );
                    if ordered {
                        if let Err(at) = self.flush(&mut batch) {
                            (cons, error) = (at, Some(CmdError::Ill));
                            break;
                        }
                    }
                    self.count(|s| s.commands += 1);
                    self.execute(&cmd, irqs);
                    self.gather(&cmd, (n, cons), &mut batch);
                }
                Err((e, raw)) => {
                    tracing::debug!(?raw, %e, "vSMMU command queue error");
                    error = Some(e);
                    break;
                }
            }
            cons = queue.next(cons);
            n += 1;
            // CMDQ_CONS shows each command consumed as soon as it is (host included).
            if batch.is_empty() {
                lock(&self.regs).cmdq_consumed(cons, None);
            }
        }
        // The commands before the end (or before an illegal one) are carried out.
        let pending = !batch.is_empty();
        if let Err(at) = self.flush(&mut batch) {
            (cons, error) = (at, Some(CmdError::Ill));
        }
        if error.is_some() {
            self.count(|s| s.command_errors += 1);
            lock(&self.regs).cmdq_consumed(cons, error);
            irqs.push(Irq::Gerror);
        } else if pending {
            lock(&self.regs).cmdq_consumed(cons, None);
        }
    }

    /// Sends the gathered commands, one `IOMMU_HWPT_INVALIDATE` per vIOMMU. `Err` with
    /// the CMDQ_CONS value of the first command (in queue order) a host refused.
    fn flush(&self, batch: &mut Batch) -> Result<(), u32> {
        let mut failed: Option<(usize, u32)> = None;
        for (fd, entries) in batch.arrays.drain(..) {
            let cmds: Vec<[u64; 2]> = entries.iter().map(|e| e.2).collect();
            let (done, r) = match fd.invalidate(&cmds) {
                Ok(()) => (cmds.len(), Ok(())),
                Err((k, e)) => (k, Err(e)),
            };
            self.count(|s| s.invalidations += done as u64);
            if !self.host_call(r, || HostCall::ViommuInvalidate(cmds[done])) {
                let (n, cons, _) = entries[done];
                if failed.is_none_or(|(m, _)| n < m) {
                    failed = Some((n, cons));
                }
            }
        }
        failed.map_or(Ok(()), |(_, cons)| Err(cons))
    }

    /// Adds what `cmd` (the `at`-th of the pass, at CMDQ_CONS `at.1`) asks of the
    /// translating devices on an iommufd to the batch: TLB invalidations go to every
    /// vIOMMU with one, CD and ATC invalidations to the vIOMMU of their StreamID (its
    /// vSID), CMD_CFGI_ALL as CMD_CFGI_CD_ALL of each (the host writes STEs itself).
    fn gather(&self, cmd: &Cmd, at: (usize, u32), batch: &mut Batch) {
        let to = |which: &dyn Fn(u32) -> bool| {
            self.streams_where(which)
                .into_iter()
                .filter_map(|(sid, _, host, config)| match host {
                    StreamHost::Iommufd(dev) if matches!(config, HostConfig::Translate(_)) => {
                        Some((sid, dev.iommufd().clone()))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        match *cmd {
            Cmd::TlbiNhAll { .. }
            | Cmd::TlbiNhAsid { .. }
            | Cmd::TlbiNhVa { .. }
            | Cmd::TlbiNhVaa { .. }
            | Cmd::TlbiNsnhAll => {
                let mut fds: Vec<Arc<SmmuIommufd>> = Vec::new();
                for (_, fd) in to(&|_| true) {
                    if !fds.iter().any(|f| Arc::ptr_eq(f, &fd)) {
                        batch.push(&fd, at, cmd.encode());
                        fds.push(fd);
                    }
                }
            }
            Cmd::CfgiCd { sid, .. } | Cmd::CfgiCdAll { sid } | Cmd::AtcInv { sid, .. } => {
                for (_, fd) in to(&|s| s == sid) {
                    batch.push(&fd, at, cmd.encode());
                }
            }
            Cmd::CfgiSteRange { range: 31, .. } => {
                for (sid, fd) in to(&|_| true) {
                    batch.push(&fd, at, Cmd::CfgiCdAll { sid }.encode());
                }
            }
            _ => {}
        }
    }

    /// Carries out one legal command (for the devices on an iommufd, what changes their
    /// STE; their invalidations are gathered by [`VSmmu::gather`]).
    fn execute(&self, cmd: &Cmd, irqs: &mut Vec<Irq>) {
        if let Some(scope) = SmmuScope::of(cmd) {
            self.spaces.invalidate(scope);
        }
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
            Cmd::Resume { sid, action, stag } => self.resume(sid, stag, action),
            Cmd::StallTerm { sid } => self.terminate_stalls(sid),
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
            // hints. The EL2 and stage-2 commands are ILLEGAL here (decode
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
            let StreamHost::Container(host) = host else {
                continue;
            };
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

    /// CMD_PRI_RESP to a passthrough device: its page response through the container or
    /// the iommufd's fault queue.
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
        self.page_response(&host, host_sid, response);
    }
}

/// Whether two hosts are the same container.
fn same(a: &super::Host, b: &super::Host) -> bool {
    std::ptr::addr_eq(std::sync::Arc::as_ptr(a), std::sync::Arc::as_ptr(b))
}
