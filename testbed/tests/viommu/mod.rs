//! A minimal guest driver for the vIOMMU tests: it programs the vIOMMU through its
//! registers and tables in guest RAM as Linux's intel-iommu does in scalable mode, and a
//! host stand-in that records every call.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vsva_host::{pasid::PasidAllocator, pasid::PasidSetId};
use vsva_uapi::error::Errno;
use vsva_uapi::{request::BindGpasid, request::CacheInvalidate, request::PageResponse};
use vsva_vmm::{HostSva, PasidSource, VIommu, VIommuConfig};
use vsva_vtd::context::context_entry_addr;
use vsva_vtd::pasid::pasid_entry_addr;
use vsva_vtd::regs::layout::{gcmd, gsts, offset, pq, rtaddr, vcmd};
use vsva_vtd::regs::Interrupt;
use vsva_vtd::root::root_entry_addr;
use vsva_vtd::{
    addr::DomainId, addr::Gpa, addr::Pasid, addr::SourceId, builder::FrameSource,
    builder::MapFlags, builder::PageTableBuilder, builder::TableFormat,
    context::ScalableContextEntry, flpte::FlPagingMode, inv_desc::InvDesc, pasid::PasidDirEntry,
    pasid::PasidEntry, pasid::Pgtt, root::ScalableRootEntry, walk::PageSize,
};

/// Guest RAM size.
pub const RAM: u64 = 64 << 20;
/// Frames for tables and queues come from here up.
const FRAMES_START: u64 = 16 << 20;
/// Entries of the invalidation queue (one 4-KiB page of 256-bit descriptors).
const IQ_ENTRIES: u64 = 128;
/// Where the status word of the harness's invalidation waits lives.
pub const STATUS: u64 = 0x1000;

pub fn sid(bus: u8, dev: u8, func: u8) -> SourceId {
    SourceId::new(bus, dev, func).unwrap()
}

pub fn pasid(raw: u32) -> Pasid {
    Pasid::new(raw).unwrap()
}

/// A first-level PASID entry as Linux's `intel_pasid_setup_first_level` writes it.
pub fn fl_entry(did: u16, cr3: u64, mode: FlPagingMode) -> PasidEntry {
    PasidEntry {
        flpm: mode,
        nxe: true,
        flptptr: cr3,
        ..PasidEntry::new(Pgtt::FirstLevel, DomainId(did))
    }
}

/// The bind data the vIOMMU gives the host for a plain 4-level first-level entry of `p`
/// (guest PASID = host PASID) with its table at `cr3`.
pub fn bind(p: Pasid, cr3: u64) -> BindGpasid {
    BindGpasid {
        hpasid: p,
        gpasid: Some(p),
        gpgd: Gpa(cr3),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    }
}

/// What the host was asked, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Alloc(Pasid),
    Free(Pasid),
    Bind(BindGpasid),
    Unbind(BindGpasid),
    Invalidate(CacheInvalidate),
    Response(SourceId, PageResponse),
}

/// A host that grants everything (unless told to refuse binds) and records each call with
/// the guest's status word as it was when the call came.
#[derive(Default)]
pub struct MockHost {
    calls: Mutex<Vec<(Call, u32)>>,
    next: AtomicU32,
    pub refuse_bind: AtomicBool,
    watch: Mutex<Option<Arc<GuestMemoryMmap>>>,
}

impl MockHost {
    pub fn new() -> Arc<Self> {
        Arc::new(MockHost {
            next: AtomicU32::new(100),
            ..Default::default()
        })
    }

    /// The PASID the next allocation hands out (and those after it, counting up).
    pub fn next_pasid(&self, p: u32) {
        self.next.store(p, Ordering::Relaxed);
    }

    /// Watch the harness's status word in `mem`.
    pub fn watch(&self, mem: Arc<GuestMemoryMmap>) {
        *self.watch.lock().unwrap() = Some(mem);
    }

    fn record(&self, call: Call) {
        let status = self
            .watch
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |m| m.read_u64(STATUS).unwrap() as u32);
        self.calls.lock().unwrap().push((call, status));
    }

    /// The calls so far; empties the record.
    pub fn take(&self) -> Vec<Call> {
        self.take_with_status()
            .into_iter()
            .map(|(c, _)| c)
            .collect()
    }

    /// The calls so far with the status word seen at each; empties the record.
    pub fn take_with_status(&self) -> Vec<(Call, u32)> {
        std::mem::take(&mut self.calls.lock().unwrap())
    }
}

impl PasidSource for MockHost {
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, Errno> {
        let p = self.next.fetch_add(1, Ordering::Relaxed);
        if p < min || p > max {
            return Err(Errno::ENOSPC);
        }
        self.record(Call::Alloc(pasid(p)));
        Ok(pasid(p))
    }

