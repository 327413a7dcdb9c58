use super::*;
use crate::frames::tests::ram_and_frames;
use proptest::prelude::*;
use std::collections::HashMap;
use vsva_vtd::flpte::FlPte;

/// Records the ranges it is told about.
#[derive(Default)]
struct Recorder(Mutex<Vec<(Gva, Gva)>>);

impl MmuNotifier for Recorder {
    fn invalidate_range(&self, start: Gva, end: Gva) {
        self.0.lock().unwrap().push((start, end));
    }
}

impl Recorder {
    fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .into_iter()
            .map(|(s, e)| (s.0, e.0))
            .collect()
    }
}

fn process(mode: FlPagingMode) -> (Arc<GuestMemoryMmap>, Arc<GuestFrames>, Process) {
    let (mem, frames) = ram_and_frames();
    let p = Process::new(mem.clone(), frames.clone(), mode).unwrap();
    (mem, frames, p)
}

/// The leaf entry of `va`, read level by level from CR3 as the hardware does.
fn leaf(mem: &GuestMemoryMmap, p: &Process, va: u64) -> u64 {
    let mut table = p.cr3().0;
    for level in (1..=p.paging_mode().levels()).rev() {
        let index = (va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        let entry = mem.read_u64(table + index * 8).unwrap();
        if level == 1 || entry & FlPte::P == 0 {
            return entry;
        }
        table = entry & FlPte::ADDR_MASK;
    }
    unreachable!("the loop returns at level 1")
}

#[test]
fn cpu_accesses_go_through_the_tables() {
    let (mem, frames, p) = process(FlPagingMode::FourLevel);
    assert_eq!(p.page_table_frames(), 1);
    let va = p.mmap(3 * 4096, Prot::READ_WRITE).unwrap();
    assert_eq!(va, Gva(MMAP_BASE));
    assert_eq!(p.resident_pages(), 3);
    // PML4, PDPT, PD, PT and three pages.
    assert_eq!(frames.allocated_frames(), 4 + 3);

    let data: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
    p.write(Gva(va.0 + 3000), &data).unwrap();
    let mut back = vec![0; data.len()];
    p.read(Gva(va.0 + 3000), &mut back).unwrap();
    assert_eq!(back, data);

    // The bytes are in the frames the tables name, page by page.
    for (i, chunk_start) in [(0usize, 3000u64), (1096, 4096), (5192, 8192)] {
        let gpa = p.translate(Gva(va.0 + chunk_start)).unwrap();
        let mut b = [0u8; 1];
        mem.read(gpa.0, &mut b).unwrap();
        assert_eq!(b[0], data[i]);
    }
    // A user page, writable, not executable; the CPU set accessed and dirty.
    let pte = leaf(&mem, &p, va.0 + 4096);
    let want = FlPte::P | FlPte::RW | FlPte::US | FlPte::XD | FlPte::A | FlPte::D;
    assert_eq!(pte & !FlPte::ADDR_MASK, want);
    assert_eq!(
        pte & FlPte::ADDR_MASK,
        p.translate(Gva(va.0 + 4096)).unwrap().0
    );
    // Only read: accessed but clean.
    let second = p.mmap(4096, Prot::READ | Prot::EXEC).unwrap();
    assert_eq!(second, Gva(MMAP_BASE + 3 * 4096 + GUARD));
    p.read(second, &mut [0u8; 8]).unwrap();
    assert_eq!(
        leaf(&mem, &p, second.0) & !FlPte::ADDR_MASK,
        FlPte::P | FlPte::US | FlPte::A
    );
    // The guard page between them is not mapped.
    assert_eq!(
        p.read(Gva(va.0 + 3 * 4096), &mut [0u8; 1]),
        Err(ProcessError::Segv {
            gva: Gva(va.0 + 3 * 4096),
            write: false
        })
    );
}

#[test]
fn lazy_pages_are_populated_on_touch() {
    let (mem, _, p) = process(FlPagingMode::FourLevel);
    let va = p.mmap_lazy(4 * 4096, Prot::READ_WRITE).unwrap();
    let ro = p.mmap_lazy(4096, Prot::READ).unwrap();
    assert_eq!(p.resident_pages(), 0);
    assert_eq!(p.translate(va), None);
    assert_eq!(leaf(&mem, &p, va.0), 0);

    // A CPU read populates a zeroed page.
    let mut b = [0xffu8; 16];
    p.read(Gva(va.0 + 2 * 4096 + 8), &mut b).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(p.resident_pages(), 1);

    // The device's fault path: a write fault inside the area is served, the page is
    // writable afterwards; asking again is harmless.
    assert!(p.handle_fault(Gva(va.0 + 3 * 4096 + 5), true));
    assert!(p.handle_fault(Gva(va.0 + 3 * 4096), true));
    assert_eq!(p.resident_pages(), 2);
    assert_ne!(leaf(&mem, &p, va.0 + 3 * 4096) & FlPte::RW, 0);

    // Outside any area, or writing a read-only one: refused, nothing mapped.
    assert!(!p.handle_fault(Gva(va.0 + 4 * 4096), false));
    assert!(!p.handle_fault(Gva(0x1000), false));
    assert!(!p.handle_fault(ro, true));
    assert_eq!(p.resident_pages(), 2);
    assert!(p.handle_fault(ro, false));
    assert_eq!(
        p.write(ro, &[1]),
        Err(ProcessError::Segv {
            gva: ro,
            write: true
        })
    );
    assert_eq!(p.resident_pages(), 3);
}

/// The CPU's walk cache serves only what the tables still say: a walk a read made does
/// not spare a write the walk that sets dirty, a leaf rewritten in memory counts at once,
/// and nothing outlives munmap.
#[test]
fn the_cpu_walk_cache_keeps_nothing_the_tables_dropped() {
    let (mem, frames, p) = process(FlPagingMode::FourLevel);
    let va = p.mmap(4096, Prot::READ_WRITE).unwrap();
    p.read(va, &mut [0u8; 8]).unwrap();
    assert_eq!(leaf(&mem, &p, va.0) & (FlPte::A | FlPte::D), FlPte::A);
    p.write(Gva(va.0 + 8), &[7]).unwrap();
    assert_ne!(leaf(&mem, &p, va.0) & FlPte::D, 0);

    // The leaf pointed at another frame behind the kernel's back: the next access uses it.
    let other = frames.alloc().unwrap();
    mem.write(other.0, &[9; 16]).unwrap();
    let slot = {
        let mut table = p.cr3().0;
        for level in (2..=4u32).rev() {
            let index = (va.0 >> (12 + 9 * (level - 1))) & 0x1ff;
            table = mem.read_u64(table + index * 8).unwrap() & FlPte::ADDR_MASK;
        }
        table + ((va.0 >> 12) & 0x1ff) * 8
    };
    let own = mem.read_u64(slot).unwrap();
    mem.write_u64(slot, (own & !FlPte::ADDR_MASK) | other.0)
        .unwrap();
    let mut b = [0u8; 16];
    p.read(va, &mut b).unwrap();
    assert_eq!(b, [9; 16]);
    mem.write_u64(slot, own).unwrap();
    frames.free(other).unwrap();

    p.munmap(va, 4096).unwrap();
    let segv = |write| ProcessError::Segv { gva: va, write };
    assert_eq!(p.read(va, &mut [0u8; 1]), Err(segv(false)));
    assert_eq!(p.write(va, &[1]), Err(segv(true)));
    // Mapped again, lazily: the first touch populates a zeroed page.
    p.mmap_fixed(va, 4096, Prot::READ_WRITE, false).unwrap();
    let mut b = [0xffu8; 16];
    p.read(va, &mut b).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(p.resident_pages(), 1);
}

#[test]
fn munmap_reports_the_ranges_and_frees_after_notifying() {
    let (_, frames, p) = process(FlPagingMode::FourLevel);
    let rec = Arc::new(Recorder::default());
    let id = p.register_notifier(rec.clone());
    let va = p.mmap(8 * 4096, Prot::READ_WRITE).unwrap();
    let before = frames.allocated_frames();

    // The middle of an area: the area splits in two.
    p.munmap(Gva(va.0 + 2 * 4096), 3 * 4096 - 100).unwrap();
    assert_eq!(rec.take(), vec![(va.0 + 2 * 4096, va.0 + 5 * 4096)]);
    assert_eq!(frames.allocated_frames(), before - 3);
    assert_eq!(
        p.vmas(),
        vec![
            Vma {
                start: va,
                len: 2 * 4096,
                prot: Prot::READ_WRITE
            },
            Vma {
                start: Gva(va.0 + 5 * 4096),
                len: 3 * 4096,
                prot: Prot::READ_WRITE
            },
        ]
    );
    assert_eq!(
        p.read(Gva(va.0 + 3 * 4096), &mut [0]),
        Err(ProcessError::Segv {
            gva: Gva(va.0 + 3 * 4096),
            write: false
        })
    );
    assert!(!p.handle_fault(Gva(va.0 + 3 * 4096), true));

    // A range over both parts and the hole: one range per part.
    p.munmap(va, 7 * 4096).unwrap();
    assert_eq!(
        rec.take(),
        vec![(va.0, va.0 + 2 * 4096), (va.0 + 5 * 4096, va.0 + 7 * 4096)]
    );
    // Nothing mapped there: nothing to report.
    p.munmap(va, 4096).unwrap();
    assert!(rec.take().is_empty());

    assert!(p.unregister_notifier(id));
    assert!(!p.unregister_notifier(id));
    p.munmap(Gva(va.0 + 7 * 4096), 4096).unwrap();
    assert!(rec.take().is_empty());
    assert_eq!(p.resident_pages(), 0);
    assert!(p.vmas().is_empty());
}

#[test]
fn mprotect_changes_rights_and_reports() {
    let (mem, _, p) = process(FlPagingMode::FourLevel);
    let rec = Arc::new(Recorder::default());
    p.register_notifier(rec.clone());
    let va = p.mmap(4 * 4096, Prot::READ_WRITE).unwrap();
    p.write(va, &[1; 4 * 4096]).unwrap();

    p.mprotect(Gva(va.0 + 4096), 2 * 4096, Prot::READ).unwrap();
    assert_eq!(rec.take(), vec![(va.0 + 4096, va.0 + 3 * 4096)]);
    assert_eq!(leaf(&mem, &p, va.0 + 4096) & FlPte::RW, 0);
    // Accessed and dirty survive a protection change.
    assert_ne!(leaf(&mem, &p, va.0 + 4096) & FlPte::D, 0);
    assert_eq!(
        p.write(Gva(va.0 + 4096 + 10), &[2]),
        Err(ProcessError::Segv {
            gva: Gva(va.0 + 4096 + 10),
            write: true
        })
    );
    p.write(Gva(va.0 + 3 * 4096), &[2]).unwrap();
    let mut b = [0u8; 1];
    p.read(Gva(va.0 + 2 * 4096), &mut b).unwrap();
    assert_eq!(b, [1]);
    assert_eq!(p.vmas().len(), 3);

    // Over a hole: refused, nothing changed, nothing reported.
    let lazy = p.mmap_lazy(4096, Prot::READ_WRITE).unwrap();
    assert_eq!(
        p.mprotect(
            Gva(va.0 + 3 * 4096),
            lazy.0 + 4096 - (va.0 + 3 * 4096),
            Prot::READ
        ),
        Err(ProcessError::NotMapped(Gva(va.0 + 4 * 4096)))
    );
    assert!(rec.take().is_empty());
    assert_eq!(
        p.vma_at(Gva(va.0 + 3 * 4096)).unwrap().prot,
        Prot::READ_WRITE
    );
    // Back to writable: a write works again; an area with no resident page still reports.
    p.mprotect(va, 4 * 4096, Prot::READ_WRITE).unwrap();
    p.write(Gva(va.0 + 4096), &[3]).unwrap();
    p.mprotect(lazy, 4096, Prot::READ).unwrap();
    assert_eq!(
        rec.take(),
        vec![
            (va.0, va.0 + 4096),
            (va.0 + 4096, va.0 + 3 * 4096),
            (va.0 + 3 * 4096, va.0 + 4 * 4096),
            (lazy.0, lazy.0 + 4096),
        ]
    );
    assert!(!p.handle_fault(lazy, true));
    assert_eq!(
        p.mprotect(va, 4096, Prot::WRITE),
        Err(ProcessError::Unreadable)
    );
}

#[test]
fn five_level_tables_reach_above_47_bits() {
    let high = Gva(0x00ff_1234_5678_0000);
    let (mem, frames, p) = process(FlPagingMode::FiveLevel);
    p.mmap_fixed(high, 2 * 4096, Prot::READ_WRITE, false)
        .unwrap();
    p.write(Gva(high.0 + 4090), b"five levels").unwrap();
    let mut b = [0u8; 11];
    p.read(Gva(high.0 + 4090), &mut b).unwrap();
    assert_eq!(&b, b"five levels");
    // PML5 entry 0xff (bits 56:48 of the address) leads there.
    let pml5e = mem.read_u64(p.cr3().0 + 0xff * 8).unwrap();
    assert_eq!(pml5e & FlPte::P, FlPte::P);
    // Five tables and two pages.
    assert_eq!(frames.allocated_frames(), 5 + 2);
    assert_eq!(
        p.mmap_fixed(Gva(1 << 56), 4096, Prot::READ, false),
        Err(ProcessError::OutOfRange {
            start: Gva(1 << 56),
            len: 4096
        })
    );

    let (_, _, p4) = process(FlPagingMode::FourLevel);
    assert_eq!(
        p4.mmap_fixed(high, 4096, Prot::READ, true),
        Err(ProcessError::OutOfRange {
            start: high,
            len: 4096
        })
    );
}

#[test]
fn bad_requests_change_nothing() {
    let (_, frames, p) = process(FlPagingMode::FourLevel);
    let va = p.mmap(4096, Prot::READ).unwrap();
    let used = frames.allocated_frames();
    assert_eq!(p.mmap(0, Prot::READ), Err(ProcessError::ZeroLength));
    assert_eq!(p.mmap(4096, Prot::WRITE), Err(ProcessError::Unreadable));
    assert_eq!(
        p.munmap(Gva(va.0 + 1), 4096),
        Err(ProcessError::Misaligned(Gva(va.0 + 1)))
    );
    assert_eq!(
        p.munmap(Gva(0), 4096),
        Err(ProcessError::OutOfRange {
            start: Gva(0),
            len: 4096
        })
    );
    assert_eq!(
        p.munmap(Gva(!0xfffu64), 0x2000),
        Err(ProcessError::OutOfRange {
            start: Gva(!0xfffu64),
            len: 0x2000
        })
    );
    assert_eq!(
        p.mmap_fixed(va, 4096, Prot::READ, true),
        Err(ProcessError::Overlap {
            start: va,
            len: 4096
        })
    );
    // More than the frames left: the partial population is undone.
    assert_eq!(
        p.mmap(0x10_0000, Prot::READ),
        Err(ProcessError::Frames(FrameError::OutOfFrames { pages: 1 }))
    );
    assert_eq!(frames.allocated_frames(), used);
    assert_eq!(p.vmas().len(), 1);
    assert_eq!(
        p.mmap_lazy(1 << 47, Prot::READ),
        Err(ProcessError::NoAddressSpace { len: 1 << 47 })
    );
}

#[test]
fn dropping_a_process_frees_every_frame() {
    let (_, frames, p) = process(FlPagingMode::FiveLevel);
    let a = p.mmap(5 * 4096, Prot::READ_WRITE).unwrap();
    let b = p.mmap_lazy(64 * 4096, Prot::READ_WRITE).unwrap();
    p.write(Gva(b.0 + 40 * 4096), &[9; 100]).unwrap();
    p.munmap(Gva(a.0 + 4096), 4096).unwrap();
    assert!(frames.allocated_frames() > 0);
    drop(p);
    assert_eq!(frames.allocated_frames(), 0);
}

/// One operation on a window of 16 pages.
#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        write: bool,
        populate: bool,
    },
    Unmap {
        page: u64,
        pages: u64,
    },
    Protect {
        page: u64,
        pages: u64,
        write: bool,
    },
    Write {
        offset: u64,
        len: usize,
        byte: u8,
    },
    Read {
        offset: u64,
        len: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..16, 1u64..5, any::<bool>(), any::<bool>()).prop_map(
            |(page, pages, write, populate)| Op::Map {
                page,
                pages,
                write,
                populate
            }
        ),
        (0u64..16, 1u64..5).prop_map(|(page, pages)| Op::Unmap { page, pages }),
        (0u64..16, 1u64..5, any::<bool>()).prop_map(|(page, pages, write)| Op::Protect {
            page,
            pages,
            write
        }),
        (0u64..16 * 4096, 1usize..6000, any::<u8>()).prop_map(|(offset, len, byte)| Op::Write {
            offset,
            len,
            byte
        }),
        (0u64..16 * 4096, 1usize..6000).prop_map(|(offset, len)| Op::Read { offset, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The process behaves like a map from pages to (writable, contents): CPU accesses
    /// succeed exactly where every page allows them and see what was written, munmap and
    /// mprotect report exactly the mapped part of their range, and frames never leak.
    #[test]
    fn process_matches_a_page_model(ops in proptest::collection::vec(op(), 1..40)) {
        const BASE: u64 = 0x4000_0000;
        let (_, frames, p) = process(FlPagingMode::FourLevel);
        let rec = Arc::new(Recorder::default());
        p.register_notifier(rec.clone());
        // Page index to (writable, contents).
        let mut model: HashMap<u64, (bool, Vec<u8>)> = HashMap::new();
        let prot = |w: bool| if w { Prot::READ_WRITE } else { Prot::READ };
        for op in ops {
            match op {
                Op::Map { page, pages, write, populate } => {
                    let pages = pages.min(16 - page);
                    let free = (page..page + pages).all(|i| !model.contains_key(&i));
                    let r = p.mmap_fixed(Gva(BASE + page * 4096), pages * 4096, prot(write), populate);
                    prop_assert_eq!(r.is_ok(), free);
                    if free {
                        for i in page..page + pages {
                            model.insert(i, (write, vec![0; 4096]));
                        }
                    }
                }
                Op::Unmap { page, pages } => {
                    p.munmap(Gva(BASE + page * 4096), pages * 4096).unwrap();
                    let reported: u64 = rec.take().iter().map(|(s, e)| (e - s) / 4096).sum();
                    let mapped = (page..page + pages).filter(|i| model.remove(i).is_some()).count();
                    prop_assert_eq!(reported, mapped as u64);
                }
                Op::Protect { page, pages, write } => {
                    let all = (page..page + pages).all(|i| model.contains_key(&i));
                    let r = p.mprotect(Gva(BASE + page * 4096), pages * 4096, prot(write));
                    prop_assert_eq!(r.is_ok(), all);
                    let reported: u64 = rec.take().iter().map(|(s, e)| (e - s) / 4096).sum();
                    if all {
                        prop_assert_eq!(reported, pages);
                        for i in page..page + pages {
                            model.get_mut(&i).unwrap().0 = write;
                        }
                    } else {
                        prop_assert_eq!(reported, 0);
                    }
                }
                Op::Write { offset, len, byte } => {
                    let first = offset / 4096;
                    let last = (offset + len as u64 - 1) / 4096;
                    let ok = (first..=last).all(|i| model.get(&i).is_some_and(|m| m.0));
                    let r = p.write(Gva(BASE + offset), &vec![byte; len]);
                    prop_assert_eq!(r.is_ok(), ok);
                    // A failed write may have written the pages before the fault.
                    for a in offset..offset + len as u64 {
                        match model.get_mut(&(a / 4096)) {
                            Some((true, data)) => data[(a % 4096) as usize] = byte,
                            _ => break,
                        }
                    }
                }
                Op::Read { offset, len } => {
                    let first = offset / 4096;
                    let last = (offset + len as u64 - 1) / 4096;
                    let ok = (first..=last).all(|i| model.contains_key(&i));
                    let mut buf = vec![0; len];
                    let r = p.read(Gva(BASE + offset), &mut buf);
                    prop_assert_eq!(r.is_ok(), ok);
                    if ok {
                        for (k, a) in (offset..offset + len as u64).enumerate() {
                            prop_assert_eq!(buf[k], model[&(a / 4096)].1[(a % 4096) as usize]);
                        }
                    }
                }
            }
        }
        drop(p);
        prop_assert_eq!(frames.allocated_frames(), 0);
    }
}

/// An AArch64 process: the CPU's accesses, the tables an SMMU walks from TTB0 (the
/// stage-1 walker with the configuration of a context descriptor for that table), the
/// rights of each page in AP and UXN, munmap and mprotect, and every frame back at the end.
#[test]
fn aarch64_tables_are_what_the_smmu_walks() {
    use vsva_smmuv3::desc::Descriptor as D;
    use vsva_smmuv3::{
        cd::ContextDescriptor, features::Features, walk::walk_stage1, walk::AccessRequest as A,
        walk::FaultKind,
    };
    let (mem, frames, p) = {
        let (mem, frames) = ram_and_frames();
        let p = Process::new_aarch64(mem.clone(), frames.clone()).unwrap();
        (mem, frames, p)
    };
    assert_eq!(p.arch(), Arch::Aarch64);
    assert_eq!(p.page_table_frames(), 1);
    let rec = Arc::new(Recorder::default());
    p.register_notifier(rec.clone());
    let rw = p.mmap(2 * 4096, Prot::READ_WRITE).unwrap();
    let ro = p.mmap(4096, Prot::READ).unwrap();
    // Level-0, -1, -2 and -3 tables and three pages.
    assert_eq!(frames.allocated_frames(), 4 + 3);
    p.write(Gva(rw.0 + 4000), b"nested").unwrap();
    let cfg = ContextDescriptor::new(p.cr3().0, AARCH64_T0SZ, 9)
        .s1_config(&Features::VSVA)
        .unwrap();
    let write = A {
        write: true,
        ..A::READ
    };
    let t = walk_stage1(&*mem, &cfg, rw.0 + 4000, A::READ, &mut ()).unwrap();
    assert_eq!(Some(Gpa(t.output)), p.translate(Gva(rw.0 + 4000)));
    let mut b = [0; 6];
    mem.read(t.output, &mut b).unwrap();
    assert_eq!(&b, b"nested");
    assert!(walk_stage1(&*mem, &cfg, rw.0, write, &mut ()).is_ok());
    // The read-only page refuses a write (AP[2] set) and no page is executable (UXN).
    let f = walk_stage1(&*mem, &cfg, ro.0, write, &mut ()).unwrap_err();
    assert_eq!(f.kind, FaultKind::Permission);
    let exec = A {
        instruction: true,
        ..A::READ
    };
    assert_eq!(
        walk_stage1(&*mem, &cfg, rw.0, exec, &mut ())
            .unwrap_err()
            .kind,
        FaultKind::Permission
    );
    assert!(matches!(
        p.write(ro, b"x"),
        Err(ProcessError::Segv { write: true, .. })
    ));
    // mprotect makes the first page read-only; munmap clears the second.
    p.mprotect(rw, 4096, Prot::READ).unwrap();
    assert_eq!(
        walk_stage1(&*mem, &cfg, rw.0, write, &mut ())
            .unwrap_err()
            .kind,
        FaultKind::Permission
    );
    struct Leaf(u64);
    impl vsva_smmuv3::walk::WalkObserver for Leaf {
        fn step(&mut self, step: vsva_smmuv3::walk::WalkStep) {
            self.0 = step.entry;
        }
    }
    let mut leaf = Leaf(0);
    walk_stage1(&*mem, &cfg, rw.0, A::READ, &mut leaf).unwrap();
    let desc = leaf.0;
    assert_ne!(desc & D::AP_RO, 0);
    assert_ne!(desc & D::NG, 0, "user pages are ASID-tagged");
    p.munmap(Gva(rw.0 + 4096), 4096).unwrap();
    assert_eq!(
        walk_stage1(&*mem, &cfg, rw.0 + 4096, A::READ, &mut ())
            .unwrap_err()
            .kind,
        FaultKind::Translation
    );
    assert_eq!(
        rec.take(),
        [(rw.0, rw.0 + 4096), (rw.0 + 4096, rw.0 + 8192)]
    );
    drop(p);
    assert_eq!(frames.allocated_frames(), 0);
}
