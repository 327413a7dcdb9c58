//! One SMMU under the driver: probe, reset and enable, STE and CD updates, invalidations,
//! page responses, the output queues and global errors.

use vsva_mem::PhysMem;
use vsva_smmuv3::regs::{cr0, gerror, offset, Irq, GBPA_ABORT, GBPA_UPDATE};
use vsva_smmuv3::{
    cd::ContextDescriptor, cmd::Cmd, cmd::PriResp, cmd::TlbiAddr, event::Event, features::Features,
    priq::PriqEntry, ste::Config, ste::Ste,
};

use crate::cdtab::CdTable;
use crate::cmdq::CommandQueue;
use crate::queues::{Drained, OutputQueue};
use crate::strtab::{read_words, write_words, zero, StreamTable, StrtabFormat};
use crate::{DmaAlloc, Error, Registers, POLL_LIMIT};

/// What probing the ID registers found (`arm_smmu_device_hw_probe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// The features STEs, CDs and commands are checked against.
    pub features: Features,
    /// IDR0.ST_LEVEL: 2-level stream tables.
    pub two_level_strtab: bool,
    /// IDR1.CMDQS, EVENTQS, PRIQS: log2 of the largest command, event and PRI queues.
    pub queue_log2: [u8; 3],
}

/// Reads IDR0, IDR1, IDR3 and IDR5. Refused as Linux does: an SMMU with neither stage, or
/// whose tables or queues are preset (IDR1.TABLES_PRESET, QUEUES_PRESET); and what vsva's
/// formats cannot describe (see [`Features::from_idr`]).
pub fn probe<R: Registers>(regs: &R) -> Result<Caps, Error> {
    let idr0 = regs.read32(offset::IDR0)?;
    let idr1 = regs.read32(offset::IDR1)?;
    let idr3 = regs.read32(offset::IDR3)?;
    let idr5 = regs.read32(offset::IDR5)?;
    if idr1 & (1 << 30 | 1 << 29) != 0 {
        return Err(Error::Unsupported("embedded implementation (IDR1 presets)"));
    }
    let features = Features::from_idr(idr0, idr1, idr3, idr5)?;
    if !features.s1p && !features.s2p {
        return Err(Error::Unsupported("no translation support (IDR0.S1P/S2P)"));
    }
    let field = |v: u32, lo: u32| ((v >> lo) & 0x1f) as u8;
    Ok(Caps {
        features,
        two_level_strtab: (idr0 >> 27) & 3 == 1,
        queue_log2: [field(idr1, 21), field(idr1, 16), field(idr1, 11)],
    })
}

/// The driver's choices for one SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverConfig {
    /// The stream table format; `None` chooses as Linux does (2-level when IDR0.ST_LEVEL
    /// allows it).
    pub strtab: Option<StrtabFormat>,
    /// log2 of the command, event and PRI queue sizes wanted, capped by IDR1.
    pub queue_log2: [u8; 3],
}

impl Default for DriverConfig {
    /// Linux's choice of table, queues of 256 entries.
    fn default() -> Self {
        DriverConfig {
            strtab: None,
            queue_log2: [8, 8, 8],
        }
    }
}

/// Which TLB entries an address-range invalidation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlbiStage {
    /// Stage-1 entries of `asid` under `vmid` (CMD_TLBI_NH_VA).
    Stage1 {
        /// VMID (0 without stage 2).
        vmid: u16,
        /// ASID.
        asid: u16,
    },
    /// Stage-2 entries of `vmid` (CMD_TLBI_S2_IPA).
    Stage2 {
        /// VMID.
        vmid: u16,
    },
}

/// The driver of one enabled SMMU.
#[derive(Debug)]
pub struct SmmuDriver<R, M, A> {
    regs: R,
    mem: M,
    alloc: A,
    caps: Caps,
    strtab: StreamTable,
    cmdq: CommandQueue,
    evtq: OutputQueue,
    priq: Option<OutputQueue>,
}

/// Waits for CR0ACK to show `value` after writing it to CR0 (`arm_smmu_write_reg_sync`).
fn write_cr0<R: Registers>(regs: &R, value: u32) -> Result<(), Error> {
    regs.write(offset::CR0, 4, value as u64)?;
    for _ in 0..POLL_LIMIT {
        if regs.read32(offset::CR0ACK)? == value {
            return Ok(());
        }
    }
    Err(Error::AckTimeout(value))
}