    fn pasid_free(&self, p: Pasid) -> Result<(), Errno> {
        self.record(Call::Free(p));
        Ok(())
    }
}

impl HostSva for MockHost {
    fn bind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        if self.refuse_bind.load(Ordering::Relaxed) {
            return Err(Errno::EINVAL);
        }
        self.record(Call::Bind(*bind));
        Ok(())
    }

    fn unbind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        self.record(Call::Unbind(*bind));
        Ok(())
    }

    fn cache_invalidate(&self, inv: &CacheInvalidate) -> Result<(), Errno> {
        self.record(Call::Invalidate(*inv));
        Ok(())
    }

    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), Errno> {
        self.record(Call::Response(host_sid, *resp));
        Ok(())
    }
}

/// PASIDs for a VM without a VFIO container (emulated devices only): a private PASID
/// space with one set, from the host's allocator.
#[derive(Debug)]
pub struct LocalPasids {
    allocator: Mutex<PasidAllocator>,
    set: PasidSetId,
}

impl LocalPasids {
    /// A PASID space of which the VM may hold `quota` PASIDs at a time.
    pub fn new(quota: u32) -> Self {
        let mut allocator = PasidAllocator::new();
        let set = allocator.create_set(quota).unwrap();
        LocalPasids {
            allocator: Mutex::new(allocator),
            set,
        }
    }
}

impl PasidSource for LocalPasids {
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, Errno> {
        let mut a = self.allocator.lock().unwrap();
        a.alloc(self.set, min, max).map_err(|e| Errno::from(&e))
    }

    fn pasid_free(&self, pasid: Pasid) -> Result<(), Errno> {
        let mut a = self.allocator.lock().unwrap();
        a.free(self.set, pasid).map_err(|e| Errno::from(&e))
    }
}

/// Called with the address of each 8-byte word the vIOMMU reads, after the read.
pub type ReadHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Guest RAM as the vIOMMU sees it: counts the vIOMMU's reads of 8-byte words in a
/// watched range, and lets a test act on each word read (to hold a walk between two reads).
pub struct CountingRam {
    mem: Arc<GuestMemoryMmap>,
    watched: Mutex<std::ops::Range<u64>>,
    reads: AtomicU64,
    hook: Mutex<Option<ReadHook>>,
}

impl CountingRam {
    /// Counts from now on the reads in `range` only; returns the count so far and resets it.
    pub fn watch(&self, range: std::ops::Range<u64>) -> u64 {
        *self.watched.lock().unwrap() = range;
        self.reads.swap(0, Ordering::Relaxed)
    }

    /// Calls `hook` after each word the vIOMMU reads from now on.
    pub fn on_read(&self, hook: ReadHook) {
        *self.hook.lock().unwrap() = Some(hook);
    }

    /// The words read in the watched range since the last `watch` or `reads`; resets it.
    pub fn reads(&self) -> u64 {
        self.reads.swap(0, Ordering::Relaxed)
    }

    fn count(&self, addr: u64, len: usize) {
        let w = self.watched.lock().unwrap().clone();
        let (start, end) = (addr.max(w.start), (addr + len as u64).min(w.end));
        if start < end {
            self.reads
                .fetch_add((end - start).div_ceil(8), Ordering::Relaxed);
        }
    }
}

impl PhysMem for CountingRam {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.count(addr, 8);
        let value = self.mem.read_u64(addr);
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(addr);
        }
        value
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.mem.fetch_or_u64(addr, bits)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        self.mem.compare_exchange_u64(addr, old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.mem.write_u64(addr, value)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.count(addr, buf.len());
        self.mem.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.mem.write(addr, buf)
    }
}

/// A guest with RAM, a vIOMMU and a driver for it.
pub struct Guest {
    pub mem: Arc<GuestMemoryMmap>,
    /// The same RAM as the vIOMMU reads it.
    pub ram: Arc<CountingRam>,
    pub viommu: Arc<VIommu>,
    pub irqs: Arc<Mutex<Vec<Interrupt>>>,
    next_frame: Mutex<u64>,
    root: u64,
    /// Context tables by bus and half (devfn >= 128).
    contexts: Mutex<BTreeMap<(u8, bool), u64>>,
    /// PASID directories by requester id.
    dirs: Mutex<BTreeMap<u16, u64>>,
    iq: u64,
    iq_tail: Mutex<u64>,
}

impl Guest {
    pub fn new(pasids: Arc<dyn PasidSource>) -> Self {
        Self::with_config(pasids, VIommuConfig::default())
    }

    pub fn with_config(pasids: Arc<dyn PasidSource>, config: VIommuConfig) -> Self {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
        Self::with_memory(mem, pasids, config)
    }

