//! `vsva run migrate-dirty`: the dirty-page tracking of a live migration of a VM with
//! passthrough devices. The VMM turns dirty tracking on in the domain that maps the VM's
//! RAM, copies all of RAM once, and then, while the devices keep writing, harvests the
//! dirty bitmap in rounds and copies only the pages it reports; after the devices stop, a
//! last harvest and copy finish the target's RAM.
//!
//! The devices' DMA goes through the physical IOMMU model: on VT-d it sets D in the
//! second-level leaves (SLADE); on SMMUv3 (`--iommu smmuv3`) the HWPT is a stage-1 domain
//! whose CD has HA and HD, and the SMMU clears `AP[2]` in the writable-clean (DBM) leaves
//! it writes through. The VMM drives it through iommufd, as QEMU's VFIO
//! migration does: an IOAS mapping guest RAM, a paging HWPT allocated with
//! `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` that the devices' cdevs attach to,
//! `IOMMU_HWPT_SET_DIRTY_TRACKING`, and `IOMMU_HWPT_GET_DIRTY_BITMAP` into a bitmap in its
//! own memory (the seed's VFIO type1 uAPI has no hardware dirty tracking). The checks: each
//! round's bitmap is exactly the pages the devices wrote in that round (their data
//! writes and completion records, not the pages they only read), so every written page
//! is reported and none that no one wrote; and the target's RAM, built from the copies,
//! equals the source's byte for byte.
//!
//! Guest RAM is mapped in 1 MiB pieces so the second level uses 4 KiB pages: with 2 MiB
//! pages the bitmap would report whole 2 MiB blocks (as it does on a host with huge
//! pages), and "none that no one wrote" would not hold at 4 KiB.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;
use vsva_mem::PhysMem;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::smmu::SmmuHost;
use vsva_hw::dma::regs::CTRL_ATS_EN;
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    DmaPort, Operation,
};
use vsva_hw::memory::{FrameAllocator, HostMemory, PAGE_SIZE};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, file::UapiFile};
use vsva_vtd::{addr::Gpa, addr::SourceId};

use crate::scenario::Outcome;
use crate::stack::{Host, StackError};

/// What the scenario runs.
#[derive(Clone, Copy, Debug)]
pub struct MigrateConfig {
    /// Guest RAM in bytes (a multiple of 1 MiB).
    pub ram: u64,
    /// Passthrough devices, all in the VM's domain.
    pub devices: u8,
    /// Rounds of device work, each followed by a harvest.
    pub rounds: usize,
    /// Descriptors each device runs per round.
    pub ops_per_round: usize,
    /// Seed of the devices' random work.
    pub seed: u64,
}

impl MigrateConfig {
    /// The scenario `vsva run migrate-dirty` runs.
    pub const RUN: MigrateConfig = MigrateConfig {
        ram: 16 << 20,
        devices: 2,
        rounds: 6,
        ops_per_round: 24,
        seed: 0x5eed,
    };
}

/// The host IOMMU the VMM's iommufd and the devices are on.
pub trait DirtyHost {
    /// Host physical memory.
    fn memory(&self) -> &Arc<HostMemory>;
    /// Host frames for the VM's RAM and the VMM's bitmap.
    fn frames(&self) -> &Arc<FrameAllocator>;
    /// `/dev/iommu` on the IOMMU, in `fds`.
    fn open(&self, fds: &Arc<Iommufds>) -> (i32, Arc<dyn UapiFile>);
    /// A DMA engine with `sid`, on the IOMMU's bus.
    fn plug(&self, sid: SourceId) -> Result<Arc<DmaEngine>, StackError>;
    /// Takes the device with `sid` off the bus.
    fn unplug(&self, sid: SourceId);
    /// The IOMMU and where it keeps the dirty state, for the scenario's first line.
    fn tracking(&self) -> &'static str;
}