/// Waits for IRQ_CTRLACK to show `value` after writing it to IRQ_CTRL
/// (`arm_smmu_write_reg_sync`).
fn write_irq_ctrl<R: Registers>(regs: &R, value: u32) -> Result<(), Error> {
    regs.write(offset::IRQ_CTRL, 4, value as u64)?;
    for _ in 0..POLL_LIMIT {
        if regs.read32(offset::IRQ_CTRLACK)? == value {
            return Ok(());
        }
    }
    Err(Error::AckTimeout(value))
}

/// IRQ_CFG2 of an MSI: MemAttr Device-nGnRE, as Linux's `ARM_SMMU_MEMATTR_DEVICE_nGnRE`.
const MSI_MEMATTR_DEVICE_NGNRE: u64 = 0x1;

/// Queue BASE register value: RA, the address, LOG2SIZE.
fn queue_base(base: u64, log2size: u8) -> u64 {
    1 << 62 | base | log2size as u64
}

impl<R: Registers, M: PhysMem, A: DmaAlloc> SmmuDriver<R, M, A> {
    /// Probes the SMMU, builds its stream table and queues from `alloc`, and resets and
    /// enables it as `arm_smmu_device_reset` does: translation disabled with GBPA aborting,
    /// table and queue attributes (CR1: inner-shareable write-back), CR2 (PTM,
    /// RECINVSID), the stream table, the command queue enabled and every cached
    /// configuration and TLB entry invalidated, then the event and PRI queues, ATS checking
    /// and finally SMMUEN. Nothing stays allocated on failure.
    pub fn new(regs: R, mem: M, mut alloc: A, cfg: DriverConfig) -> Result<Self, Error> {
        let caps = probe(&regs)?;
        let f = caps.features;
        let format = match cfg.strtab {
            Some(fmt) => fmt,
            None if caps.two_level_strtab => StrtabFormat::TwoLevel,
            None => StrtabFormat::Linear,
        };
        if format == StrtabFormat::TwoLevel && !caps.two_level_strtab {
            return Err(Error::Unsupported("2-level stream table (IDR0.ST_LEVEL)"));
        }
        let log2 = |i: usize| cfg.queue_log2[i].min(caps.queue_log2[i]);
        let mut held: Vec<(u64, u64)> = Vec::new();
        let mut queue = |alloc: &mut A, log2size: u8, entry: u64| -> Result<u64, Error> {
            let size = entry << log2size;
            let base = alloc.alloc(size, size.max(32)).ok_or(Error::NoMemory)?;
            held.push((base, size));
            zero(&mem, base, size)?;
            Ok(base)
        };
        let queues = (|| {
            let c = queue(&mut alloc, log2(0), 16)?;
            let e = queue(&mut alloc, log2(1), 32)?;
            let p = if f.pri {
                Some(queue(&mut alloc, log2(2), 16)?)
            } else {
                None
            };
            Ok::<_, Error>((c, e, p))
        })();
        let built = queues
            .and_then(|q| StreamTable::new(format, f.sid_bits, &mem, &mut alloc).map(|st| (q, st)));
        let ((cmdq, evtq, priq), strtab) = match built {
            Ok(b) => b,
            Err(e) => {
                for (base, size) in held {
                    alloc.free(base, size);
                }
                return Err(e);
            }
        };
        let mut drv = SmmuDriver {
            cmdq: CommandQueue::new(cmdq, log2(0)),
            evtq: OutputQueue::new(evtq, log2(1), 32, offset::EVENTQ_PROD, offset::EVENTQ_CONS),
            priq: priq
                .map(|p| OutputQueue::new(p, log2(2), 16, offset::PRIQ_PROD, offset::PRIQ_CONS)),
            regs,
            mem,
            alloc,
            caps,
            strtab,
        };
        if let Err(e) = drv.reset() {
            drv.release();
            return Err(e);
        }
        Ok(drv)
    }

