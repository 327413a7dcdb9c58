//! `vsva run migrate-dirty`: the dirty-page tracking of a live migration of a VM with
//! passthrough devices. The VMM turns dirty tracking on in the domain that maps the VM's
//! RAM, copies all of RAM once, and then, while the devices keep writing, harvests the
//! dirty bitmap in rounds and copies only the pages it reports; after the devices stop, a
//! last harvest and copy finish the target's RAM.
//!
//! The devices' DMA goes through the physical IOMMU model, which sets D in the
//! second-level leaves (SLADE); the VMM reads them through the host driver's domain
//! (`VtdDomain::set_dirty_tracking`, `VtdDomain::read_and_clear_dirty`, what iommufd's
//! `IOMMU_HWPT_SET_DIRTY_TRACKING` and `IOMMU_HWPT_GET_DIRTY_BITMAP` call), not through
//! an ioctl: the seed's VFIO type1 uAPI has no hardware dirty tracking. The checks: each
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

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::{DirtyBitmap, VtdDomain};
use vsva_host::IommuBackend;
use vsva_hw::dma::regs::CTRL_ATS_EN;
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    DmaPort, Operation,
};
use vsva_hw::PAGE_SIZE;
use vsva_uapi::DmaMap;
use vsva_vtd::{Gpa, Iova, PhysMem, SourceId};

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
    sid: SourceId,
    engine: Arc<DmaEngine>,
}

/// Runs the scenario on `host`, printing to and checking in `out`.
pub fn migrate_dirty(
    host: &Host,
    cfg: &MigrateConfig,
    out: &mut Outcome,
) -> Result<(), StackError> {
    let ram_hpa = host.frames.alloc_range(cfg.ram, PAGE_SIZE)?;
    let ram = host.mem.guest_memory(&[(Gpa(0), ram_hpa, cfg.ram)]);
    let result = ram.map_err(StackError::from).and_then(|ram| {
        let r = with_ram(host, cfg, &ram, ram_hpa.0, out);
        host.mem.release_guest_memory(&ram);
        r
    });
    host.frames.free(ram_hpa)?;
    result
}

fn with_ram(
    host: &Host,
    cfg: &MigrateConfig,
    ram: &GuestMemoryMmap,
    ram_hpa: u64,
    out: &mut Outcome,
) -> Result<(), StackError> {
    let mut domain = VtdDomain::new_dirty_tracking(&host.unit)?;
    let base = ram
        .get_host_address(GuestAddress(0))
        .map_err(|e| StackError::Guest(e.to_string()))? as u64;
    const PIECE: u64 = 1 << 20;
    for at in (0..cfg.ram).step_by(PIECE as usize) {
        domain.map_dma(&DmaMap {
            iova: Iova(at),
            vaddr: base + at,
            size: PIECE,
            read: true,
            write: true,
        })?;
    }
    let mut devices = Vec::new();
    let result = (|| {
        for dev in 0..cfg.devices {
            let sid = SourceId::new(0x40, dev, 0).expect("device number in range");
            let engine = Arc::new(DmaEngine::new(
                DmaEngineConfig::new(sid),
                host.iommu.clone() as Arc<dyn DmaPort>,
            )?);
            host.iommu.attach_endpoint(engine.clone());
            devices.push(Device {
                sid,
                engine: engine.clone(),
            });
            engine.enable(CTRL_ATS_EN)?;
            domain.attach_device(sid)?;
        }
        migrate(host, cfg, &mut domain, &devices, ram_hpa, out)
    })();
    for d in &devices {
        domain.detach_device(d.sid);
        host.iommu.detach_endpoint(d.sid);
    }
    result
}

fn migrate(
    host: &Host,
    cfg: &MigrateConfig,
    domain: &mut VtdDomain,
    devices: &[Device],
    ram_hpa: u64,
    out: &mut Outcome,
) -> Result<(), StackError> {
    let mem = &*host.mem;
    let npages = cfg.ram / PAGE_SIZE;
    // The guest's RAM before migration starts: every page distinct.
    for page in 0..npages {
        mem.write(ram_hpa + page * PAGE_SIZE, &[(page % 251) as u8 + 1; 4096])?;
    }
    domain.set_dirty_tracking(true)?;
    let _ = writeln!(
        out,
        "VM: {} MiB of RAM mapped with 4 KiB pages, {} devices (ATS) in one dirty-tracking \
         domain; SLADE set (host driver API, no uAPI yet)",
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
    let mut bitmap = vec![0u8; DirtyBitmap::bytes_needed(cfg.ram, PAGE_SIZE) as usize];
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
        bitmap.fill(0);
        let started = Instant::now();
        let mut b = DirtyBitmap::new(0, cfg.ram, PAGE_SIZE, &mut bitmap)?;
        domain.read_and_clear_dirty(&mut b, false)?;
        let harvest = started.elapsed();
        let reported: BTreeSet<u64> = (0..npages)
            .map(|p| p * PAGE_SIZE)
            .filter(|&a| b.is_dirty(a))
            .collect();
        for &page in &reported {
            let at = page as usize;
            mem.read(ram_hpa + page, &mut target[at..at + PAGE_SIZE as usize])?;
        }
        let exact = reported == written;
        let _ =
            writeln!(
            out,
            "{} {round}: {ops} descriptors wrote {} pages; bitmap harvest ({:.0} µs) reported {} \
             pages, copied{}",
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
    domain.set_dirty_tracking(false)?;

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
