//! A domain: one VFIO container's address space on the SMMU (arm-smmu-v3's
//! `arm_smmu_domain` at stage `ARM_SMMU_DOMAIN_NESTED`), and the [`IommuBackend`] the
//! container drives.
//!
//! The domain has a VMID and a stage-2 table built from `MAP_DMA`: the VMM's memory,
//! resolved to host physical memory, mapped at the IPA (the guest physical address) with
//! the largest blocks alignment allows. Its streams translate through stage 2 alone until
//! the guest's CD table is attached; then each is nested: STE.S1ContextPtr is the table's
//! IPA, so every CD and stage-1 table read, and every output, goes through stage 2, and the
//! guest reaches nothing but what the VMM mapped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::{
    builder::TableBuilder, cmd::Cmd, cmd::TlbiAddr, ste::Config, ste::S1Dss, ste::S1Fmt, ste::Ste,
    walk::AddressSize, walk::PageSize, walk::S2Config, walk::S2Flags,
};
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_PASID,
};
use vsva_uapi::request::{
    BindGpasid, CacheInvalidate, DmaMap, InvGranularity, PageRequest, PageResponse, PasidConfig,
    PasidTableConfig,
};
use vsva_vtd::{addr::Hpa, addr::Iova, addr::SourceId};

use super::unit::SmmuHost;
use super::{driver_error, invalid};
use crate::container::{BackendInfo, IommuBackend};
use crate::error::HostError;
use crate::fault::FaultSink;

/// The IPA size of every domain's stage 2: 48 bits (S2T0SZ 16, walks from level 0), as
/// Linux's `arm_smmu_domain_finalise_s2` uses the SMMU's input size.
pub const IPA_BITS: u32 = 48;

/// Most CMD_TLBI_NH_VA or CMD_TLBI_S2_IPA commands one invalidation issues; a larger range
/// is invalidated whole (by ASID, or the whole VMID), which is never less than asked.
pub const TLBI_RANGE_LIMIT: u64 = 512;

/// Block sizes of stage 2, largest first.
const PAGE_SIZES: [PageSize; 3] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K];

/// Normal memory, inner and outer write-back (S2 MemAttr 0b1111), inner shareable.
const S2_NORMAL: u64 = 0b1111 << 2 | 3 << 8;

/// One container's domain.
#[derive(Debug)]
pub struct SmmuDomain {
    host: Arc<SmmuHost>,
    vmid: u16,
    s2: S2Config,
    /// STE.S2PS: the output size, OAS capped at 48 bits.
    s2ps: AddressSize,
    /// The stage-2 table; taken only when the domain is dropped.
    table: Option<TableBuilder>,
    devices: BTreeSet<u32>,
    /// Mappings by IPA: size.
    mapped: BTreeMap<u64, u64>,
    pasid_table: Option<PasidTableConfig>,
    /// Streams whose STE nests a guest CD table of their own (iommufd nested HWPTs).
    nested: BTreeSet<u32>,
}

impl SmmuDomain {
    /// A new domain on `host`: a VMID and an empty stage-2 table.
    pub fn new(host: &Arc<SmmuHost>) -> Result<Self, HostError> {
        let vmid = host.alloc_vmid()?;
        let root = match host.frames().alloc_frame() {
            Ok(r) => r.0,
            Err(e) => {
                host.free_vmid(vmid);
                return Err(HostError::Driver {
                    errno: libc::ENOMEM,
                    detail: format!("smmuv3: stage-2 root: {e}"),
                });
            }
        };
        let oas = host.features().cap_oas(AddressSize::Bits48);
        let s2 = S2Config::new(root, 64 - IPA_BITS as u8, 2, oas, S2Flags::default());
        let s2 = match s2 {
            Ok(s2) => s2,
            Err(e) => {
                let _ = host.frames().free(Hpa(root));
                host.free_vmid(vmid);
                return Err(invalid(format!("stage-2 configuration: {e}")));
            }
        };
        Ok(SmmuDomain {
            host: host.clone(),
            vmid,
            s2,
            s2ps: oas,
            table: Some(TableBuilder::stage2(&s2)),
            devices: BTreeSet::new(),
            mapped: BTreeMap::new(),
            pasid_table: None,
            nested: BTreeSet::new(),
        })
    }