    fn reset(&mut self) -> Result<(), Error> {
        let regs = &self.regs;
        if regs.read32(offset::CR0)? & cr0::SMMUEN != 0 {
            regs.write(offset::GBPA, 4, (GBPA_UPDATE | GBPA_ABORT) as u64)?;
        }
        write_cr0(regs, 0)?;
        // CR1: queues and tables inner-shareable (3), inner and outer write-back (1).
        let cr1 = 3 << 10 | 1 << 8 | 1 << 6 | 3 << 4 | 1 << 2 | 1;
        regs.write(offset::CR1, 4, cr1)?;
        // CR2: PTM (no broadcast TLB maintenance) and RECINVSID.
        regs.write(offset::CR2, 4, 1 << 2 | 1 << 1)?;
        let (base, cfg) = self.strtab.registers();
        regs.write(offset::STRTAB_BASE, 8, base)?;
        regs.write(offset::STRTAB_BASE_CFG, 4, cfg as u64)?;
        let q = self.cmdq.queue();
        regs.write(offset::CMDQ_BASE, 8, queue_base(q.base, q.log2size))?;
        regs.write(offset::CMDQ_PROD, 4, 0)?;
        regs.write(offset::CMDQ_CONS, 4, 0)?;
        let mut enables = cr0::CMDQEN;
        write_cr0(regs, enables)?;
        let mut inv = vec![Cmd::CFGI_ALL];
        if self.caps.features.hyp {
            inv.push(Cmd::TlbiEl2All);
        }
        inv.push(Cmd::TlbiNsnhAll);
        self.issue(&inv)?;
        let regs = &self.regs;
        for (q, prod, cons, base, en) in [
            (
                Some(self.evtq),
                offset::EVENTQ_PROD,
                offset::EVENTQ_CONS,
                offset::EVENTQ_BASE,
                cr0::EVENTQEN,
            ),
            (
                self.priq,
                offset::PRIQ_PROD,
                offset::PRIQ_CONS,
                offset::PRIQ_BASE,
                cr0::PRIQEN,
            ),
        ] {
            if let Some(q) = q {
                let (b, log2size) = q.base();
                regs.write(base, 8, queue_base(b, log2size))?;
                regs.write(prod, 4, 0)?;
                regs.write(cons, 4, 0)?;
                enables |= en;
                write_cr0(regs, enables)?;
            }
        }
        if self.caps.features.ats {
            enables |= cr0::ATSCHK;
            write_cr0(regs, enables)?;
        }
        write_cr0(regs, enables | cr0::SMMUEN)
    }

    /// What probing found.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// The features commands, STEs and CDs are checked against.
    pub fn features(&self) -> &Features {
        &self.caps.features
    }

    /// The memory the tables live in.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The registers.
    pub fn registers(&self) -> &R {
        &self.regs
    }

    /// Bytes of memory the stream table and queues hold.
    pub fn footprint(&self) -> u64 {
        let (_, e) = self.evtq.base();
        let p = self.priq.map_or(0, |q| 16 << q.base().1);
        self.strtab.footprint() + (16 << self.cmdq.queue().log2size) + (32 << e) + p
    }

    /// Issues `cmds` and a CMD_SYNC, and waits for the sync.
    pub fn issue(&mut self, cmds: &[Cmd]) -> Result<(), Error> {
        let f = self.caps.features;
        self.cmdq.issue_sync(&self.regs, &self.mem, &f, cmds)
    }

    /// The STE of `sid` as it is in the table (`None` while its level-2 table is absent).
    pub fn read_ste(&self, sid: u32) -> Result<Option<[u64; 8]>, Error> {
        match self.strtab.ste_address(sid) {
            None if self.strtab.covers(sid) => Ok(None),
            None => Err(Error::BadStreamId(sid)),
            Some(addr) => read_words(&self.mem, addr).map(Some),
        }
    }

