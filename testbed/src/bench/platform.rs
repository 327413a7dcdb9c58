//! A machine to measure on: host memory, the VT-d model programmed through its registers
//! as a host driver programs it, and one guest address space reached by nested
//! translation.
//!
//! Every device (requester ids 0 to `devices - 1` on bus 0) has a scalable-mode context
//! entry, its own PASID directory and table, and its own domain ([`Platform::domain`]), so
//! that no cache tagged by domain id (IOTLB, paging-structure caches) is shared between
//! devices. Each device's PASID table holds two entries:
//! - PASID 0, the RID_PASID of requests without PASID: second level only, over the guest
//!   RAM window (GPA → HPA);
//! - [`NESTED_PASID`]: a guest process's first-level table (GVA → GPA, itself in guest
//!   RAM) nested over the same second level (VT-d §3.8).
//!
//! All devices share the page tables. The guest buffer is mapped at GVA [`GVA_BASE`] and
//! at GPA [`BUFFER_GPA`]. Both levels are 4-level tables of 4 KiB pages, so a nested walk
//! reads 24 entries (§3.8: 4 first-level entries, each located through a 4-level
//! second-level walk, plus the walk of the final GPA). Invalidations go through the
//! invalidation queue (§6.5.2) with a wait descriptor.

use std::sync::{Arc, Mutex};
use vsva_mem::MemError;
use vsva_mem::MemWindow;
use vsva_mem::PhysMem;

use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_vtd::regs::layout::{gcmd, gsts, iq, offset, rtaddr};
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, builder::FrameSource, builder::MapFlags,
    builder::PageTableBuilder, builder::TableFormat, context, context::ScalableContextEntry,
    flpte::FlFormat, flpte::FlPagingMode, inv_desc::InvDesc, pasid, pasid::PasidDirEntry,
    pasid::PasidEntry, pasid::Pgtt, root, root::ScalableRootEntry, slpte::SlFormat,
    slpte::SlLevels, walk::FlConfig, walk::PageSize, walk::SlConfig,
};

use super::BenchError;

/// The domain of device 0; device `i` has domain `FIRST_DOMAIN + i`.
pub const FIRST_DOMAIN: u16 = 1;
/// The PASID with nested translation.
pub const NESTED_PASID: u32 = 1;
/// Where the guest buffer starts in the guest process's address space.
pub const GVA_BASE: u64 = 0x7f3a_5c00_0000;
/// Where the guest buffer starts in guest physical memory.
pub const BUFFER_GPA: u64 = 0x10_0000;
/// The host address width of the model.
const HAW: u8 = 48;
/// Bytes of one 256-bit invalidation descriptor.
const DESC_BYTES: u64 = 32;
/// The invalidation queue: one 4 KiB page (IQA.QS = 0).
const QUEUE_BYTES: u64 = PAGE_SIZE;

/// What to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Devices with a context entry (1 to 128; all in the lower context table).
    pub devices: u8,
    /// Bytes of guest buffer (a multiple of 4 KiB).
    pub buffer: u64,
}

/// Guest physical memory: a window of host memory at the guest's base.
type GuestRam<'a> = MemWindow<&'a HostMemory>;

/// Guest page-table frames: consecutive GPAs from the table region of guest RAM. The
/// platform never tears its tables down, so nothing is reused.
struct GpaFrames {
    next: u64,
    end: u64,
}

impl FrameSource for GpaFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = self.next;
        (frame + PAGE_SIZE <= self.end).then(|| {
            self.next += PAGE_SIZE;
            frame
        })
    }

    fn free_table(&mut self, _frame: u64) {}
}

/// The invalidation queue as the driver keeps it: where the next descriptor goes and the
/// status word of wait descriptors.
struct InvQueue {
    base: u64,
    tail: u64,
    status: u64,
    seq: u32,
}

/// The machine.
pub struct Platform {
    frames: FrameAllocator,
    iommu: Arc<Iommu>,
    queue: Mutex<InvQueue>,
    guest_base: u64,
    buffer: u64,
    devices: u8,
    fl_root: u64,
    sl_root: u64,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("iommu", &self.iommu)
            .field("devices", &self.devices)
            .field("buffer", &self.buffer)
            .finish_non_exhaustive()
    }
}

fn write_qwords(mem: &HostMemory, addr: u64, qwords: &[u64]) -> Result<(), MemError> {
    qwords
        .iter()
        .enumerate()
        .try_for_each(|(i, q)| mem.write_u64(addr + 8 * i as u64, *q))
}