    /// The SMMU.
    pub fn host(&self) -> &Arc<SmmuHost> {
        &self.host
    }

    /// The VMID that tags the domain's TLB entries.
    pub fn vmid(&self) -> u16 {
        self.vmid
    }

    /// The attached streams.
    pub fn devices(&self) -> Vec<u32> {
        self.devices.iter().copied().collect()
    }

    /// The attached guest CD table.
    pub fn pasid_table(&self) -> Option<PasidTableConfig> {
        self.pasid_table
    }

    /// Frames the stage-2 table holds below its root.
    pub fn table_frames(&self) -> usize {
        self.table.as_ref().map_or(0, |t| t.tables().len())
    }

    /// The host page stage 2 maps `ipa` to.
    pub fn lookup(&self, ipa: u64) -> Option<u64> {
        let t = self.table.as_ref()?;
        let m = t.lookup(&**self.host.frames().memory(), ipa).ok()??;
        Some(m.base + (ipa & (m.size.bytes() - 1)))
    }

    /// Maps `[ipa, ipa + size)` to host memory from `hpa` (both 4 KiB aligned, checked by
    /// the caller), readable and/or writable: stage-2 entries made valid need no
    /// invalidation.
    pub(crate) fn map_pages(
        &mut self,
        ipa: u64,
        hpa: u64,
        size: u64,
        read: bool,
        write: bool,
    ) -> Result<(), HostError> {
        let mut attrs = D::AF | S2_NORMAL;
        if read {
            attrs |= D::S2AP_R;
        }
        if write {
            attrs |= D::S2AP_W;
        }
        self.map_range(ipa, hpa, size, attrs)?;
        self.mapped.insert(ipa, size);
        Ok(())
    }

    /// The STE of a stream translated by stage 2 alone (`arm_smmu_make_s2_domain_ste`).
    pub(crate) fn s2_ste(&self) -> Ste {
        let f = self.host.features();
        Ste {
            s2vmid: self.vmid,
            s2t0sz: 64 - IPA_BITS as u8,
            s2sl0: 2,
            s2ps: self.s2ps,
            s2ttb: self.s2.root(),
            s2r: true,
            s2ir0: 1,
            s2or0: 1,
            s2sh0: 3,
            eats: if f.ats {
                vsva_smmuv3::ste::Eats::Full
            } else {
                vsva_smmuv3::ste::Eats::Abort
            },
            ..Ste::new(Config::S2Trans)
        }
    }

    /// Points stream `sid` at `ste` (`None`: abort) as a stream of this domain, claiming it
    /// when it is new here (`-EBUSY` when another domain holds it); `nested` says the STE
    /// walks a guest CD table, whose stage-1 and nested entries then go with every unmap.
    /// A stream already here changes STE in one write, then its CDs, the VMID's stage-1
    /// entries and its ATC entries are flushed, as the guest's old configuration may have
    /// left them. On failure nothing changed.
    pub(crate) fn set_stream(
        &mut self,
        sid: u32,
        ste: Option<&Ste>,
        nested: bool,
    ) -> Result<(), HostError> {
        let present = self.devices.contains(&sid);
        if !present {
            self.host.claim_stream(sid, self.vmid)?;
        }
        let ste = self.host.stream_ste(sid, ste);
        if let Err(e) = self.host.driver().write_ste(sid, ste.as_ref()) {
            if !present {
                self.host.release_stream(sid);
            }
            return Err(driver_error(e));
        }
        self.devices.insert(sid);
        if present {
            let mut cmds = vec![Cmd::CfgiCdAll { sid }, Cmd::TlbiNhAll { vmid: self.vmid }];
            if self.host.features().ats {
                cmds.push(Cmd::AtcInv {
                    sid,
                    ssid: None,
                    global: true,
                    addr: 0,
                    size: 52,
                });
            }
            self.issue(&cmds);
        }
        if nested {
            self.nested.insert(sid);
        } else {
            self.nested.remove(&sid);
        }
        Ok(())
    }