    /// A guest whose RAM (`RAM` bytes from GPA 0) is `mem`, for example a window of host
    /// memory a passthrough device reaches.
    pub fn with_memory(
        mem: Arc<GuestMemoryMmap>,
        pasids: Arc<dyn PasidSource>,
        config: VIommuConfig,
    ) -> Self {
        let ram = Arc::new(CountingRam {
            mem: mem.clone(),
            watched: Mutex::new(0..0),
            reads: AtomicU64::new(0),
            hook: Mutex::default(),
        });
        let viommu = VIommu::new(ram.clone(), config, pasids).unwrap();
        let irqs = Arc::new(Mutex::new(Vec::new()));
        let sink = irqs.clone();
        viommu.set_interrupt_handler(Arc::new(move |i| sink.lock().unwrap().push(i)));
        let mut g = Guest {
            mem,
            ram,
            viommu,
            irqs,
            next_frame: Mutex::new(FRAMES_START),
            root: 0,
            contexts: Mutex::default(),
            dirs: Mutex::default(),
            iq: 0,
            iq_tail: Mutex::new(0),
        };
        g.root = g.alloc_frame();
        g.iq = g.alloc_frame();
        g
    }

    /// A zeroed frame.
    pub fn alloc_frame(&self) -> u64 {
        let mut next = self.next_frame.lock().unwrap();
        let f = *next;
        *next += 4096;
        assert!(*next <= RAM, "test guest out of frames");
        f
    }

    pub fn read(&self, off: u64, size: usize) -> u64 {
        self.viommu.read(off, size).unwrap()
    }

    pub fn write(&self, off: u64, size: usize, value: u64) {
        self.viommu.write(off, size, value).unwrap()
    }

    /// A global command with the enables kept as they are, as Linux writes GCMD.
    pub fn gcmd(&self, cmd: u32) {
        let keep = self.read(offset::GSTS, 4) as u32 & (gsts::TES | gsts::QIES);
        self.write(offset::GCMD, 4, (keep | cmd) as u64);
    }

    /// Queued invalidation with 256-bit descriptors, a scalable-mode root table, translation
    /// enabled: the order of Linux's `init_dmars`.
    pub fn enable(&self) {
        self.write(offset::IQA, 8, self.iq | 1 << 11);
        self.write(offset::IQT, 8, 0);
        self.gcmd(gcmd::QIE);
        self.write(offset::RTADDR, 8, self.root | 1 << rtaddr::TTM_SHIFT);
        self.gcmd(gcmd::SRTP);
        self.gcmd(gcmd::TE);
        assert_eq!(
            self.read(offset::GSTS, 4) as u32 & (gsts::TES | gsts::QIES | gsts::RTPS),
            gsts::TES | gsts::QIES | gsts::RTPS
        );
    }

    /// The page request queue: one page, interrupts unmasked.
    pub fn enable_prq(&self) -> u64 {
        let q = self.alloc_frame();
        self.write(offset::PQH, 8, 0);
        self.write(offset::PQT, 8, 0);
        self.write(offset::PQA, 8, q);
        self.write(offset::PECTL, 4, 0);
        q
    }

    fn context_table(&self, s: SourceId) -> u64 {
        let upper = s.devfn() >= 128;
        let mut contexts = self.contexts.lock().unwrap();
        if let Some(&t) = contexts.get(&(s.bus(), upper)) {
            return t;
        }
        let t = self.alloc_frame();
        contexts.insert((s.bus(), upper), t);
        let lower = contexts.get(&(s.bus(), false)).copied();
        let upper = contexts.get(&(s.bus(), true)).copied();
        let raw = ScalableRootEntry {
            lctp: lower,
            uctp: upper,
        }
        .to_raw();
        let at = root_entry_addr(self.root, s.bus());
        self.mem.write_u64(at, raw[0]).unwrap();
        self.mem.write_u64(at + 8, raw[1]).unwrap();
        t
    }

    /// A scalable-mode context entry for `s` with a 128-entry PASID directory.
    pub fn attach(&self, s: SourceId, pre: bool) {
        let dir = self.alloc_frame();
        self.dirs.lock().unwrap().insert(s.rid(), dir);
        let entry = ScalableContextEntry {
            fpd: false,
            dte: true,
            paside: true,
            pre,
            pdts: 0,
            pasiddirptr: dir,
            rid_pasid: Pasid::RID_PASID,
            rid_priv: false,
        };
        self.write_context(s, Some(entry));
    }