impl DirtyHost for Host {
    fn memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }

    fn frames(&self) -> &Arc<FrameAllocator> {
        &self.frames
    }

    fn open(&self, fds: &Arc<Iommufds>) -> (i32, Arc<dyn UapiFile>) {
        let (fd, f) = fds.open(&self.unit);
        (fd, f)
    }

    fn plug(&self, sid: SourceId) -> Result<Arc<DmaEngine>, StackError> {
        let engine = Arc::new(DmaEngine::new(
            DmaEngineConfig::new(sid),
            self.iommu.clone() as Arc<dyn DmaPort>,
        )?);
        self.iommu.attach_endpoint(engine.clone());
        Ok(engine)
    }

    fn unplug(&self, sid: SourceId) {
        self.iommu.detach_endpoint(sid);
    }

    fn tracking(&self) -> &'static str {
        "VT-d: D in the second-level leaves (SLADE)"
    }
}

/// The SMMUv3 host of `vsva run migrate-dirty --iommu smmuv3`: memory, the physical SMMU
/// model and the host's arm-smmu-v3 driver.
pub struct SmmuDirtyHost {
    /// Host physical memory.
    pub mem: Arc<HostMemory>,
    /// Host frames.
    pub frames: Arc<FrameAllocator>,
    /// The physical SMMU.
    pub hw: Arc<Smmu>,
    /// The host driver.
    pub smmu: Arc<SmmuHost>,
}

impl SmmuDirtyHost {
    /// A host with `size` bytes of sparse memory and a strict-mode SMMU when `strict`.
    pub fn new(size: u64, strict: bool) -> Result<Self, StackError> {
        let mem = HostMemory::new(size)?;
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let hw = Arc::new(Smmu::new(
            mem.clone(),
            SmmuConfig {
                strict,
                ..SmmuConfig::default()
            },
        ));
        let smmu = SmmuHost::new(hw.clone(), frames.clone())
            .map_err(|e| StackError::Guest(format!("host SMMU: {e}")))?;
        Ok(SmmuDirtyHost {
            mem,
            frames,
            hw,
            smmu,
        })
    }
}

impl DirtyHost for SmmuDirtyHost {
    fn memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }

    fn frames(&self) -> &Arc<FrameAllocator> {
        &self.frames
    }

    fn open(&self, fds: &Arc<Iommufds>) -> (i32, Arc<dyn UapiFile>) {
        let (fd, f) = fds.open_smmu(&self.smmu);
        (fd, f)
    }

    fn plug(&self, sid: SourceId) -> Result<Arc<DmaEngine>, StackError> {
        let engine = Arc::new(DmaEngine::new(
            DmaEngineConfig::new(sid),
            self.hw.clone() as Arc<dyn DmaPort>,
        )?);
        self.hw
            .attach_endpoint(u32::from(sid.rid()), engine.clone());
        Ok(engine)
    }

    fn unplug(&self, sid: SourceId) {
        self.hw.detach_endpoint(u32::from(sid.rid()));
    }

    fn tracking(&self) -> &'static str {
        "SMMUv3: a stage-1 domain with CD.HA and HD, AP[2] of its DBM leaves"
    }
}

/// Where each device's completion records go: one page per device at the top of RAM.
fn record_page(cfg: &MigrateConfig, dev: u8) -> u64 {
    cfg.ram - PAGE_SIZE * (u64::from(dev) + 1)
}

/// The 4 KiB pages `[addr, addr + len)` touches.
fn pages(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    (addr / PAGE_SIZE..(addr + len).div_ceil(PAGE_SIZE)).map(|p| p * PAGE_SIZE)
}

/// One device's random descriptor: a fill or a copy into a random range of the data area
/// (below the record pages), or a compare that only reads. Returns it with the pages it
/// writes.
fn random_op(rng: &mut StdRng, cfg: &MigrateConfig, dev: u8) -> (Operation, Vec<u64>) {
    let data = cfg.ram - PAGE_SIZE * u64::from(cfg.devices);
    let size = 8 + rng.next_u64() % (3 * PAGE_SIZE);
    let at = |rng: &mut StdRng| (rng.next_u64() % (data - size)) & !7;
    let (src, dst) = (at(rng), at(rng));
    match rng.next_u64() % 3 {
        0 => (
            Operation::Fill {
                pattern: rng.next_u64() ^ u64::from(dev),
                dst,
                size: size as u32,
            },
            pages(dst, size).collect(),
        ),
        1 => (
            Operation::Memmove {
                src,
                dst,
                size: size as u32,
            },
            pages(dst, size).collect(),
        ),
        _ => (
            Operation::Compare {
                src1: src,
                src2: dst,
                size: size as u32,
            },
            Vec::new(),
        ),
    }
}