impl Platform {
    /// Builds the tables, programs the IOMMU (root table, queued invalidation, translation
    /// enable) and empties its caches.
    pub fn new(config: PlatformConfig) -> Result<Self, BenchError> {
        if config.devices == 0 || config.devices > 128 {
            return Err(BenchError::Check(format!(
                "{} devices: the platform has 1 to 128",
                config.devices
            )));
        }
        if config.buffer == 0 || config.buffer % PAGE_SIZE != 0 {
            return Err(BenchError::Check(format!(
                "guest buffer of {:#x} bytes is not a multiple of 4 KiB",
                config.buffer
            )));
        }
        // Guest RAM: the buffer, then room for the first-level tables.
        let fl_tables = (config.buffer / (2 << 20) + 8) * PAGE_SIZE;
        let ram = BUFFER_GPA + config.buffer + fl_tables;
        let sl_tables = (ram / (2 << 20) + 8) * PAGE_SIZE;
        // Slack for aligning guest RAM to 2 MiB and for the root, context, PASID directory
        // and PASID tables (two frames per device) and the invalidation queue.
        let host = (ram + sl_tables + (8 << 20)).next_multiple_of(2 << 20);
        let mem = HostMemory::new(host)?;
        let frames = FrameAllocator::new(mem.clone());
        let guest_base = frames.alloc_range(ram, 2 << 20)?.0;
        let guest: GuestRam = MemWindow::new(&mem, guest_base, ram);

        let mut host_frames = &frames;
        let mut sl = PageTableBuilder::new(
            TableFormat::SecondLevel(SlLevels::Four),
            &*mem,
            &mut host_frames,
        )?;
        for gpa in (0..ram).step_by(PAGE_SIZE as usize) {
            sl.map(
                &*mem,
                &mut host_frames,
                gpa,
                guest_base + gpa,
                PageSize::Size4K,
                MapFlags::READ | MapFlags::WRITE,
            )?;
        }
        let mut gpa_frames = GpaFrames {
            next: BUFFER_GPA + config.buffer,
            end: ram,
        };
        let mut fl = PageTableBuilder::new(
            TableFormat::FirstLevel(FlPagingMode::FourLevel),
            &guest,
            &mut gpa_frames,
        )?;
        for off in (0..config.buffer).step_by(PAGE_SIZE as usize) {
            fl.map(
                &guest,
                &mut gpa_frames,
                GVA_BASE + off,
                BUFFER_GPA + off,
                PageSize::Size4K,
                MapFlags::READ | MapFlags::WRITE | MapFlags::USER,
            )?;
        }

        let root_table = frames.alloc_frame()?.0;
        let context_table = frames.alloc_frame()?.0;
        let nested = Pasid::new(NESTED_PASID).map_err(|e| BenchError::Check(e.to_string()))?;
        let root_entry = ScalableRootEntry {
            lctp: Some(context_table),
            uctp: None,
        };
        write_qwords(
            &mem,
            root::root_entry_addr(root_table, 0),
            &root_entry.to_raw(),
        )?;
        for devfn in 0..config.devices {
            let pasid_dir = frames.alloc_frame()?.0;
            let pasid_table = frames.alloc_frame()?.0;
            let ctx = ScalableContextEntry {
                fpd: false,
                dte: false,
                paside: true,
                pre: false,
                pdts: 0,
                pasiddirptr: pasid_dir,
                rid_pasid: Pasid::RID_PASID,
                rid_priv: false,
            };
            write_qwords(
                &mem,
                context::context_entry_addr(context_table, devfn),
                &ctx.to_raw(),
            )?;
            let dir_entry = PasidDirEntry {
                fpd: false,
                smptblptr: pasid_table,
            }
            .to_raw();
            for p in [Pasid::RID_PASID, nested] {
                let at = pasid::pasid_dir_entry_addr(pasid_dir, 0, p)
                    .map_err(|r| BenchError::Check(r.to_string()))?;
                mem.write_u64(at, dir_entry)?;
            }
            let did = DomainId(FIRST_DOMAIN + u16::from(devfn));
            let second_level = pasid_entry(did, Pgtt::SecondLevel, sl.root(), 0);
            let nested_entry = pasid_entry(did, Pgtt::Nested, sl.root(), fl.root());
            write_qwords(
                &mem,
                pasid::pasid_entry_addr(pasid_table, Pasid::RID_PASID),
                &second_level.to_raw(),
            )?;
            write_qwords(
                &mem,
                pasid::pasid_entry_addr(pasid_table, nested),
                &nested_entry.to_raw(),
            )?;
        }

        let queue_base = frames.alloc_frame()?.0;
        let status = frames.alloc_frame()?.0;
        let iommu = Iommu::new(mem.clone(), IommuConfig::default())?;
        iommu.mmio_write(offset::RTADDR, 8, root_table | 1 << rtaddr::TTM_SHIFT)?;
        iommu.mmio_write(offset::GCMD, 4, u64::from(gcmd::SRTP))?;
        iommu.mmio_write(offset::IQA, 8, queue_base | iq::IQA_DW)?;
        iommu.mmio_write(offset::GCMD, 4, u64::from(gcmd::QIE))?;
        iommu.mmio_write(offset::GCMD, 4, u64::from(gcmd::QIE | gcmd::TE))?;
        let status_reg = iommu.mmio_read(offset::GSTS, 4)? as u32;
        let want = gsts::TES | gsts::QIES | gsts::RTPS;
        if status_reg & want != want {
            return Err(BenchError::Check(format!(
                "GSTS {status_reg:#x} after enabling translation and queued invalidation"
            )));
        }
        let fl_root = fl.root();
        let sl_root = sl.root();
        let platform = Platform {
            frames,
            iommu,
            queue: Mutex::new(InvQueue {
                base: queue_base,
                tail: 0,
                status,
                seq: 0,
            }),
            guest_base,
            buffer: config.buffer,
            devices: config.devices,
            fl_root,
            sl_root,
        };
        platform.invalidate_all()?;
        Ok(platform)
    }

