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
//!
//! An iommufd paging HWPT allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` is a stage-1
//! domain instead ([`SmmuDomain::new_dirty_tracking`]): a VMID, a stage-1 table and a CD
//! table of its own whose CD has HA and HD, writable pages mapped writable-clean, their
//! dirty state read and cleared by [`SmmuDomain::read_and_clear_dirty`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use vsva_mem::PhysMem;
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, cmd::Cmd, cmd::TlbiAddr, features::Httu,
    ste::Config, ste::S1Dss, ste::S1Fmt, ste::Ste, walk::AddressSize, walk::PageSize,
    walk::S1Config, walk::S1Flags, walk::S2Config, walk::S2Flags,
};
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_PASID,
};
use vsva_uapi::request::{
    BindGpasid, CacheInvalidate, DmaMap, InvGranularity, PageRequest, PageResponse, PasidConfig,
    PasidTableConfig,
};
use vsva_vtd::{addr::Hpa, addr::Iova, addr::SourceId};

use super::dirty::harvest;
use super::unit::SmmuHost;
use super::{driver_error, invalid};
use crate::container::{BackendInfo, IommuBackend};
use crate::driver::DirtyBitmap;
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

/// A stage-1 leaf as io-pgtable-arm makes it: MAIR index 1 (write-back), inner
/// shareable, AF, not global, unprivileged access (`AP[1]`).
const S1_NORMAL: u64 = 1 << 2 | 3 << 8 | D::AF | D::NG | D::AP_EL0;

/// The MAIR of a stage-1 domain's CD (Linux's `ARM_LPAE_MAIR_ATTR_*`): index 0
/// non-cacheable, 1 write-back read/write-allocate, 2 Device-nGnRE, 3 inner
/// non-cacheable outer write-back.
const S1_MAIR: u64 = 0x44 | 0xff << 8 | 0x04 << 16 | 0xf4 << 24;

/// The ASID of every stage-1 domain: each domain has a VMID of its own, which tags its
/// TLB entries with the ASID, so one ASID serves them all.
const S1_ASID: u16 = 1;

/// A stage-1 domain's context (`arm_smmu_domain` at `ARM_SMMU_DOMAIN_S1`, the domain
/// Linux allocates for `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`): a CD table of one CD in a frame
/// of its own, whose CD has HA and HD set.
#[derive(Debug)]
struct Stage1 {
    asid: u16,
    /// The CD table's address.
    cd_table: u64,
}