    /// Stream `sid` leaves the domain: it aborts, its CDs and ATC entries go.
    pub(crate) fn release(&mut self, sid: u32) {
        self.nested.remove(&sid);
        self.detach(sid);
    }

    /// Issues guest commands already confined to this domain (tagged with its VMID or
    /// naming its streams), then CMD_SYNC.
    pub(crate) fn issue_guest(&self, cmds: &[Cmd]) -> Result<(), HostError> {
        self.host.driver().issue(cmds).map_err(driver_error)
    }

    /// The stream table entry of the domain's streams under `table`: stage 2 alone
    /// (no table, or the guest's stage 1 bypassed), nested (the guest's CD table
    /// translates), or `None` for an aborting STE.
    fn ste(&self, table: Option<&PasidTableConfig>) -> Result<Option<Ste>, HostError> {
        let s2 = self.s2_ste();
        Ok(match table.map(|t| t.config) {
            None | Some(PasidConfig::Bypass) => Some(s2),
            Some(PasidConfig::Abort) => None,
            Some(PasidConfig::Translate { s1fmt, s1dss }) => {
                let t = table.expect("a translating config comes from a table");
                let s1fmt = S1Fmt::from_bits(s1fmt as u64)
                    .ok_or_else(|| invalid(format!("S1Fmt {s1fmt} is reserved")))?;
                let s1dss = S1Dss::from_bits(s1dss as u64)
                    .ok_or_else(|| invalid(format!("S1DSS {s1dss} is reserved")))?;
                Some(Ste {
                    config: Config::Nested,
                    s1_context_ptr: t.base_ptr.raw(),
                    s1cdmax: t.pasid_bits,
                    s1fmt,
                    s1dss,
                    s1cir: 1,
                    s1cor: 1,
                    s1csh: 3,
                    ..s2
                })
            }
        })
    }

    /// Whether every byte of `[ipa, ipa + len)` is mapped in stage 2.
    fn mapped(&self, ipa: u64, len: u64) -> bool {
        let Some(end) = ipa.checked_add(len) else {
            return false;
        };
        let mut at = ipa;
        while at < end {
            let Some((&base, &size)) = self.mapped.range(..=at).next_back() else {
                return false;
            };
            if at >= base + size {
                return false;
            }
            at = base + size;
        }
        true
    }

    /// The checks of an attach: the guest's table where the VM's memory is, with a size
    /// and format the SMMU takes (the STE is checked again, whole, before it is written).
    fn check_table(&self, cfg: &PasidTableConfig) -> Result<(), HostError> {
        let f = self.host.features();
        let PasidConfig::Translate { s1fmt, .. } = cfg.config else {
            return Ok(());
        };
        if cfg.pasid_bits > f.ssid_bits {
            return Err(invalid(format!(
                "{} PASID bits, the SMMU has {} (IDR1.SSIDSIZE)",
                cfg.pasid_bits, f.ssid_bits
            )));
        }
        let fmt = S1Fmt::from_bits(s1fmt as u64)
            .ok_or_else(|| invalid(format!("S1Fmt {s1fmt} is reserved")))?;
        if fmt != S1Fmt::Linear && !f.cd2l {
            return Err(invalid("2-level CD tables need IDR0.CD2L"));
        }
        // The bytes the SMMU may read at S1ContextPtr: the linear table, or the level-1
        // table of a 2-level one.
        let len = match fmt.split().filter(|_| cfg.pasid_bits != 0) {
            None => 64u64 << cfg.pasid_bits,
            Some(split) => 8u64 << (cfg.pasid_bits as u32).saturating_sub(split),
        };
        let base = cfg.base_ptr.raw();
        if !self.mapped(base, len) {
            return Err(invalid(format!(
                "the CD table at IPA {base:#x} (+{len:#x}) is not in the VM's memory"
            )));
        }
        Ok(())
    }