    /// Installs `ste` for `sid` (`None`: an aborting STE, as Linux's `disable_bypass`
    /// default), in the order of `arm_smmu_write_strtab_ent`: the words the live STE does
    /// not use first, CMD_CFGI_STE and CMD_SYNC so that the SMMU sees them before word 0,
    /// then word 0 (V, Config, S1ContextPtr), CMD_CFGI_STE and CMD_SYNC again, then the
    /// words only the old configuration used, and a CMD_PREFETCH_CONFIG as Linux issues
    /// without `ARM_SMMU_OPT_SKIP_PREFETCH`. When a word that both the old and the new
    /// configuration use changes, the STE aborts first (break before make). An STE the
    /// SMMU would find ILLEGAL is refused before anything is written.
    pub fn write_ste(&mut self, sid: u32, ste: Option<&Ste>) -> Result<(), Error> {
        let f = self.caps.features;
        let new = ste.copied().unwrap_or(Ste::new(Config::Abort));
        let words = new.encode();
        Ste::decode(&words, &f).map_err(Error::BadSte)?;
        let addr = self.strtab.ensure_ste(sid, &self.mem, &mut self.alloc)?;
        let old = read_words(&self.mem, addr)?;
        let old_config = Ste::decode(&old, &f).map_or(Config::Abort, |s| s.config);
        let changed = |w: usize| old[w] != words[w];
        let sync = Cmd::CfgiSte { sid, leaf: true };
        if (1..8).any(|w| {
            changed(w)
                && uses(old_config, w, old[w], words[w])
                && uses(new.config, w, old[w], words[w])
        }) {
            self.mem
                .write_u64(addr, Ste::new(Config::Abort).encode()[0])?;
            self.issue(&[sync])?;
            return self.write_ste(sid, ste);
        }
        let early: Vec<usize> = (1..8)
            .filter(|&w| changed(w) && !uses(old_config, w, old[w], words[w]))
            .collect();
        for &w in &early {
            self.mem.write_u64(addr + 8 * w as u64, words[w])?;
        }
        if !early.is_empty() {
            self.issue(&[sync])?;
        }
        self.mem.write_u64(addr, words[0])?;
        self.issue(&[sync])?;
        let late: Vec<usize> = (1..8)
            .filter(|&w| changed(w) && !early.contains(&w))
            .collect();
        for &w in &late {
            self.mem.write_u64(addr + 8 * w as u64, words[w])?;
        }
        let mut last = Vec::new();
        if !late.is_empty() {
            last.push(sync);
        }
        if new.config != Config::Abort {
            last.push(Cmd::PrefetchConfig { sid, ssid: None });
        }
        if last.is_empty() {
            return Ok(());
        }
        self.issue(&last)
    }

    /// A new CD table for 2^`s1cdmax` SubstreamIDs.
    pub fn alloc_cd_table(&mut self, s1cdmax: u8) -> Result<CdTable, Error> {
        CdTable::new(s1cdmax, &self.caps.features, &self.mem, &mut self.alloc)
    }

    /// Gives a CD table back; no STE may point to it any more.
    pub fn free_cd_table(&mut self, table: CdTable) {
        table.free(&mut self.alloc);
    }

    /// Writes CD `ssid` of `table`, used by the streams `sids`, as
    /// `arm_smmu_write_ctx_desc`: a new CD gets words 1 to 7 first, CMD_CFGI_CD and
    /// CMD_SYNC, then word 0 with V; a live CD whose words 1 to 7 stay the same (a new
    /// ASID) gets word 0 alone; `None` clears word 0. Each ends with CMD_CFGI_CD for every
    /// stream and CMD_SYNC. A live CD replaced by a different one is cleared first. A CD
    /// the SMMU would find ILLEGAL is refused before anything is written.
    pub fn write_cd(
        &mut self,
        table: &mut CdTable,
        sids: &[u32],
        ssid: u32,
        cd: Option<&ContextDescriptor>,
    ) -> Result<(), Error> {
        let f = self.caps.features;
        let words = cd.map(ContextDescriptor::encode);
        if let Some(w) = &words {
            ContextDescriptor::decode(w, &f).map_err(Error::BadCd)?;
        }
        let (addr, made) = table.ensure_cd(ssid, &self.mem, &mut self.alloc)?;
        let sync: Vec<Cmd> = sids
            .iter()
            .map(|&sid| Cmd::CfgiCd {
                sid,
                ssid,
                leaf: !made,
            })
            .collect();
        if made {
            self.issue(&sync)?;
        }
        let old = read_words(&self.mem, addr)?;
        let live = old[0] & 1 != 0;
        match words {
            None => self.mem.write_u64(addr, 0)?,
            Some(w) if live && w[1..] == old[1..] => self.mem.write_u64(addr, w[0])?,
            Some(w) => {
                if live {
                    self.mem.write_u64(addr, 0)?;
                    self.issue(&sync)?;
                }
                write_words(&self.mem, addr + 8, &w[1..])?;
                self.issue(&sync)?;
                self.mem.write_u64(addr, w[0])?;
            }
        }
        self.issue(&sync)
    }

    /// CMD_TLBI_NH_ASID and CMD_SYNC (`arm_smmu_tlb_inv_asid`).
    pub fn tlbi_asid(&mut self, vmid: u16, asid: u16) -> Result<(), Error> {
        self.issue(&[Cmd::TlbiNhAsid { vmid, asid }])
    }