struct Device {
    cdev: VfioDeviceFile,
    engine: Arc<DmaEngine>,
}

/// One ioctl with a structure in and out; a refusal is a failed step of the VMM.
fn io<T: Wire>(f: &dyn UapiFile, cmd: u32, v: &T, what: &str) -> Result<T, StackError> {
    let mut b = v.to_bytes();
    f.ioctl(cmd, &mut b)
        .map_err(|e: Errno| StackError::Guest(format!("VMM: {what}: errno {}", e.raw())))?;
    Ok(read_prefix(&b, b.len()))
}

/// The VMM's view of the dirty-tracking HWPT.
struct Hwpt<'a> {
    file: Arc<dyn UapiFile>,
    id: u32,
    /// The VMM's bitmap buffer: its address and the window holding it.
    bitmap_va: u64,
    bitmap: &'a GuestMemoryMmap,
}

impl Hwpt<'_> {
    fn set_dirty_tracking(&self, on: bool) -> Result<(), StackError> {
        let cmd = IommuHwptSetDirtyTracking {
            size: 16,
            flags: if on {
                IOMMU_HWPT_DIRTY_TRACKING_ENABLE
            } else {
                0
            },
            hwpt_id: self.id,
            __reserved: 0,
        };
        io(
            &*self.file,
            IOMMU_HWPT_SET_DIRTY_TRACKING,
            &cmd,
            "SET_DIRTY_TRACKING",
        )
        .map(|_| ())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` of `[0, ram)` at 4 KiB into the VMM's buffer (zeroed
    /// first); returns the buffer's bytes.
    fn dirty_bitmap(&self, ram: u64) -> Result<Vec<u8>, StackError> {
        let len = (ram / PAGE_SIZE).div_ceil(64) as usize * 8;
        let mut bytes = vec![0u8; len];
        write_window(self.bitmap, &bytes)?;
        let cmd = IommuHwptGetDirtyBitmap {
            size: 48,
            hwpt_id: self.id,
            flags: 0,
            __reserved: 0,
            iova: 0,
            length: ram,
            page_size: PAGE_SIZE,
            data: self.bitmap_va,
        };
        io(
            &*self.file,
            IOMMU_HWPT_GET_DIRTY_BITMAP,
            &cmd,
            "GET_DIRTY_BITMAP",
        )?;
        read_window(self.bitmap, &mut bytes)?;
        Ok(bytes)
    }
}

fn write_window(w: &GuestMemoryMmap, bytes: &[u8]) -> Result<(), StackError> {
    use vm_memory::Bytes;
    w.write_slice(bytes, GuestAddress(0))
        .map_err(|e| StackError::Guest(e.to_string()))
}

fn read_window(w: &GuestMemoryMmap, bytes: &mut [u8]) -> Result<(), StackError> {
    use vm_memory::Bytes;
    w.read_slice(bytes, GuestAddress(0))
        .map_err(|e| StackError::Guest(e.to_string()))
}

/// Runs the scenario on `host`, printing to and checking in `out`.
pub fn migrate_dirty(
    host: &dyn DirtyHost,
    cfg: &MigrateConfig,
    out: &mut Outcome,
) -> Result<(), StackError> {
    let (mem, frames) = (host.memory(), host.frames());
    let bitmap_bytes = ((cfg.ram / PAGE_SIZE).div_ceil(64) * 8).next_multiple_of(PAGE_SIZE);
    let ram_hpa = frames.alloc_range(cfg.ram, PAGE_SIZE)?;
    let bitmap_hpa = match frames.alloc_range(bitmap_bytes, PAGE_SIZE) {
        Ok(h) => h,
        Err(e) => {
            frames.free(ram_hpa)?;
            return Err(e.into());
        }
    };
    let result = (|| {
        let ram = mem.guest_memory(&[(Gpa(0), ram_hpa, cfg.ram)])?;
        let r = match mem.guest_memory(&[(Gpa(0), bitmap_hpa, bitmap_bytes)]) {
            Ok(bitmap) => {
                let r = with_ram(host, cfg, &ram, ram_hpa.0, &bitmap, out);
                mem.release_guest_memory(&bitmap);
                r
            }
            Err(e) => Err(e.into()),
        };
        mem.release_guest_memory(&ram);
        r
    })();
    frames.free(bitmap_hpa)?;
    frames.free(ram_hpa)?;
    result
}

fn with_ram(
    host: &dyn DirtyHost,
    cfg: &MigrateConfig,
    ram: &GuestMemoryMmap,
    ram_hpa: u64,
    bitmap: &GuestMemoryMmap,
    out: &mut Outcome,
) -> Result<(), StackError> {
    let fds = Iommufds::new();
    let (fd, file) = host.open(&fds);
    let base = ram
        .get_host_address(GuestAddress(0))
        .map_err(|e| StackError::Guest(e.to_string()))? as u64;
    let bitmap_va = bitmap
        .get_host_address(GuestAddress(0))
        .map_err(|e| StackError::Guest(e.to_string()))? as u64;
    let mut devices = Vec::new();
    let result = (|| {
        let ioas = io(
            &*file,
            IOMMU_IOAS_ALLOC,
            &IommuIoasAlloc {
                size: 12,
                ..Default::default()
            },
            "IOAS_ALLOC",
        )?
        .out_ioas_id;
        const PIECE: u64 = 1 << 20;
        for at in (0..cfg.ram).step_by(PIECE as usize) {
            let map = IommuIoasMap {
                size: 40,
                flags: IOMMU_IOAS_MAP_READABLE
                    | IOMMU_IOAS_MAP_WRITEABLE
                    | IOMMU_IOAS_MAP_FIXED_IOVA,
                ioas_id: ioas,
                user_va: base + at,
                length: PIECE,
                iova: at,
                ..Default::default()
            };
            io(&*file, IOMMU_IOAS_MAP, &map, "IOAS_MAP")?;
        }
        let mut hwpt = None;
        for dev in 0..cfg.devices {
            let sid = SourceId::new(0x40, dev, 0).expect("device number in range");
            // On the bus before it is attached: the host driver reads its capabilities then.
            let engine = host.plug(sid)?;
            let cdev = VfioDeviceFile::open(sid, fds.clone());
            let bind = VfioDeviceBindIommufd {
                argsz: 24,
                iommufd: fd,
                ..Default::default()
            };
            let dev_id = io(&cdev, VFIO_DEVICE_BIND_IOMMUFD, &bind, "BIND_IOMMUFD")?.out_devid;
            let id = match hwpt {
                Some(id) => id,
                None => {
                    let alloc = IommuHwptAlloc {
                        size: 48,
                        flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
                        dev_id,
                        pt_id: ioas,
                        ..Default::default()
                    };
                    let id = io(&*file, IOMMU_HWPT_ALLOC, &alloc, "HWPT_ALLOC")?.out_hwpt_id;
                    hwpt = Some(id);
                    id
                }
            };
            let attach = VfioDeviceAttachIommufdPt {
                argsz: 16,
                pt_id: id,
                ..Default::default()
            };
            io(
                &cdev,
                VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                &attach,
                "ATTACH_IOMMUFD_PT",
            )?;
            devices.push(Device {
                cdev,
                engine: engine.clone(),
            });
            engine.enable(CTRL_ATS_EN)?;
        }
        let hwpt = Hwpt {
            file: file.clone(),
            id: hwpt.ok_or_else(|| StackError::Guest("no device".into()))?,
            bitmap_va,
            bitmap,
        };
        migrate(host, cfg, &hwpt, &devices, ram_hpa, out)
    })();
    for d in devices {
        host.unplug(d.cdev.sid());
        drop(d.cdev);
    }
    drop(file);
    result
}

fn migrate(
    host: &dyn DirtyHost,
    cfg: &MigrateConfig,
    hwpt: &Hwpt<'_>,
    devices: &[Device],
    ram_hpa: u64,
    out: &mut Outcome,
) -> Result<(), StackError> {
    let mem = &**host.memory();
    let npages = cfg.ram / PAGE_SIZE;
    // The guest's RAM before migration starts: every page distinct.
    for page in 0..npages {
        mem.write(ram_hpa + page * PAGE_SIZE, &[(page % 251) as u8 + 1; 4096])?;
    }
    hwpt.set_dirty_tracking(true)?;
    let _ = writeln!(out, "host IOMMU: {}", host.tracking());
    let _ = writeln!(
        out,
        "VM: {} MiB of RAM mapped with 4 KiB pages (IOMMU_IOAS_MAP), {} devices (ATS) attached \
         to one HWPT allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING; \
         IOMMU_HWPT_SET_DIRTY_TRACKING on",
        cfg.ram >> 20,
        devices.len()
    );
    // Pre-copy, first pass: all of RAM.
    let mut target = vec![0u8; cfg.ram as usize];
    mem.read(ram_hpa, &mut target)?;
    let _ = writeln!(out, "pass 0: copied all {npages} pages to the target");

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut written_ever = BTreeSet::new();
    let mut reported_ever = BTreeSet::new();
    for round in 1..=cfg.rounds + 1 {
        let last = round > cfg.rounds;
        let mut written = BTreeSet::new();
        let mut ops = 0;
        if !last {
            for (dev, d) in devices.iter().enumerate() {
                let dev = dev as u8;
                let record = record_page(cfg, dev);
                for _ in 0..cfg.ops_per_round {
                    let (op, dst) = random_op(&mut rng, cfg, dev);
                    let desc = Descriptor {
                        pasid: None,
                        privileged: false,
                        block_on_fault: false,
                        completion: CompletionRequest::Always(record),
                        op,
                    };
                    d.engine.portal_write(0, &desc.encode())?;
                    d.engine.process();
                    let mut raw = [0u8; 32];
                    mem.read(ram_hpa + record, &mut raw)?;
                    let rec = CompletionRecord::from_bytes(&raw);
                    let ok = rec.is_some_and(|r| r.status == CompletionStatus::Success);
                    out.check(ok, || {
                        format!("round {round}: device {dev}'s {op:?} completed {rec:?}")
                    });
                    written.extend(dst);
                    written.insert(record);
                    ops += 1;
                }
            }
        }
        let started = Instant::now();
        let bitmap = hwpt.dirty_bitmap(cfg.ram)?;
        let harvest = started.elapsed();
        let reported: BTreeSet<u64> = (0..npages)
            .filter(|&p| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .map(|p| p * PAGE_SIZE)
            .collect();
        for &page in &reported {
            let at = page as usize;
            mem.read(ram_hpa + page, &mut target[at..at + PAGE_SIZE as usize])?;
        }
        let exact = reported == written;
        let _ =
            writeln!(
            out,
            "{} {round}: {ops} descriptors wrote {} pages; IOMMU_HWPT_GET_DIRTY_BITMAP ({:.0} µs) \
             reported {} pages, copied{}",
            if last { "stop-and-copy" } else { "round" },
            written.len(),
            harvest.as_secs_f64() * 1e6,
            reported.len(),
            if exact { "" } else { " (WRONG: not the pages written)" }
        );
        out.check(exact, || {
            let missed: Vec<_> = written.difference(&reported).take(4).collect();
            let extra: Vec<_> = reported.difference(&written).take(4).collect();
            format!(
                "round {round}: written pages not reported {missed:x?}, reported pages no one \
                 wrote {extra:x?}"
            )
        });
        written_ever.extend(written);
        reported_ever.extend(reported);
    }
    hwpt.set_dirty_tracking(false)?;

    let mut source = vec![0u8; cfg.ram as usize];
    mem.read(ram_hpa, &mut source)?;
    let differing = source
        .chunks(PAGE_SIZE as usize)
        .zip(target.chunks(PAGE_SIZE as usize))
        .filter(|(s, t)| s != t)
        .count();
    let _ = writeln!(
        out,
        "{} pages written by the devices, {} reported in some round, {} never written and \
         never reported",
        written_ever.len(),
        reported_ever.len(),
        npages as usize - reported_ever.union(&written_ever).count()
    );
    out.check(written_ever == reported_ever, || {
        "the pages reported over all rounds are not the pages written".into()
    });
    let _ = writeln!(
        out,
        "target RAM vs source RAM: {} bytes compared, {differing} pages differ{}",
        cfg.ram,
        if differing == 0 { "" } else { " (WRONG)" }
    );
    out.check(differing == 0, || {
        format!("{differing} pages of the target differ from the source")
    });
    Ok(())
}