    /// Writes `ste` for every stream of the domain; on failure the streams done get
    /// `previous` back.
    fn install(&self, ste: Option<&Ste>, previous: Option<&Ste>) -> Result<(), HostError> {
        let mut drv = self.host.driver();
        let mut done = Vec::new();
        for &sid in &self.devices {
            if let Err(e) = drv.write_ste(sid, self.host.stream_ste(sid, ste).as_ref()) {
                for &s in &done {
                    if let Err(e) = drv.write_ste(s, self.host.stream_ste(s, previous).as_ref()) {
                        tracing::error!("smmuv3: restoring the STE of {s:#x}: {e}");
                    }
                }
                return Err(driver_error(e));
            }
            done.push(sid);
        }
        Ok(())
    }

    /// After the guest's stage 1 changed or went: its CDs (CMD_CFGI_CD_ALL per stream),
    /// its stage-1 and nested TLB entries under the VMID (CMD_TLBI_NH_ALL), and every ATC
    /// entry of the streams (CMD_ATC_INV for all SubstreamIDs), then CMD_SYNC.
    fn flush_stage1(&self) {
        let mut cmds: Vec<Cmd> = Vec::new();
        for &sid in &self.devices {
            cmds.push(Cmd::CfgiCdAll { sid });
        }
        cmds.push(Cmd::TlbiNhAll { vmid: self.vmid });
        self.atc_all(&mut cmds);
        self.issue(&cmds);
    }

    fn atc_all(&self, cmds: &mut Vec<Cmd>) {
        if !self.host.features().ats {
            return;
        }
        for &sid in &self.devices {
            cmds.push(Cmd::AtcInv {
                sid,
                ssid: None,
                global: true,
                addr: 0,
                size: 52,
            });
        }
    }

    fn issue(&self, cmds: &[Cmd]) {
        if let Err(e) = self.host.driver().issue(cmds) {
            tracing::error!("smmuv3: VMID {}: invalidation failed: {e}", self.vmid);
        }
    }

    /// Maps `[ipa, ipa + size)` to host memory from `hpa` in the largest blocks alignment
    /// allows; on failure the pages mapped are removed.
    fn map_range(&mut self, ipa: u64, hpa: u64, size: u64, attrs: u64) -> Result<(), HostError> {
        let frames = self.host.frames().clone();
        let mem = frames.memory().clone();
        let Some(table) = self.table.as_mut() else {
            return Err(invalid("the domain has no stage 2"));
        };
        let mut alloc = || frames.alloc_frame().ok().map(|h| h.0);
        let mut done = 0;
        let mut result = Ok(());
        while done < size {
            let (va, pa) = (ipa + done, hpa + done);
            let page = PAGE_SIZES
                .into_iter()
                .find(|s| {
                    let b = s.bytes();
                    va % b == 0 && pa % b == 0 && size - done >= b
                })
                .unwrap_or(PageSize::Size4K);
            if let Err(e) = table.map(&*mem, &mut alloc, va, pa, page, attrs) {
                result = Err(HostError::Driver {
                    errno: libc::ENOMEM,
                    detail: format!("smmuv3: stage-2 map of {va:#x}: {e}"),
                });
                break;
            }
            done += page.bytes();
        }
        if result.is_err() && done > 0 {
            self.unmap_range(ipa, done);
        }
        result
    }