    /// The IOMMU.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.iommu
    }

    /// Host memory.
    pub fn memory(&self) -> &Arc<HostMemory> {
        self.frames.memory()
    }

    /// Device `i` (0 to `devices - 1`).
    pub fn device(&self, i: u8) -> SourceId {
        SourceId::from_rid(u16::from(i))
    }

    /// The domain of device `i`.
    pub fn domain(&self, i: u8) -> DomainId {
        DomainId(FIRST_DOMAIN + u16::from(i))
    }

    /// Number of devices.
    pub fn devices(&self) -> u8 {
        self.devices
    }

    /// The PASID whose entry nests the guest's first level over the second level.
    pub fn nested_pasid(&self) -> Pasid {
        Pasid::new(NESTED_PASID).unwrap_or(Pasid::MAX)
    }

    /// Bytes of guest buffer.
    pub fn buffer_len(&self) -> u64 {
        self.buffer
    }

    /// The GVA of byte `off` of the guest buffer.
    pub fn gva(&self, off: u64) -> u64 {
        GVA_BASE + off
    }

    /// The GPA of byte `off` of the guest buffer.
    pub fn gpa(&self, off: u64) -> u64 {
        BUFFER_GPA + off
    }

    /// The HPA of byte `off` of the guest buffer.
    pub fn hpa(&self, off: u64) -> u64 {
        self.guest_base + BUFFER_GPA + off
    }

    /// The nested PASID entry's first-level configuration (FLPTPTR is a GPA).
    pub fn fl_config(&self) -> Result<FlConfig, BenchError> {
        Ok(FlConfig {
            root: self.fl_root,
            mode: FlPagingMode::FourLevel,
            sre: false,
            wpe: false,
            eafe: false,
            format: FlFormat::new(HAW, true).map_err(|e| BenchError::Check(e.to_string()))?,
        })
    }

    /// The second-level configuration of both PASID entries.
    pub fn sl_config(&self) -> Result<SlConfig, BenchError> {
        Ok(SlConfig {
            root: self.sl_root,
            levels: SlLevels::Four,
            slee: false,
            slade: false,
            format: SlFormat::new(HAW).map_err(|e| BenchError::Check(e.to_string()))?,
        })
    }

    /// Submits `descs` and a wait descriptor to the invalidation queue and checks that the
    /// wait completed (the model processes the queue when the tail register is written).
    pub fn invalidate(&self, descs: &[InvDesc]) -> Result<(), BenchError> {
        if descs.len() as u64 + 1 >= QUEUE_BYTES / DESC_BYTES {
            return Err(BenchError::Check(format!(
                "{} descriptors do not fit the invalidation queue",
                descs.len()
            )));
        }
        let mem = self.memory();
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.seq = q.seq.wrapping_add(1);
        let wait = InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: true,
            pd: false,
            status_data: q.seq,
            status_addr: q.status,
        };
        for d in descs.iter().chain([&wait]) {
            write_qwords(mem, q.base + q.tail, &d.encode()?)?;
            q.tail = (q.tail + DESC_BYTES) % QUEUE_BYTES;
        }
        self.iommu.mmio_write(offset::IQT, 8, q.tail)?;
        let done = mem.read_u64(q.status)? as u32;
        if done != q.seq {
            return Err(BenchError::Check(format!(
                "invalidation wait {} not completed (status {done})",
                q.seq
            )));
        }
        Ok(())
    }

    /// Global context-cache, PASID-cache and IOTLB invalidation: every IOMMU cache empty.
    pub fn invalidate_all(&self) -> Result<(), BenchError> {
        self.invalidate(&InvDesc::global_flush(true, true))
    }
}