    /// Writes (or clears) the context entry of `s`.
    pub fn write_context(&self, s: SourceId, entry: Option<ScalableContextEntry>) {
        let at = context_entry_addr(self.context_table(s), s.devfn());
        let raw = entry.map_or([0; 4], |e| e.to_raw());
        for (i, q) in raw.iter().enumerate().rev() {
            self.mem.write_u64(at + 8 * i as u64, *q).unwrap();
        }
    }

    /// The address of the PASID entry of `p` on `s`, creating its PASID table.
    pub fn pasid_slot(&self, s: SourceId, p: Pasid) -> u64 {
        let dir = self.dirs.lock().unwrap()[&s.rid()];
        let pde_at = dir + p.dir_index() as u64 * 8;
        let raw = self.mem.read_u64(pde_at).unwrap();
        let table = match PasidDirEntry::from_raw(raw) {
            Ok(pde) => pde.smptblptr,
            Err(_) => {
                let t = self.alloc_frame();
                let pde = PasidDirEntry {
                    fpd: false,
                    smptblptr: t,
                };
                self.mem.write_u64(pde_at, pde.to_raw()).unwrap();
                t
            }
        };
        pasid_entry_addr(table, p)
    }

    /// Writes (present qword last) or clears the PASID entry of `p` on `s`.
    pub fn set_pasid_entry(&self, s: SourceId, p: Pasid, entry: Option<PasidEntry>) {
        let at = self.pasid_slot(s, p);
        let raw = entry.map_or([0; 8], |e| e.to_raw());
        for (i, q) in raw.iter().enumerate().rev() {
            self.mem.write_u64(at + 8 * i as u64, *q).unwrap();
        }
    }

    /// Queues descriptors and rings the tail.
    pub fn submit(&self, descs: &[InvDesc]) {
        let mut tail = self.iq_tail.lock().unwrap();
        for d in descs {
            let raw = d.encode().unwrap();
            for (i, q) in raw.iter().enumerate() {
                self.mem
                    .write_u64(self.iq + *tail * 32 + 8 * i as u64, *q)
                    .unwrap();
            }
            *tail = (*tail + 1) % IQ_ENTRIES;
        }
        self.viommu.write(offset::IQT, 8, *tail * 32).unwrap();
    }

    /// `qi_submit_sync`: the descriptors, then an invalidation wait with a status write;
    /// returns whether the status was written by the time the tail write returned.
    pub fn submit_sync(&self, descs: &[InvDesc]) -> bool {
        self.mem.write_u64(STATUS, 0).unwrap();
        let mut all = descs.to_vec();
        all.push(InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: true,
            pd: false,
            status_data: 1,
            status_addr: STATUS,
        });
        self.submit(&all);
        self.mem.read_u64(STATUS).unwrap() as u32 == 1
    }

    /// A virtual command; returns VCRSP.
    pub fn vcmd(&self, cmd: u64) -> u64 {
        self.write(offset::VCMD, 8, cmd);
        self.read(offset::VCRSP, 8)
    }

    /// `vcmd_alloc_pasid`.
    pub fn alloc_pasid(&self) -> Pasid {
        let rsp = self.vcmd(vcmd::ALLOC_PASID as u64);
        assert_eq!(rsp & (vcmd::VCRSP_IP | 6), 0, "VCRSP {rsp:#x}");
        pasid((rsp >> vcmd::VCRSP_RESULT_SHIFT) as u32)
    }

    /// A 4-level first-level table (a process's page tables).
    pub fn page_table(&self) -> PageTableBuilder {
        PageTableBuilder::new(
            TableFormat::FirstLevel(FlPagingMode::FourLevel),
            &*self.mem,
            &mut Frames(self),
        )
        .unwrap()
    }

    /// Maps a user read/write 4-KiB page.
    pub fn map(&self, pt: &mut PageTableBuilder, va: u64, pa: u64) {
        pt.map(
            &*self.mem,
            &mut Frames(self),
            va,
            pa,
            PageSize::Size4K,
            MapFlags::READ | MapFlags::WRITE | MapFlags::USER,
        )
        .unwrap();
    }

    /// The interrupts delivered so far; empties the record.
    pub fn take_irqs(&self) -> Vec<Interrupt> {
        std::mem::take(&mut self.irqs.lock().unwrap())
    }

    /// The page request descriptor at index `i` of the queue at `q`.
    pub fn page_request(&self, q: u64, i: u64) -> [u64; 4] {
        let at = q + i * pq::DESC_SIZE;
        [0, 1, 2, 3].map(|w| self.mem.read_u64(at + 8 * w).unwrap())
    }
}

/// Guest frames for the page-table builder.
pub struct Frames<'a>(pub &'a Guest);

impl FrameSource for Frames<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        Some(self.0.alloc_frame())
    }

    fn free_table(&mut self, _frame: u64) {}
}