    /// Removes every page of `[ipa, ipa + size)` and invalidates as
    /// `arm_smmu_tlb_inv_range` does for a stage-2 domain: CMD_TLBI_S2_IPA per leaf
    /// removed (the whole VMID past [`TLBI_RANGE_LIMIT`] leaves); nested (combined) entries
    /// are not removed by CMD_TLBI_S2_IPA (IHI 0070 §4.4), so CMD_TLBI_NH_ALL under the VMID
    /// follows while a guest table is attached; the ATCs, which cache guest virtual
    /// addresses when nested, are invalidated whole; then CMD_SYNC.
    fn unmap_range(&mut self, ipa: u64, size: u64) {
        let mem = self.host.frames().memory().clone();
        let Some(table) = self.table.as_mut() else {
            return;
        };
        let end = ipa.saturating_add(size);
        let mut leaves = Vec::new();
        let mut at = ipa;
        while at < end {
            match table.lookup(&*mem, at) {
                Ok(Some(m)) => {
                    let page = at & !(m.size.bytes() - 1);
                    if let Err(e) = table.unmap(&*mem, page, m.size) {
                        tracing::error!("smmuv3: unmapping {page:#x}: {e}");
                    }
                    leaves.push(page);
                    at = page + m.size.bytes();
                }
                _ => at += PageSize::Size4K.bytes(),
            }
        }
        let mut cmds: Vec<Cmd> = if leaves.len() as u64 > TLBI_RANGE_LIMIT {
            vec![Cmd::TlbiS12Vmall { vmid: self.vmid }]
        } else {
            leaves
                .iter()
                .map(|&addr| Cmd::TlbiS2Ipa {
                    vmid: self.vmid,
                    addr: TlbiAddr {
                        addr,
                        leaf: true,
                        ..TlbiAddr::default()
                    },
                })
                .collect()
        };
        if self.pasid_table.is_some() || !self.nested.is_empty() {
            cmds.push(Cmd::TlbiNhAll { vmid: self.vmid });
        }
        self.atc_all(&mut cmds);
        self.issue(&cmds);
    }

    fn attach(&mut self, sid: u32) -> Result<(), HostError> {
        if self.devices.contains(&sid) {
            return Err(HostError::Driver {
                errno: libc::EBUSY,
                detail: format!("smmuv3: stream {sid:#x} is attached already"),
            });
        }
        let ste = self.ste(self.pasid_table.as_ref())?;
        let ste = self.host.stream_ste(sid, ste.as_ref());
        self.host.claim_stream(sid, self.vmid)?;
        if let Err(e) = self.host.driver().write_ste(sid, ste.as_ref()) {
            self.host.release_stream(sid);
            return Err(driver_error(e));
        }
        self.devices.insert(sid);
        Ok(())
    }

    /// The stream aborts, its CDs and ATC entries go; its TLB entries are the VMID's and
    /// go with the domain (or the next invalidation of the VMID).
    fn detach(&mut self, sid: u32) {
        if !self.devices.remove(&sid) {
            return;
        }
        let mut drv = self.host.driver();
        if let Err(e) = drv.write_ste(sid, None) {
            tracing::error!("smmuv3: aborting stream {sid:#x}: {e}");
        }
        let mut cmds = vec![Cmd::CfgiCdAll { sid }];
        if self.host.features().ats {
            cmds.push(Cmd::AtcInv {
                sid,
                ssid: None,
                global: true,
                addr: 0,
                size: 52,
            });
        }
        if let Err(e) = drv.issue(&cmds) {
            tracing::error!("smmuv3: detaching stream {sid:#x}: {e}");
        }
        drop(drv);
        self.host.release_stream(sid);
    }