/// A PASID entry of domain `did` with 4-level tables.
fn pasid_entry(did: DomainId, pgtt: Pgtt, slptptr: u64, flptptr: u64) -> PasidEntry {
    PasidEntry {
        slptptr,
        nxe: true,
        flptptr,
        ..PasidEntry::new(pgtt, did)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_hw::iommu::Source;
    use vsva_vtd::inv_desc::{IotlbGranularity, PasidCacheGranularity};
    use vsva_vtd::walk::AccessRequest;

    fn small() -> Platform {
        Platform::new(PlatformConfig {
            devices: 4,
            buffer: 64 * PAGE_SIZE,
        })
        .unwrap()
    }

    #[test]
    fn nested_and_second_level_translate_to_the_buffer() {
        let p = small();
        let iommu = p.iommu();
        for off in [0, 0x1234, 63 * PAGE_SIZE + 8] {
            let m = iommu
                .translate(
                    p.device(1),
                    Some(p.nested_pasid()),
                    p.gva(off),
                    AccessRequest::READ,
                )
                .unwrap();
            assert_eq!(m.hpa, p.hpa(off));
            let m = iommu
                .translate(p.device(2), None, p.gpa(off), AccessRequest::WRITE)
                .unwrap();
            assert_eq!(m.hpa, p.hpa(off));
        }
        assert!(iommu
            .translate(
                p.device(1),
                Some(p.nested_pasid()),
                p.gva(64 * PAGE_SIZE),
                AccessRequest::READ
            )
            .is_err());
    }

    #[test]
    fn invalidate_all_empties_every_cache() {
        let p = small();
        let (dev, pasid, gva) = (p.device(0), Some(p.nested_pasid()), p.gva(0));
        let read = AccessRequest::READ;
        assert_eq!(
            p.iommu().translate(dev, pasid, gva, read).unwrap().source,
            Source::Walk
        );
        assert_eq!(
            p.iommu().translate(dev, pasid, gva, read).unwrap().source,
            Source::Iotlb
        );
        p.invalidate_all().unwrap();
        assert_eq!(p.iommu().cached_entries(), (0, 0));
        assert!(p.iommu().iotlb().is_empty());
        assert_eq!(
            p.iommu().translate(dev, pasid, gva, read).unwrap().source,
            Source::Walk
        );
    }

    #[test]
    fn devices_have_their_own_domains() {
        let p = small();
        let pasid = Some(p.nested_pasid());
        for d in [2, 3] {
            p.iommu()
                .translate(p.device(d), pasid, p.gva(0), AccessRequest::READ)
                .unwrap();
        }
        p.invalidate(&[InvDesc::Iotlb {
            granularity: IotlbGranularity::DomainSelective,
            dr: false,
            dw: false,
            did: p.domain(3),
            addr: 0,
            ih: false,
            am: 0,
        }])
        .unwrap();
        let source = |d| {
            p.iommu()
                .translate(p.device(d), pasid, p.gva(0), AccessRequest::READ)
                .unwrap()
                .source
        };
        assert_eq!(source(2), Source::Iotlb);
        assert_eq!(source(3), Source::Walk);
    }

    #[test]
    fn the_queue_wraps_around() {
        let p = small();
        for _ in 0..200 {
            p.invalidate_all().unwrap();
        }
    }

    #[test]
    fn bad_configurations_are_refused() {
        for (devices, buffer) in [(0, PAGE_SIZE), (129, PAGE_SIZE), (1, 100), (1, 0)] {
            assert!(Platform::new(PlatformConfig { devices, buffer }).is_err());
        }
    }

    #[test]
    fn an_overlong_invalidation_batch_is_refused() {
        let p = small();
        let desc = InvDesc::PasidCache {
            granularity: PasidCacheGranularity::Global,
            did: DomainId(0),
            pasid: Pasid::RID_PASID,
        };
        assert!(p.invalidate(&[desc; 127]).is_err());
        p.invalidate(&[desc; 126]).unwrap();
    }
}