    /// CMD_TLBI_S12_VMALL and CMD_SYNC: every entry of a VMID (`arm_smmu_tlb_inv_context`
    /// of a stage-2 domain).
    pub fn tlbi_vmall(&mut self, vmid: u16) -> Result<(), Error> {
        self.issue(&[Cmd::TlbiS12Vmall { vmid }])
    }

    /// `arm_smmu_tlb_inv_range` without range invalidation: one CMD_TLBI_NH_VA or
    /// CMD_TLBI_S2_IPA per `granule` of `[iova, iova + size)`, then CMD_SYNC. `granule` is
    /// a power of two of at least 4 KiB.
    pub fn tlbi_range(
        &mut self,
        stage: TlbiStage,
        iova: u64,
        size: u64,
        granule: u64,
        leaf: bool,
    ) -> Result<(), Error> {
        if size == 0 {
            return Ok(());
        }
        let granule = granule.max(4096);
        let first = iova & !(granule - 1);
        let end = iova.saturating_add(size);
        let mut cmds = Vec::new();
        let mut a = first;
        while a < end {
            let addr = TlbiAddr {
                addr: a,
                leaf,
                ..TlbiAddr::default()
            };
            cmds.push(match stage {
                TlbiStage::Stage1 { vmid, asid } => Cmd::TlbiNhVa { vmid, asid, addr },
                TlbiStage::Stage2 { vmid } => Cmd::TlbiS2Ipa { vmid, addr },
            });
            let Some(next) = a.checked_add(granule) else {
                break;
            };
            a = next;
        }
        self.issue(&cmds)
    }

    /// CMD_ATC_INV for `[iova, iova + size)` of `sid` (and `ssid`) and CMD_SYNC; size 0
    /// invalidates the whole ATC (`arm_smmu_atc_inv_to_cmd`: the smallest naturally
    /// aligned power-of-two span of 4 KiB pages that covers the range).
    pub fn atc_inv(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        size: u64,
    ) -> Result<(), Error> {
        let (addr, span) = atc_span(iova, size);
        self.issue(&[Cmd::AtcInv {
            sid,
            ssid,
            global: false,
            addr,
            size: span,
        }])
    }

    /// CMD_PRI_RESP for page request group `prg_index` of `sid` (and `ssid`) and CMD_SYNC.
    pub fn pri_resp(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        prg_index: u16,
        resp: PriResp,
    ) -> Result<(), Error> {
        self.issue(&[Cmd::PriResp {
            sid,
            ssid,
            prg_index,
            resp,
        }])
    }

    /// Drains the event queue (`arm_smmu_evtq_thread`).
    pub fn read_events(&mut self) -> Result<Drained<Event>, Error> {
        self.evtq.drain(&self.regs, &self.mem, |raw: [u64; 4]| {
            Event::decode(raw).ok()
        })
    }

    /// Drains the PRI queue (`arm_smmu_priq_thread`); empty without PRI.
    pub fn read_page_requests(&mut self) -> Result<Drained<PriqEntry>, Error> {
        match &mut self.priq {
            None => Ok(Drained::default()),
            Some(q) => q.drain(&self.regs, &self.mem, |raw: [u64; 2]| {
                Some(PriqEntry::decode(raw))
            }),
        }
    }

    /// `arm_smmu_gerror_handler`: the active global errors (GERROR ^ GERRORN), each
    /// logged; a stopped command queue is recovered (`arm_smmu_cmdq_skip_err`); then all
    /// are acknowledged by writing GERROR to GERRORN. Returns the active bits and the
    /// command-queue error found.
    pub fn handle_gerror(&mut self) -> Result<(u32, Option<Error>), Error> {
        let g = self.regs.read32(offset::GERROR)?;
        let active = g ^ self.regs.read32(offset::GERRORN)?;
        if active == 0 {
            return Ok((0, None));
        }
        if active & gerror::SFM_ERR != 0 {
            tracing::error!("SMMU entered service failure mode");
        }
        tracing::warn!(active, "SMMU global errors");
        let cmdq = if active & gerror::CMDQ_ERR != 0 {
            self.cmdq.skip_err(&self.regs, &self.mem)?
        } else {
            None
        };
        self.regs.write(offset::GERRORN, 4, g as u64)?;
        Ok((active, cmdq))
    }

    /// The interrupt sources this SMMU has: GERROR and the event queue, and the PRI queue
    /// with PRI.
    pub fn irq_sources(&self) -> Vec<Irq> {
        let mut irqs = vec![Irq::Gerror, Irq::Eventq];
        if self.priq.is_some() {
            irqs.push(Irq::Priq);
        }
        irqs
    }