    /// The commands of a guest invalidation (Auger's `arm_smmu_cache_invalidate`): the
    /// architecture id is the guest's ASID and the PASID its SubstreamID; every command is
    /// tagged with the domain's VMID or names one of its streams.
    ///
    /// | cache | granularity | commands |
    /// |---|---|---|
    /// | IOTLB | domain | CMD_TLBI_NH_ALL |
    /// | IOTLB | PASID with ASID | CMD_TLBI_NH_ASID |
    /// | IOTLB | address with ASID | CMD_TLBI_NH_VA per granule (NH_ASID past the limit) |
    /// | IOTLB | address without ASID | CMD_TLBI_NH_VAA per granule (NH_ALL past the limit) |
    /// | PASID | PASID given | CMD_CFGI_CD per stream |
    /// | PASID | domain, or no PASID | CMD_CFGI_CD_ALL per stream |
    /// | DEV_IOTLB | address | CMD_ATC_INV of the span, per stream |
    /// | DEV_IOTLB | PASID or domain | CMD_ATC_INV of everything, per stream |
    ///
    /// An IOTLB invalidation by PASID without ASID, or a PASID-cache invalidation by
    /// address, is `-EINVAL`.
    fn invalidation(&self, inv: &CacheInvalidate) -> Result<Vec<Cmd>, HostError> {
        let vmid = self.vmid;
        let mut cmds = Vec::new();
        let ssid = inv.pasid().map(|p| p.raw());
        if inv.cache & IOMMU_CACHE_INV_TYPE_PASID != 0 {
            if let InvGranularity::Addr { .. } = inv.granularity {
                return Err(invalid(
                    "a PASID-cache invalidation cannot select addresses",
                ));
            }
            for &sid in &self.devices {
                cmds.push(match ssid {
                    Some(ssid) => Cmd::CfgiCd {
                        sid,
                        ssid,
                        leaf: false,
                    },
                    None => Cmd::CfgiCdAll { sid },
                });
            }
        }
        if inv.cache & IOMMU_CACHE_INV_TYPE_IOTLB != 0 {
            match inv.granularity {
                InvGranularity::Domain => cmds.push(Cmd::TlbiNhAll { vmid }),
                InvGranularity::Pasid { archid: None, .. } => {
                    return Err(invalid("an IOTLB invalidation by PASID needs the ASID"))
                }
                InvGranularity::Pasid {
                    archid: Some(asid), ..
                } => cmds.push(Cmd::TlbiNhAsid {
                    vmid,
                    asid: asid16(asid)?,
                }),
                InvGranularity::Addr {
                    archid,
                    addr,
                    granule_size,
                    nb_granules,
                    leaf,
                    ..
                } => {
                    let asid = archid.map(asid16).transpose()?;
                    if granule_size.checked_mul(nb_granules).is_none() {
                        return Err(invalid("the address range overflows"));
                    }
                    if nb_granules > TLBI_RANGE_LIMIT {
                        cmds.push(match asid {
                            Some(asid) => Cmd::TlbiNhAsid { vmid, asid },
                            None => Cmd::TlbiNhAll { vmid },
                        });
                    } else {
                        for i in 0..nb_granules {
                            let a = TlbiAddr {
                                addr: addr.wrapping_add(i * granule_size),
                                leaf,
                                ..TlbiAddr::default()
                            };
                            cmds.push(match asid {
                                Some(asid) => Cmd::TlbiNhVa {
                                    vmid,
                                    asid,
                                    addr: a,
                                },
                                None => Cmd::TlbiNhVaa { vmid, addr: a },
                            });
                        }
                    }
                }
            }
        }
        if inv.cache & IOMMU_CACHE_INV_TYPE_DEV_IOTLB != 0 && self.host.features().ats {
            for &sid in &self.devices {
                let (addr, size) = match inv.granularity {
                    InvGranularity::Addr {
                        addr,
                        granule_size,
                        nb_granules,
                        ..
                    } => atc_span(addr, granule_size.saturating_mul(nb_granules)),
                    _ => (0, 52),
                };
                cmds.push(Cmd::AtcInv {
                    sid,
                    ssid,
                    global: ssid.is_none(),
                    addr,
                    size,
                });
            }
        }
        Ok(cmds)
    }
}