/// One container's domain.
#[derive(Debug)]
pub struct SmmuDomain {
    host: Arc<SmmuHost>,
    vmid: u16,
    /// The table's start table: S2TTB, or TTB0 of a stage-1 domain.
    root: u64,
    /// Set for a stage-1 domain.
    stage1: Option<Stage1>,
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
            root,
            stage1: None,
            s2ps: oas,
            table: Some(TableBuilder::stage2(&s2)),
            devices: BTreeSet::new(),
            mapped: BTreeMap::new(),
            pasid_table: None,
            nested: BTreeSet::new(),
        })
    }

    /// Whether the SMMU can track dirty pages (`arm_smmu_dbm_capable`): stage 1 with
    /// IDR0.HTTU reporting A and D updates (IDR0.COHACC, which Linux also needs, is always
    /// set by the model).
    pub fn dirty_tracking_supported(host: &SmmuHost) -> bool {
        let f = host.features();
        f.s1p && f.httu == Httu::AccessDirty
    }

    /// A stage-1 domain that tracks dirty pages, as `arm_smmu_domain_alloc_paging_flags`
    /// makes for `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` (`arm_smmu_domain_finalise_s1` with
    /// `IO_PGTABLE_QUIRK_ARM_HD`): a VMID, an empty 48-bit stage-1 table, and a CD table of
    /// one CD with HA and HD set; writable pages are mapped writable-clean. EOPNOTSUPP
    /// unless [`SmmuDomain::dirty_tracking_supported`].
    pub fn new_dirty_tracking(host: &Arc<SmmuHost>) -> Result<Self, HostError> {
        if !Self::dirty_tracking_supported(host) {
            return Err(HostError::Driver {
                errno: libc::EOPNOTSUPP,
                detail: "smmuv3: dirty tracking needs stage 1 and IDR0.HTTU A and D".into(),
            });
        }
        let frames = host.frames();
        let oom = |e| HostError::Driver {
            errno: libc::ENOMEM,
            detail: format!("smmuv3: stage-1 domain: {e}"),
        };
        let vmid = host.alloc_vmid()?;
        let root = match frames.alloc_frame() {
            Ok(r) => r.0,
            Err(e) => {
                host.free_vmid(vmid);
                return Err(oom(e));
            }
        };
        let cd_table = match frames.alloc_frame() {
            Ok(c) => c.0,
            Err(e) => {
                let _ = frames.free(Hpa(root));
                host.free_vmid(vmid);
                return Err(oom(e));
            }
        };
        let undo = || {
            let _ = frames.free(Hpa(cd_table));
            let _ = frames.free(Hpa(root));
            host.free_vmid(vmid);
        };
        let oas = host.features().cap_oas(AddressSize::Bits48);
        let t0sz = 64 - IPA_BITS as u8;
        let flags = S1Flags {
            ha: true,
            hd: true,
            ..S1Flags::default()
        };
        let s1 = match S1Config::new(root, t0sz, oas, flags) {
            Ok(s1) => s1,
            Err(e) => {
                undo();
                return Err(invalid(format!("stage-1 configuration: {e}")));
            }
        };
        let cd = ContextDescriptor {
            ir0: 1,
            or0: 1,
            sh0: 3,
            ips: oas,
            ha: true,
            hd: true,
            mair: S1_MAIR,
            ..ContextDescriptor::new(root, t0sz, S1_ASID)
        };
        let mem = frames.memory();
        for (i, w) in cd.encode().iter().enumerate() {
            if let Err(e) = mem.write_u64(cd_table + 8 * i as u64, *w) {
                undo();
                return Err(invalid(format!("writing the CD: {e}")));
            }
        }
        Ok(SmmuDomain {
            host: host.clone(),
            vmid,
            root,
            stage1: Some(Stage1 {
                asid: S1_ASID,
                cd_table,
            }),
            s2ps: oas,
            table: Some(TableBuilder::stage1(&s1)),
            devices: BTreeSet::new(),
            mapped: BTreeMap::new(),
            pasid_table: None,
            nested: BTreeSet::new(),
        })
    }

    /// Whether the domain tracks dirty pages (a stage-1 domain).
    pub fn dirty_tracking(&self) -> bool {
        self.stage1.is_some()
    }

    /// Reads the dirty pages of `bitmap`'s range into it (`IOMMU_HWPT_GET_DIRTY_BITMAP`,
    /// `arm_smmu_read_and_clear_dirty`): every writable-dirty leaf that maps part of the
    /// range sets the bits of the pages it maps. Unless `no_clear`, those leaves are made
    /// writable-clean and their TLB entries and the streams' ATC entries invalidated
    /// (`iommu_iotlb_sync` of the gathered range): a TLB entry of a writable-dirty leaf
    /// would let the next write through without marking the leaf. Returns the number of
    /// dirty leaves. EOPNOTSUPP for a stage-2 domain. The hardware tracks from the
    /// domain's allocation: there is no off state to refuse a read in, as in Linux.
    pub fn read_and_clear_dirty(
        &self,
        bitmap: &mut DirtyBitmap<'_>,
        no_clear: bool,
    ) -> Result<u64, HostError> {
        self.harvest(bitmap.iova(), bitmap.last(), !no_clear, &mut |iova, len| {
            bitmap.record(iova, len)
        })
    }

    /// Makes every writable-dirty leaf clean, with the invalidations that follow (the
    /// bitmap-less read iommufd's `iopt_clear_dirty_data` does when tracking is turned on).
    pub fn clear_dirty(&self) -> Result<(), HostError> {
        self.harvest(0, u64::MAX, true, &mut |_, _| {}).map(|_| ())
    }

    fn harvest(
        &self,
        start: u64,
        last: u64,
        clear: bool,
        record: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, HostError> {
        let Some(s1) = &self.stage1 else {
            return Err(HostError::Driver {
                errno: libc::EOPNOTSUPP,
                detail: "smmuv3: dirty tracking on a stage-2 domain".into(),
            });
        };
        let mem = self.host.frames().memory().clone();
        let found = harvest(&*mem, self.root, start, last, clear, record)?;
        if !found.cleaned.is_empty() {
            let addrs: Vec<u64> = found.cleaned.iter().map(|l| l.0).collect();
            let mut cmds = self.tlbi_stage1(s1.asid, &addrs);
            self.atc_leaves(&found.cleaned, &mut cmds);
            self.issue(&cmds);
        }
        Ok(found.dirty)
    }

    /// CMD_TLBI_NH_VA with the Leaf hint per leaf at `leaves` under the domain's VMID and
    /// `asid`; past [`TLBI_RANGE_LIMIT`] leaves, CMD_TLBI_NH_ASID.
    fn tlbi_stage1(&self, asid: u16, leaves: &[u64]) -> Vec<Cmd> {
        let vmid = self.vmid;
        if leaves.len() as u64 > TLBI_RANGE_LIMIT {
            return vec![Cmd::TlbiNhAsid { vmid, asid }];
        }
        leaves
            .iter()
            .map(|&addr| Cmd::TlbiNhVa {
                vmid,
                asid,
                addr: TlbiAddr {
                    addr,
                    leaf: true,
                    ..TlbiAddr::default()
                },
            })
            .collect()
    }

    /// CMD_ATC_INV of the span covering `leaves`, per stream (`arm_smmu_atc_inv_domain`).
    fn atc_leaves(&self, leaves: &[(u64, u64)], cmds: &mut Vec<Cmd>) {
        if !self.host.features().ats || leaves.is_empty() {
            return;
        }
        let lo = leaves.iter().map(|l| l.0).min().unwrap_or(0);
        let hi = leaves.iter().map(|l| l.0 + l.1).max().unwrap_or(0);
        let (addr, size) = atc_span(lo, hi - lo);
        for &sid in &self.devices {
            cmds.push(Cmd::AtcInv {
                sid,
                ssid: None,
                global: false,
                addr,
                size,
            });
        }
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
        let attrs = if self.stage1.is_some() {
            // io-pgtable-arm's stage-1 leaf: read-only, or writable-clean under
            // IO_PGTABLE_QUIRK_ARM_HD (DBM with AP[2] set, the SMMU clears AP[2]).
            S1_NORMAL | D::AP_RO | if write { D::DBM } else { 0 }
        } else {
            let mut attrs = D::AF | S2_NORMAL;
            if read {
                attrs |= D::S2AP_R;
            }
            if write {
                attrs |= D::S2AP_W;
            }
            attrs
        };
        self.map_range(ipa, hpa, size, attrs)?;
        self.mapped.insert(ipa, size);
        Ok(())
    }

    /// The STE of a stream attached to the domain itself: for a stage-1 domain its CD
    /// table's (`arm_smmu_make_cdtable_ste`: stage 1 alone, one CD, the domain's VMID
    /// tagging its TLB entries), otherwise [`SmmuDomain::s2_ste`].
    pub(crate) fn paging_ste(&self) -> Ste {
        let Some(s1) = &self.stage1 else {
            return self.s2_ste();
        };
        Ste {
            s1_context_ptr: s1.cd_table,
            s1cir: 1,
            s1cor: 1,
            s1csh: 3,
            s2vmid: self.vmid,
            eats: self.s2_ste().eats,
            ..Ste::new(Config::S1Trans)
        }
    }

    /// The STE of a stream translated by stage 2 alone (`arm_smmu_make_s2_domain_ste`).
    pub(crate) fn s2_ste(&self) -> Ste {
        let f = self.host.features();
        Ste {
            s2vmid: self.vmid,
            s2t0sz: 64 - IPA_BITS as u8,
            s2sl0: 2,
            s2ps: self.s2ps,
            s2ttb: self.root,
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
    /// addresses when nested, are invalidated whole; then CMD_SYNC. A stage-1 domain's
    /// leaves go with CMD_TLBI_NH_VA (NH_ASID past the limit) and the ATCs whole.
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
        if let Some(s1) = &self.stage1 {
            let mut cmds = self.tlbi_stage1(s1.asid, &leaves);
            self.atc_all(&mut cmds);
            self.issue(&cmds);
            return;
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

    /// A device bound to an iommufd through its cdev is EBUSY (`vfio_group_fops_open`).
    fn attach_device(&mut self, sid: SourceId) -> Result<(), HostError> {
        let claimed = self.host.open_devices().claim_for_container(sid)?;
        self.attach(sid.rid() as u32).inspect_err(|_| {
            if claimed {
                self.host.open_devices().release_from_container(sid);
            }
        })
    }

    /// A cdev may bind the device again.
    fn detach_device(&mut self, sid: SourceId) {
        self.detach(sid.rid() as u32);
        self.host.open_devices().release_from_container(sid);
    }

    fn set_fault_sink(&mut self, sink: FaultSink) {
        self.host.set_sink(self.vmid, sink);
    }

    /// The response to a page request of one of the domain's streams, as
    /// `SmmuHost::page_response` gives it.
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
            let _ = frames.free(Hpa(self.root));
        }
        if let Some(s1) = self.stage1.take() {
            let _ = self.host.frames().free(Hpa(s1.cd_table));
        }
        self.host.free_vmid(self.vmid);
    }
}