    /// `arm_smmu_setup_irqs` with message-signalled interrupts (`arm_smmu_setup_msis`):
    /// interrupts are disabled in IRQ_CTRL, each source's IRQ_CFG0/1/2 get the MSI address
    /// `doorbell`, the data `data(irq)` and Device-nGnRE attributes, then GERROR, the event
    /// queue and (with PRI) the PRI queue interrupts are enabled. Returns the IRQ_CTRL
    /// value written.
    pub fn enable_msis(&mut self, doorbell: u64, data: impl Fn(Irq) -> u32) -> Result<u32, Error> {
        use vsva_smmuv3::regs::irq_ctrl;
        write_irq_ctrl(&self.regs, 0)?;
        let mut enables = 0;
        for irq in self.irq_sources() {
            let (cfg0, enable) = match irq {
                Irq::Gerror => (offset::GERROR_IRQ_CFG0, irq_ctrl::GERROR_IRQEN),
                Irq::Eventq => (offset::EVENTQ_IRQ_CFG0, irq_ctrl::EVENTQ_IRQEN),
                Irq::Priq => (offset::PRIQ_IRQ_CFG0, irq_ctrl::PRIQ_IRQEN),
            };
            self.regs.write(cfg0, 8, doorbell)?;
            self.regs.write(cfg0 + 8, 4, data(irq) as u64)?;
            self.regs.write(cfg0 + 0xc, 4, MSI_MEMATTR_DEVICE_NGNRE)?;
            enables |= enable;
        }
        write_irq_ctrl(&self.regs, enables)?;
        Ok(enables)
    }

    /// Disables every interrupt in IRQ_CTRL and clears the MSI addresses, as
    /// `arm_smmu_setup_irqs` does first and `arm_smmu_device_disable` leaves it.
    pub fn disable_msis(&mut self) -> Result<(), Error> {
        write_irq_ctrl(&self.regs, 0)?;
        for cfg0 in [
            offset::GERROR_IRQ_CFG0,
            offset::EVENTQ_IRQ_CFG0,
            offset::PRIQ_IRQ_CFG0,
        ] {
            self.regs.write(cfg0, 8, 0)?;
        }
        Ok(())
    }

    /// Disables the SMMU (GBPA aborting, CR0 cleared) and gives every table and queue
    /// back; returns the allocator.
    pub fn shutdown(mut self) -> A {
        let regs = &self.regs;
        let _ = regs.write(offset::GBPA, 4, (GBPA_UPDATE | GBPA_ABORT) as u64);
        if let Err(e) = write_cr0(regs, 0) {
            tracing::error!(%e, "SMMU did not disable");
        }
        self.release();
        self.alloc
    }

    fn release(&mut self) {
        let strtab = std::mem::replace(&mut self.strtab, StreamTable::empty());
        strtab.free(&mut self.alloc);
        let q = self.cmdq.queue();
        self.alloc.free(q.base, 16 << q.log2size);
        let (b, l) = self.evtq.base();
        self.alloc.free(b, 32 << l);
        if let Some(p) = self.priq.take() {
            let (b, l) = p.base();
            self.alloc.free(b, 16 << l);
        }
    }
}

/// Whether an STE of `config` uses word `w`, which changes from `old` to `new`: word 1
/// holds the stage-1 fields (bits 7:0 and S1STALLD) and EATS, STRW and the overrides that
/// any translating configuration uses; words 2 and 3 hold stage 2; words 4 to 7 are RES0.
fn uses(config: Config, w: usize, old: u64, new: u64) -> bool {
    const S1_FIELDS: u64 = 0xff | 1 << 27;
    match w {
        1 => config.stage1() || (config.stage2() && (old ^ new) & !S1_FIELDS != 0),
        2 | 3 => config.stage2(),
        _ => false,
    }
}

/// The address and Size of a CMD_ATC_INV covering `[iova, iova + size)`.
pub(crate) fn atc_span(iova: u64, size: u64) -> (u64, u8) {
    if size == 0 {
        return (0, 52);
    }
    let start = iova >> 12;
    let end = iova.saturating_add(size - 1) >> 12;
    let log2_span = 64 - (start ^ end).leading_zeros();
    let mask = (1u64 << log2_span.min(63)) - 1;
    ((start & !mask) << 12, log2_span as u8)
}