/// The naturally aligned span of 4 KiB pages covering `[iova, iova + size)` as
/// CMD_ATC_INV's address and Size (`arm_smmu_atc_inv_to_cmd`).
fn atc_span(iova: u64, size: u64) -> (u64, u8) {
    if size == 0 {
        return (0, 52);
    }
    let start = iova >> 12;
    let end = iova.saturating_add(size - 1) >> 12;
    let log2_span = 64 - (start ^ end).leading_zeros();
    let mask = (1u64 << log2_span.min(63)) - 1;
    ((start & !mask) << 12, log2_span as u8)
}

/// A guest ASID as the 16-bit field it goes into.
fn asid16(archid: u32) -> Result<u16, HostError> {
    u16::try_from(archid).map_err(|_| invalid(format!("ASID {archid:#x} is wider than 16 bits")))
}

impl IommuBackend for SmmuDomain {
    /// Stage 2's block sizes (4 KiB, 2 MiB, 1 GiB) and, with stage 1 and stage 2, nesting
    /// through a guest PASID (CD) table.
    fn info(&self) -> BackendInfo {
        let f = self.host.features();
        BackendInfo {
            iova_pgsizes: PAGE_SIZES.iter().fold(0, |acc, s| acc | s.bytes()),
            nesting: (f.s1p && f.s2p).then_some(vsva_uapi::request::NestingInfo {
                features: vsva_uapi::iommu::IOMMU_NESTING_FEAT_CACHE_INVLD,
                addr_width: IPA_BITS as u16,
                pasid_bits: f.ssid_bits as u16,
                vendor: vsva_uapi::request::NestingVendor::ArmSmmuV3 {
                    asid_bits: if f.asid16 { 16 } else { 8 },
                    pgtbl_fmt: vsva_uapi::iommu::ARM_PGTBL_64_LPAE_S1,
                },
            }),
        }
    }

    /// Resolves the VMM's memory and maps it at the IPA, readable and/or writable as asked.
    /// EINVAL for a mapping with neither right, not 4-KiB aligned, or beyond the IPA size;
    /// EFAULT for memory that is not host memory. Stage-2 entries made valid need no
    /// invalidation.
    fn map_dma(&mut self, map: &DmaMap) -> Result<(), HostError> {
        if !map.read && !map.write {
            return Err(invalid("MAP_DMA: neither readable nor writable"));
        }
        let page = PageSize::Size4K.bytes();
        if map.size == 0 || (map.iova.raw() | map.vaddr | map.size) % page != 0 {
            return Err(invalid("MAP_DMA: empty or not 4 KiB aligned"));
        }
        let end = map.iova.raw().checked_add(map.size);
        if end.is_none_or(|e| e > 1u64 << IPA_BITS) {
            return Err(invalid(format!(
                "MAP_DMA: {:#x}+{:#x} is beyond the {IPA_BITS}-bit IPA space",
                map.iova.raw(),
                map.size
            )));
        }
        let hpa = self
            .host
            .frames()
            .memory()
            .resolve_user(map.vaddr, map.size)
            .map_err(|e| HostError::Driver {
                errno: libc::EFAULT,
                detail: format!("smmuv3: MAP_DMA of {:#x}: {e}", map.vaddr),
            })?;
        self.map_pages(map.iova.raw(), hpa.0, map.size, map.read, map.write)
    }

    fn unmap_dma(&mut self, iova: Iova, size: u64) {
        if size > 0 {
            self.unmap_range(iova.raw(), size);
            self.mapped.remove(&iova.raw());
        }
    }

    /// Binding one PASID at a time is VT-d's model: on SMMUv3 the guest owns the CD table.
    fn bind_gpasid(&mut self, _bind: &BindGpasid) -> Result<(), HostError> {
        Err(HostError::NoDriverOp("bind_gpasid"))
    }

    fn unbind_gpasid(&mut self, _bind: &BindGpasid) {}

    /// See [`SmmuDomain`]'s `invalidation` for the commands; a CMD_SYNC ends them.
    fn cache_invalidate(&mut self, inv: &CacheInvalidate) -> Result<(), HostError> {
        let cmds = self.invalidation(inv)?;
        self.host.driver().issue(&cmds).map_err(driver_error)
    }

    /// `arm_smmu_attach_pasid_table`: the guest's CD table (translate), or its stage 1
    /// bypassed or aborting, for every stream of the domain, then the guest's old stage-1
    /// state flushed. Refused with nothing changed (`-EINVAL`): a translating table while
    /// one is attached (the series supports no stage-1 to stage-1 transition: the guest
    /// goes through bypass, abort or a detach), a table outside the VM's memory, more PASID
    /// bits than the SMMU has, a format it lacks. Unlike the series, which takes a single
    /// CD (`pasid_bits` 0), the table may hold 2^`pasid_bits` CDs in any S1Fmt, with
    /// S1DSS as given: one guest process per SubstreamID.
    fn attach_pasid_table(&mut self, cfg: &PasidTableConfig) -> Result<(), HostError> {
        let translating = |t: &PasidTableConfig| matches!(t.config, PasidConfig::Translate { .. });
        if translating(cfg) && self.pasid_table.as_ref().is_some_and(translating) {
            return Err(invalid(
                "a translating CD table is attached: no stage-1 to stage-1 transition",
            ));
        }
        self.check_table(cfg)?;
        let ste = self.ste(Some(cfg))?;
        if let Some(ste) = &ste {
            Ste::decode(&ste.encode(), self.host.features())
                .map_err(|e| invalid(format!("the nested STE would be C_BAD_STE: {e}")))?;
        }
        let previous = self.ste(self.pasid_table.as_ref())?;
        self.install(ste.as_ref(), previous.as_ref())?;
        self.pasid_table = Some(*cfg);
        self.flush_stage1();
        Ok(())
    }

    /// `arm_smmu_detach_pasid_table`: stage 2 alone again for every stream, and the
    /// guest's CDs, stage-1 and nested TLB entries and ATC entries flushed.
    fn detach_pasid_table(&mut self) {
        if self.pasid_table.take().is_none() {
            return;
        }
        match self.ste(None) {
            Ok(ste) => {
                if let Err(e) = self.install(ste.as_ref(), ste.as_ref()) {
                    tracing::error!("smmuv3: VMID {}: detaching the PASID table: {e}", self.vmid);
                }
            }
            Err(e) => tracing::error!("smmuv3: VMID {}: {e}", self.vmid),
        }
        self.flush_stage1();
    }

    fn attach_device(&mut self, sid: SourceId) -> Result<(), HostError> {
        self.attach(sid.rid() as u32)
    }

    fn detach_device(&mut self, sid: SourceId) {
        self.detach(sid.rid() as u32);
    }

    fn set_fault_sink(&mut self, sink: FaultSink) {
        self.host.set_sink(self.vmid, sink);
    }

    /// The response to a page request of one of the domain's streams, as
    /// [`SmmuHost::page_response`] gives it.
    fn page_response(
        &mut self,
        sid: SourceId,
        request: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), HostError> {
        let s = sid.rid() as u32;
        if !self.devices.contains(&s) {
            return Err(HostError::DeviceNotAttached(sid));
        }
        self.host.page_response(s, request, response)
    }
}

impl Drop for SmmuDomain {
    /// Aborts every stream, invalidates everything the VMID tagged, frees stage 2 and the
    /// VMID.
    fn drop(&mut self) {
        for sid in self.devices() {
            self.detach(sid);
        }
        self.pasid_table = None;
        self.issue(&[Cmd::TlbiS12Vmall { vmid: self.vmid }]);
        if let Some(t) = self.table.take() {
            let frames = self.host.frames();
            for &f in t.tables() {
                let _ = frames.free(Hpa(f));
            }
            let _ = frames.free(Hpa(self.s2.root()));
        }
        self.host.free_vmid(self.vmid);
    }
}
