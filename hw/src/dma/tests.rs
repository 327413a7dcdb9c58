//! Engine tests against the mock IOMMU, moving real bytes in host memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vsva_mem::PhysMem;

use proptest::prelude::*;
use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::{addr::Pasid, addr::SourceId, fault::FaultReason};

use super::mock::MockPort;
use super::regs::*;
use super::*;
use crate::memory::{HostMemory, PAGE_SIZE};

const COMP: u64 = 0x7000_0000;
/// Host frames for tests that choose where pages go, far above the ones `Rig::map` takes.
const FRAMES: u64 = 0x200_0000;

fn pasid(p: u32) -> Option<Pasid> {
    Some(Pasid::new(p).unwrap())
}

struct Rig {
    port: Arc<MockPort>,
    dev: Arc<DmaEngine>,
    next_frame: AtomicU64,
}

impl Rig {
    fn with_config(config: DmaEngineConfig, features: u64) -> Rig {
        let mem = HostMemory::new(64 << 20).unwrap();
        let port = MockPort::new(mem);
        let dev = Arc::new(DmaEngine::new(config, port.clone()).unwrap());
        dev.enable(features).unwrap();
        let rig = Rig {
            port,
            dev,
            next_frame: AtomicU64::new(0x10_0000),
        };
        for p in [None, pasid(1), pasid(2)] {
            rig.port.add_space(p);
            rig.map(p, COMP, PAGE_SIZE, true);
        }
        rig
    }

    fn new(features: u64) -> Rig {
        Rig::with_config(
            DmaEngineConfig::new(SourceId::new(0, 4, 0).unwrap()),
            features,
        )
    }

    /// Maps `[addr, addr + len)` to frames that are deliberately not contiguous.
    fn map(&self, p: Option<Pasid>, addr: u64, len: u64, writable: bool) {
        let first = addr / PAGE_SIZE;
        let last = (addr + len - 1) / PAGE_SIZE;
        for page in first..=last {
            let hpa = self.next_frame.fetch_add(3 * PAGE_SIZE, Ordering::Relaxed);
            self.port.map(p, page * PAGE_SIZE, hpa, writable);
        }
    }

    /// Maps `pages` pages from `addr` (page aligned) to the frames from `hpa` on,
    /// contiguous in host memory.
    fn map_frames(&self, p: Option<Pasid>, addr: u64, hpa: u64, pages: u64, writable: bool) {
        for i in 0..pages {
            self.port
                .map(p, addr + i * PAGE_SIZE, hpa + i * PAGE_SIZE, writable);
        }
    }

    /// Host memory, as the CPU sees it.
    fn host(&self, hpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.port.memory().read(hpa, &mut b).unwrap();
        b
    }

    fn submit(&self, d: Descriptor) {
        self.dev.portal_write(0, &d.encode()).unwrap();
    }

    fn record(&self, p: Option<Pasid>, at: u64) -> CompletionRecord {
        let b: [u8; 32] = self.port.read_dev(p, at, 32).try_into().unwrap();
        CompletionRecord::from_bytes(&b).unwrap()
    }

    /// Submits, runs and returns the record.
    fn run(&self, d: Descriptor) -> CompletionRecord {
        let at = d.completion.addr().unwrap();
        self.port.write_dev(d.pasid, at, &[0; 32]);
        self.submit(d);
        self.dev.process();
        self.record(d.pasid, at)
    }
}

fn desc(p: Option<Pasid>, op: Operation) -> Descriptor {
    Descriptor {
        pasid: p,
        privileged: false,
        block_on_fault: false,
        completion: CompletionRequest::Always(COMP),
        op,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const ALL: u64 = CTRL_PASID_EN | CTRL_PRIV_EN | CTRL_PRI_EN;

#[test]
fn memmove_copies_across_scattered_pages() {
    let rig = Rig::new(ALL);
    let p = pasid(1);
    let (src, dst, len) = (0x40_0123u64, 0x80_0ffdu64, 3 * PAGE_SIZE as usize + 77);
    rig.map(p, src, len as u64, false);
    rig.map(p, dst, len as u64, true);
    let data = pattern(len, 7);
    rig.port.write_dev(p, src, &data);
    let r = rig.run(desc(
        p,
        Operation::Memmove {
            src,
            dst,
            size: len as u32,
        },
    ));
    assert_eq!(r.status, CompletionStatus::Success);
    assert_eq!(r.bytes_completed as usize, len);
    assert_eq!(rig.port.read_dev(p, dst, len), data);
    let s = rig.dev.stats();
    assert_eq!(s.bytes_moved, len as u64);
    assert_eq!((s.submitted, s.completed, s.failed), (1, 1, 0));
    // Translated once per page of each operand (4 source, 5 destination) plus the record.
    assert_eq!(s.translations, 4 + 5 + 1);
}

#[test]
fn memmove_handles_overlap_both_ways() {
    let rig = Rig::new(ALL);
    let p = pasid(2);
    let base = 0x20_0000u64;
    let span = 4 * PAGE_SIZE as usize;
    rig.map(p, base, span as u64, true);
    for (src_off, dst_off, len) in [(100usize, 4000usize, 9000usize), (5000, 10, 9000)] {
        let init = pattern(span, src_off as u8);
        rig.port.write_dev(p, base, &init);
        let mut model = init.clone();
        model.copy_within(src_off..src_off + len, dst_off);
        let r = rig.run(desc(
            p,
            Operation::Memmove {
                src: base + src_off as u64,
                dst: base + dst_off as u64,
                size: len as u32,
            },
        ));
        assert_eq!(r.status, CompletionStatus::Success);
        assert_eq!(r.result, u8::from(dst_off > src_off), "copy direction");
        assert_eq!(rig.port.read_dev(p, base, span), model);
    }
}

#[test]
fn memmove_moves_each_run_contiguous_in_host_memory_with_one_copy() {
    let rig = Rig::new(ALL);
    let p = pasid(1);
    let (src, dst, pages) = (0x40_0000u64, 0x80_0000u64, 4u64);
    rig.map_frames(p, src, FRAMES, pages, false);
    // The destination's third page is elsewhere: runs are pages 0-1, 2 and 3.
    rig.map_frames(p, dst, FRAMES + 0x10_0000, pages, true);
    rig.map_frames(p, dst + 2 * PAGE_SIZE, FRAMES + 0x20_0000, 1, true);
    let len = pages * PAGE_SIZE;
    let data = pattern(len as usize, 11);
    rig.port.write_dev(p, src, &data);
    let r = rig.run(desc(
        p,
        Operation::Memmove {
            src,
            dst,
            size: len as u32,
        },
    ));
    assert_eq!((r.status, r.result), (CompletionStatus::Success, 0));
    assert_eq!(u64::from(r.bytes_completed), len);
    assert_eq!(rig.port.read_dev(p, dst, len as usize), data);
    let s = rig.dev.stats();
    assert_eq!(s.memmove_runs, 3);
    // Still translated once per page of each operand, plus the record.
    assert_eq!(s.translations, pages + pages + 1);

    // Moving the first three pages up by 0x800 in one contiguous mapping: one run, copied
    // from the top down.
    let base = 0x40_0000u64;
    let span = 4 * PAGE_SIZE as usize;
    rig.map_frames(p, base, FRAMES + 0x30_0000, 4, true);
    let init = pattern(span, 5);
    rig.port.write_dev(p, base, &init);
    let mut model = init.clone();
    model.copy_within(0..3 * PAGE_SIZE as usize, 0x800);
    let r = rig.run(desc(
        p,
        Operation::Memmove {
            src: base,
            dst: base + 0x800,
            size: 3 * PAGE_SIZE as u32,
        },
    ));
    assert_eq!((r.status, r.result), (CompletionStatus::Success, 1));
    assert_eq!(rig.port.read_dev(p, base, span), model);
    assert_eq!(rig.dev.stats().memmove_runs, 3 + 1);
}

#[test]
fn a_fault_inside_a_run_completes_the_bytes_before_it() {
    let rig = Rig::new(ALL & !CTRL_PRI_EN);
    let p = pasid(1);
    let (src, dst, pages) = (0x40_0000u64, 0x80_0000u64, 4u64);
    let len = pages * PAGE_SIZE;
    rig.map_frames(p, src, FRAMES, pages, false);
    rig.map_frames(p, dst, FRAMES + 0x10_0000, pages, true);
    let hole = dst + 2 * PAGE_SIZE;
    rig.port.unmap(p, hole);
    let data = pattern(len as usize, 21);
    rig.port.write_dev(p, src, &data);
    let op = Operation::Memmove {
        src: src + 0x10,
        dst,
        size: (len - 0x10) as u32,
    };
    let r = rig.run(desc(p, op));
    assert_eq!(r.status, CompletionStatus::TranslationFail);
    assert!(r.fault_write);
    assert_eq!(r.fault_addr, hole);
    assert_eq!(u64::from(r.bytes_completed), 2 * PAGE_SIZE);
    assert_eq!(
        rig.host(FRAMES + 0x10_0000, 2 * PAGE_SIZE as usize),
        data[0x10..0x10 + 2 * PAGE_SIZE as usize]
    );
    assert_eq!(
        rig.host(FRAMES + 0x10_0000 + 3 * PAGE_SIZE, PAGE_SIZE as usize),
        vec![0; PAGE_SIZE as usize],
        "nothing after the hole"
    );

    // Descending (the destination overlaps the source from above): the pages above the
    // hole are done, and the fault is at the hole's last byte.
    let base = 0xc0_0000u64;
    rig.map_frames(p, base, FRAMES + 0x20_0000, 5, true);
    let init = pattern(5 * PAGE_SIZE as usize, 3);
    rig.port.write_dev(p, base, &init);
    let hole = base + 2 * PAGE_SIZE;
    rig.port.unmap(p, hole);
    let r = rig.run(desc(
        p,
        Operation::Memmove {
            src: base + PAGE_SIZE + 0x100,
            dst: base + 2 * PAGE_SIZE + 0x100,
            size: 2 * PAGE_SIZE as u32,
        },
    ));
    assert_eq!((r.status, r.result), (CompletionStatus::TranslationFail, 1));
    assert_eq!(r.fault_addr, hole + PAGE_SIZE - 1);
    assert!(!r.fault_write, "the source's top byte faults first");
    assert_eq!(u64::from(r.bytes_completed), 0x100);
    let mut model = init.clone();
    let page3 = 3 * PAGE_SIZE as usize;
    model.copy_within(page3..page3 + 0x100, page3 + PAGE_SIZE as usize);
    let top = rig.host(FRAMES + 0x20_0000 + 4 * PAGE_SIZE, PAGE_SIZE as usize);
    assert_eq!(top, model[4 * PAGE_SIZE as usize..]);
}

#[test]
fn a_run_that_leaves_host_memory_stops_at_the_request_outside_it() {
    let rig = Rig::new(ALL);
    let p = pasid(2);
    let end = rig.port.memory().size();
    let (src, dst) = (0x40_0000u64, 0x80_0000u64);
    rig.map_frames(p, src, FRAMES, 2, false);
    // The destination's second page maps past the end of host memory.
    rig.map_frames(p, dst, end - PAGE_SIZE, 2, true);
    let data = pattern(2 * PAGE_SIZE as usize, 8);
    rig.port.write_dev(p, src, &data);
    let r = rig.run(desc(
        p,
        Operation::Memmove {
            src,
            dst,
            size: 2 * PAGE_SIZE as u32,
        },
    ));
    assert_eq!(r.status, CompletionStatus::AccessError);
    assert!(r.fault_write);
    assert_eq!(r.fault_addr, dst + PAGE_SIZE);
    assert_eq!(u64::from(r.bytes_completed), PAGE_SIZE);
    assert_eq!(
        rig.host(end - PAGE_SIZE, PAGE_SIZE as usize),
        data[..PAGE_SIZE as usize]
    );
}

#[test]
fn memmove_between_aliases_of_one_frame_is_a_memmove_in_host_memory() {
    // Two device pages, far apart, map the same frame: the descriptor's ranges do not
    // overlap, its bytes do. Within one request, either way round.
    let rig = Rig::new(ALL);
    let p = pasid(1);
    let (a, b, frame) = (0x40_0000u64, 0x90_0000u64, FRAMES);
    rig.map_frames(p, a, frame, 1, true);
    rig.map_frames(p, b, frame, 1, true);
    for (s_off, d_off) in [(0x100u64, 0x180u64), (0x180, 0x100)] {
        let init = pattern(PAGE_SIZE as usize, s_off as u8);
        rig.port.write_dev(p, a, &init);
        let mut model = init.clone();
        model.copy_within(s_off as usize..s_off as usize + 0x600, d_off as usize);
        let r = rig.run(desc(
            p,
            Operation::Memmove {
                src: a + s_off,
                dst: b + d_off,
                size: 0x600,
            },
        ));
        assert_eq!((r.status, r.result), (CompletionStatus::Success, 0));
        assert_eq!(rig.host(frame, PAGE_SIZE as usize), model);
    }

    // Frames scattered in host memory, the destination below the source there: copying
    // up from the bottom, run by run, reads every source byte before it is overwritten.
    rig.port.map(p, a, FRAMES + 0x10_0000, true);
    rig.port.map(p, a + PAGE_SIZE, FRAMES + 0x20_0000, true);
    rig.port.map(p, b, FRAMES + 0x10_0000, true);
    rig.port.map(p, b + PAGE_SIZE, FRAMES + 0x20_0000, true);
    let init = pattern(2 * PAGE_SIZE as usize, 77);
    rig.port.write_dev(p, a, &init);
    let runs = rig.dev.stats().memmove_runs;
    let mut model = init.clone();
    model.copy_within(0x180..0x180 + PAGE_SIZE as usize, 0x100);
    let r = rig.run(desc(
        p,
        Operation::Memmove {
            src: a + 0x180,
            dst: b + 0x100,
            size: PAGE_SIZE as u32,
        },
    ));
    assert_eq!(r.status, CompletionStatus::Success);
    assert_eq!(rig.port.read_dev(p, a, 2 * PAGE_SIZE as usize), model);
    assert_eq!(rig.dev.stats().memmove_runs - runs, 3);
}

#[test]
fn fill_repeats_the_pattern_from_the_destination() {
    let rig = Rig::new(ALL);
    let (dst, len) = (0x30_0ff9u64, 2 * PAGE_SIZE as usize + 3);
    rig.map(None, dst - 8, len as u64 + 16, true);
    rig.port.write_dev(None, dst - 8, &[0xee; 8]);
    let pat = 0x0807_0605_0403_0201u64;
    let r = rig.run(desc(
        None,
        Operation::Fill {
            pattern: pat,
            dst,
            size: len as u32,
        },
    ));
    assert_eq!(r.status, CompletionStatus::Success);
    let want: Vec<u8> = (0..len).map(|i| (i % 8) as u8 + 1).collect();
    assert_eq!(rig.port.read_dev(None, dst, len), want);
    assert_eq!(
        rig.port.read_dev(None, dst - 8, 8),
        [0xee; 8],
        "nothing before dst"
    );
    assert_eq!(
        rig.port.read_dev(None, dst + len as u64, 1),
        [0],
        "nothing after"
    );
}

#[test]
fn work_queued_while_another_thread_runs_the_engine_is_run() {
    // Each thread queues a descriptor and then calls `process`, which returns at once
    // when another thread's pass holds the engine: that pass must take the descriptor.
    // After each round, every thread's `process` having returned, nothing is queued.
    let rig = Rig::new(ALL);
    let (threads, rounds) = (4usize, 300u64);
    let nop = Descriptor {
        completion: CompletionRequest::None,
        ..desc(None, Operation::Nop)
    }
    .encode();
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for round in 1..=rounds {
                    rig.dev.portal_write(0, &nop).unwrap();
                    rig.dev.process();
                    barrier.wait();
                    let done = rig.dev.stats().completed;
                    assert_eq!(done, round * threads as u64, "left queued in round {round}");
                    barrier.wait();
                }
            });
        }
    });
    assert!(rig.dev.is_idle());
}

#[test]
fn fills_after_fills_and_compares_write_their_own_pattern() {
    // The engine keeps the last fill's bytes in its bounce buffer for the next fill with
    // the same pattern and phase: each fill below must still write exactly its own bytes.
    let rig = Rig::new(ALL);
    let (a, b) = (0x30_0000u64, 0x40_0000u64);
    rig.map(None, a, 2 * PAGE_SIZE, true);
    rig.map(None, b, 2 * PAGE_SIZE, true);
    let fill = |dst: u64, pattern: u64, size: usize| {
        rig.port.write_dev(None, dst, &vec![0xee; size + 8]);
        let r = rig.run(desc(
            None,
            Operation::Fill {
                pattern,
                dst,
                size: size as u32,
            },
        ));
        assert_eq!(r.status, CompletionStatus::Success);
        let bytes = pattern.to_le_bytes();
        let want: Vec<u8> = (0..size).map(|i| bytes[i % 8]).collect();
        assert_eq!(
            rig.port.read_dev(None, dst, size),
            want,
            "{pattern:#x} x {size}"
        );
        assert_eq!(rig.port.read_dev(None, dst + size as u64, 8), [0xee; 8]);
    };
    let (p, q) = (0x0807_0605_0403_0201u64, 0x1122_3344_5566_7788u64);
    fill(a, p, 100);
    fill(b, p, PAGE_SIZE as usize);
    fill(a, p, 40);
    fill(a + 3, p, 300);
    fill(b, q, 200);
    fill(a, p, 64);
    let r = rig.run(desc(
        None,
        Operation::Compare {
            src1: b,
            src2: a,
            size: 64,
        },
    ));
    assert_eq!((r.status, r.result), (CompletionStatus::Success, 1));
    // The compare read `q`'s bytes into the buffer the last fill of `p` left.
    fill(a, p, 64);
    // Longer than what the buffer holds of `p`: bytes 64.. are still `q`'s there.
    fill(b, p, 100);
    fill(a + PAGE_SIZE - 5, q, 21);
}

#[test]
fn compare_reports_equality_or_the_first_difference() {
    let rig = Rig::new(ALL);
    let p = pasid(1);
    let (a, b, len) = (0x50_0800u64, 0x60_0010u64, 3 * PAGE_SIZE as usize);
    rig.map(p, a, len as u64, false);
    rig.map(p, b, len as u64, false);
    let data = pattern(len, 3);
    rig.port.write_dev(p, a, &data);
    rig.port.write_dev(p, b, &data);
    let op = Operation::Compare {
        src1: a,
        src2: b,
        size: len as u32,
    };
    let r = rig.run(desc(p, op));
    assert_eq!((r.status, r.result), (CompletionStatus::Success, 0));
    assert_eq!(r.bytes_completed as usize, len);
    let at = 2 * PAGE_SIZE as usize + 5;
    rig.port.write_dev(p, b + at as u64, &[data[at] ^ 0x40]);
    let r = rig.run(desc(p, op));
    assert_eq!((r.status, r.result), (CompletionStatus::Success, 1));
    assert_eq!(
        r.bytes_completed as usize, at,
        "offset of the first difference"
    );
}

#[test]
fn fault_without_pri_completes_partially_with_the_exact_address() {
    let rig = Rig::new(ALL & !CTRL_PRI_EN);
    rig.port.set_pri(true);
    let p = pasid(1);
    let (src, dst, len) = (0x40_0000u64, 0x90_0f00u64, 3 * PAGE_SIZE);
    rig.map(p, src, len, false);
    rig.map(p, dst, len, true);
    let hole = 0x90_2000u64;
    rig.port.unmap(p, hole);
    rig.port.write_dev(p, src, &pattern(len as usize, 9));
    let mut d = desc(
        p,
        Operation::Memmove {
            src,
            dst,
            size: len as u32,
        },
    );
    d.block_on_fault = true;
    let r = rig.run(d);
    assert_eq!(r.status, CompletionStatus::PageFault);
    assert!(r.status.is_fault() && !CompletionStatus::Success.is_fault());
    assert!(r.fault_write);
    assert_eq!(r.fault_addr, hole);
    assert_eq!(r.fault_reason, FaultReason::Sfl2.code());
    let done = hole - dst;
    assert_eq!(u64::from(r.bytes_completed), done);
    assert_eq!(
        rig.port.read_dev(p, dst, done as usize),
        pattern(len as usize, 9)[..done as usize]
    );
    assert_eq!(rig.dev.stats().page_requests, 0);
    assert!(rig.port.take_requests().is_empty());

    // A read fault on the source: not a write.
    rig.port.unmap(p, src + PAGE_SIZE);
    let r = rig.run(desc(
        p,
        Operation::Compare {
            src1: src,
            src2: src,
            size: 2 * PAGE_SIZE as u32,
        },
    ));
    assert_eq!(r.status, CompletionStatus::PageFault);
    assert!(!r.fault_write);
    assert_eq!(r.fault_addr, src + PAGE_SIZE);
    assert_eq!(u64::from(r.bytes_completed), PAGE_SIZE);
}

#[test]
fn non_recoverable_fault_is_a_translation_failure() {
    let rig = Rig::new(ALL);
    // The PASID entry does not allow page requests.
    rig.port.set_pri(false);
    let p = pasid(2);
    rig.map(p, 0x1000, PAGE_SIZE, true);
    let mut d = desc(
        p,
        Operation::Fill {
            pattern: 1,
            dst: 0x1000,
            size: 2 * PAGE_SIZE as u32,
        },
    );
    d.block_on_fault = true;
    let r = rig.run(d);
    assert_eq!(r.status, CompletionStatus::TranslationFail);
    assert_eq!(r.fault_addr, 0x2000);
    assert_eq!(u64::from(r.bytes_completed), PAGE_SIZE);
    assert!(rig.port.take_requests().is_empty());
}

#[test]
fn page_request_then_success_resumes_and_completes() {
    let rig = Rig::new(ALL);
    rig.port.set_pri(true);
    let p = pasid(1);
    let (src, dst, len) = (0x40_0010u64, 0xa0_0000u64, 4 * PAGE_SIZE);
    rig.map(p, src, len, false);
    rig.map(p, dst, PAGE_SIZE, true);
    let data = pattern(len as usize, 42);
    rig.port.write_dev(p, src, &data);
    rig.port.write_dev(p, COMP, &[0; 32]);
    let mut d = desc(
        p,
        Operation::Memmove {
            src,
            dst,
            size: len as u32,
        },
    );
    d.block_on_fault = true;
    rig.submit(d);
    let mut served = 0;
    loop {
        rig.dev.process();
        let reqs = rig.port.take_requests();
        if reqs.is_empty() {
            break;
        }
        assert_eq!(reqs.len(), 1);
        let req = reqs[0];
        assert_eq!(
            (req.pasid, req.addr, req.access.write, req.last),
            (p, dst + (served + 1) * PAGE_SIZE, true, true)
        );
        assert_eq!(rig.dev.waiting_for_page_response(), 1);
        assert_eq!(
            rig.record(p, COMP).status,
            CompletionStatus::None,
            "not complete while waiting"
        );
        // The guest makes the page present and answers.
        rig.map(p, req.addr, PAGE_SIZE, true);
        rig.dev.page_response(PrgResponse {
            pasid: req.pasid,
            prgi: req.prgi,
            code: ResponseCode::Success,
        });
        served += 1;
    }
    assert_eq!(served, 3);
    let r = rig.record(p, COMP);
    assert_eq!(r.status, CompletionStatus::Success);
    assert_eq!(u64::from(r.bytes_completed), len);
    assert_eq!(rig.port.read_dev(p, dst, len as usize), data);
    assert!(rig.dev.is_idle());
    let s = rig.dev.stats();
    assert_eq!(
        (s.page_requests, s.page_responses, s.bytes_moved),
        (3, 3, len)
    );
}

#[test]
fn page_response_failure_codes_end_the_descriptor() {
    let rig = Rig::new(ALL);
    rig.port.set_pri(true);
    let p = pasid(1);
    let dst = 0xb0_0000u64;
    rig.map(p, dst, PAGE_SIZE, true);
    let mut d = desc(
        p,
        Operation::Fill {
            pattern: u64::MAX,
            dst: dst + 0x800,
            size: PAGE_SIZE as u32,
        },
    );
    d.block_on_fault = true;
    rig.port.write_dev(p, COMP, &[0; 32]);
    rig.submit(d);
    rig.dev.process();
    let req = rig.port.take_requests()[0];
    rig.dev.page_response(PrgResponse {
        pasid: p,
        prgi: req.prgi,
        code: ResponseCode::InvalidRequest,
    });
    rig.dev.process();
    let r = rig.record(p, COMP);
    assert_eq!(r.status, CompletionStatus::PageResponseError);
    assert_eq!((r.fault_addr, r.bytes_completed), (dst + PAGE_SIZE, 0x800));
    assert!(r.fault_write);

    // Response Failure: PRI stops until software clears RF.
    rig.submit(d);
    rig.dev.process();
    let req = rig.port.take_requests()[0];
    rig.dev.page_response(PrgResponse {
        pasid: p,
        prgi: req.prgi,
        code: ResponseCode::ResponseFailure,
    });
    rig.dev.process();
    assert_eq!(
        rig.record(p, COMP).status,
        CompletionStatus::PageResponseError
    );
    assert_ne!(rig.dev.mmio_read(REG_STATUS).unwrap() & STATUS_PRI_RF, 0);
    let r = rig.run(d);
    assert_eq!(
        r.status,
        CompletionStatus::PageFault,
        "no page request while RF"
    );
    assert!(rig.port.take_requests().is_empty());
    rig.dev.mmio_write(REG_STATUS, STATUS_PRI_RF).unwrap();
    rig.submit(d);
    rig.dev.process();
    assert_eq!(
        rig.port.take_requests().len(),
        1,
        "PRI back after clearing RF"
    );
}

#[test]
fn unexpected_page_response_sets_uprgi_and_changes_nothing() {
    let rig = Rig::new(ALL);
    rig.dev.page_response(PrgResponse {
        pasid: pasid(1),
        prgi: 17,
        code: ResponseCode::Success,
    });
    rig.dev.process();
    assert_ne!(rig.dev.mmio_read(REG_STATUS).unwrap() & STATUS_PRI_UPRGI, 0);
    assert!(rig.dev.is_idle());
    rig.dev.mmio_write(REG_STATUS, STATUS_PRI_UPRGI).unwrap();
    assert_eq!(rig.dev.mmio_read(REG_STATUS).unwrap(), STATUS_ENABLED);
}

#[test]
fn an_iommu_answering_success_without_mapping_does_not_hang_the_engine() {
    let rig = Rig::new(ALL);
    rig.port.set_pri(true);
    let device: Arc<dyn AtsEndpoint> = rig.dev.clone();
    rig.port
        .set_auto_response(Arc::downgrade(&device), ResponseCode::Success);
    let mut d = desc(
        pasid(1),
        Operation::Fill {
            pattern: 0,
            dst: 0xc0_0000,
            size: 64,
        },
    );
    d.block_on_fault = true;
    let r = rig.run(d);
    assert_eq!(r.status, CompletionStatus::PageFault);
    assert_eq!(
        rig.port.take_requests().len(),
        usize::from(engine::PRI_RETRY_LIMIT)
    );
}

#[test]
fn completion_record_fault_goes_through_pri_then_swerr() {
    let rig = Rig::new(ALL);
    rig.port.set_pri(true);
    let p = pasid(2);
    let rec = 0xd0_0040u64;
    let d = Descriptor {
        completion: CompletionRequest::Always(rec),
        ..desc(p, Operation::Nop)
    };
    rig.submit(d);
    rig.dev.process();
    let req = rig.port.take_requests()[0];
    assert_eq!((req.addr, req.access.write), (0xd0_0000, true));
    rig.map(p, rec, 32, true);
    rig.dev.page_response(PrgResponse {
        pasid: p,
        prgi: req.prgi,
        code: ResponseCode::Success,
    });
    rig.dev.process();
    assert_eq!(rig.record(p, rec).status, CompletionStatus::Success);

    // Without PRI the record cannot be written: the software error register reports it.
    rig.port.unmap(p, rec);
    rig.port.set_pri(false);
    rig.submit(d);
    rig.dev.process();
    let e = rig.dev.software_error().unwrap();
    assert_eq!(
        (e.status, e.pasid, e.addr, e.opcode),
        (CompletionStatus::CompletionAddrTranslation, p, rec, 0)
    );
    let w0 = rig.dev.mmio_read(REG_SWERR0).unwrap();
    assert_eq!(w0 & SWERR_VALID, SWERR_VALID);
    assert_eq!((w0 >> 8) & 0xff, 0x1a);
    assert_eq!(rig.dev.mmio_read(REG_SWERR1).unwrap(), rec);
    rig.dev.mmio_write(REG_SWERR0, SWERR_VALID).unwrap();
    assert_eq!(rig.dev.software_error(), None);
}

#[test]
fn drain_waits_for_a_parked_descriptor() {
    let rig = Rig::new(ALL);
    rig.port.set_pri(true);
    let p = pasid(1);
    let rec2 = COMP + 32;
    rig.port.write_dev(p, COMP, &[0; 64]);
    let mut fill = desc(
        p,
        Operation::Fill {
            pattern: 5,
            dst: 0xe0_0000,
            size: 16,
        },
    );
    fill.block_on_fault = true;
    rig.submit(fill);
    rig.submit(Descriptor {
        completion: CompletionRequest::Always(rec2),
        ..desc(p, Operation::Drain)
    });
    rig.dev.process();
    assert_eq!(rig.record(p, rec2).status, CompletionStatus::None);
    let req = rig.port.take_requests()[0];
    rig.map(p, req.addr, PAGE_SIZE, true);
    rig.dev.page_response(PrgResponse {
        pasid: p,
        prgi: req.prgi,
        code: ResponseCode::Success,
    });
    assert_eq!(rig.dev.process(), 2);
    assert_eq!(rig.record(p, COMP).status, CompletionStatus::Success);
    assert_eq!(rig.record(p, rec2).status, CompletionStatus::Success);
}

/// An invalidation that completes between a run's translation and its bytes moving (the
/// IOMMU's drain) makes the engine translate again: the bytes go to the page's new frame,
/// none to the old one.
#[test]
fn a_run_translated_before_an_invalidation_completed_is_translated_again() {
    let rig = Rig::new(ALL);
    let p = pasid(1);
    let (src, dst, pages) = (0x40_0000u64, 0x80_0000u64, 2u64);
    rig.map_frames(p, src, FRAMES, pages, false);
    let (old, new) = (FRAMES + 0x10_0000, FRAMES + 0x20_0000);
    rig.map_frames(p, dst, old, pages, true);
    let len = pages * PAGE_SIZE;
    let data = pattern(len as usize, 3);
    rig.port.write_dev(p, src, &data);
    // The second destination page moves to `new` while its translation is in flight.
    rig.port
        .set_drain_in_remap(dst + PAGE_SIZE, new + PAGE_SIZE, 1);
    let r = rig.run(desc(
        p,
        Operation::Memmove {
            src,
            dst,
            size: len as u32,
        },
    ));
    assert_eq!(r.status, CompletionStatus::Success);
    let page = PAGE_SIZE as usize;
    assert_eq!(rig.host(old, page), data[..page], "the unmoved page");
    assert_eq!(
        rig.host(old + PAGE_SIZE, page),
        vec![0; page],
        "the old frame was written after the invalidation completed"
    );
    assert_eq!(rig.host(new + PAGE_SIZE, page), data[page..]);
    assert_eq!(rig.dev.stats().drain_refused, 1);
}

/// Invalidations that keep completing between translation and move end the request with
/// a translation failure after [`DRAIN_RETRY_LIMIT`](super::engine::DRAIN_RETRY_LIMIT) refusals, having moved nothing.
#[test]
fn a_stream_of_invalidations_fails_the_request_instead_of_looping() {
    let rig = Rig::new(ALL);
    let p = pasid(1);
    let dst = 0x80_0000u64;
    let old = FRAMES + 0x10_0000;
    rig.map_frames(p, dst, old, 1, true);
    rig.port.set_drain_in_remap(dst, old, u32::MAX);
    let r = rig.run(desc(
        p,
        Operation::Fill {
            pattern: u64::from_ne_bytes([9; 8]),
            dst,
            size: 64,
        },
    ));
    assert_eq!(r.status, CompletionStatus::TranslationFail);
    assert_eq!(
        (r.fault_reason, r.fault_addr, r.bytes_completed),
        (0, dst, 0)
    );
    assert_eq!(rig.host(old, 64), vec![0; 64]);
    assert_eq!(
        rig.dev.stats().drain_refused,
        u64::from(super::engine::DRAIN_RETRY_LIMIT)
    );
}

#[test]
fn a_translation_completion_an_invalidation_overtook_is_not_used() {
    let rig = Rig::new(ALL | CTRL_ATS_EN);
    let p = pasid(1);
    let dst = 0x80_0000u64;
    let (old, new) = (FRAMES, FRAMES + 0x10_0000);
    rig.map_frames(p, dst, old, 1, true);
    // The completion for dst is made from the old frame; before it reaches the device
    // the page moves to the new frame and the device TLB is invalidated.
    let endpoint: Arc<dyn AtsEndpoint> = rig.dev.clone();
    rig.port
        .set_remap_in_translate(Arc::downgrade(&endpoint), dst, new);
    let fill = desc(
        p,
        Operation::Fill {
            pattern: u64::from_ne_bytes([7; 8]),
            dst,
            size: 64,
        },
    );
    assert_eq!(rig.run(fill).status, CompletionStatus::Success);
    assert_eq!(rig.host(old, 64), vec![0; 64], "the old frame was written");
    assert_eq!(rig.host(new, 64), vec![7; 64]);
    let s = rig.dev.stats();
    assert_eq!((s.ats_overtaken, s.devtlb_invalidations), (1, 1));
    // The refused completion is recorded: the request, the old frame, the invalidation.
    let refused = rig.dev.take_overtaken_completions();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let r = refused[0];
    assert_eq!((r.pasid, r.addr), (p, dst));
    assert_eq!(r.completion.page.hpa_of(dst), vsva_vtd::addr::Hpa(old));
    match r.by {
        OvertakenBy::Invalidation(inv) => {
            assert_eq!(inv.pasid, p);
            assert!(inv.range.overlaps(dst, dst + 0xfff), "{inv:?}");
        }
        by => panic!("overtaken by {by:?}"),
    }
    // What the device TLB keeps is the new frame's translation.
    assert_eq!(rig.run(fill).status, CompletionStatus::Success);
    assert_eq!(rig.host(old, 64), vec![0; 64]);
    assert_eq!(rig.dev.stats().ats_overtaken, 1);
    assert_eq!(rig.dev.take_overtaken_completions(), []);
}

#[test]
fn stale_devtlb_entry_is_used_until_invalidated() {
    let rig = Rig::new(ALL | CTRL_ATS_EN);
    let p = pasid(1);
    let (src, dst) = (0x40_0000u64, 0x80_0000u64);
    rig.map(p, src, PAGE_SIZE, false);
    rig.map(p, dst, PAGE_SIZE, true);
    let fill = |byte: u8| {
        desc(
            p,
            Operation::Fill {
                pattern: u64::from_ne_bytes([byte; 8]),
                dst,
                size: 64,
            },
        )
    };
    assert_eq!(rig.run(fill(1)).status, CompletionStatus::Success);
    let misses = rig.dev.stats().devtlb_misses;
    assert_eq!(misses, 2, "destination and record");
    // The IOMMU's tables move dst to a new frame; the device TLB is not told.
    let current = |rig: &Rig| rig.port.read_dev(p, dst, 64);
    assert_eq!(current(&rig), vec![1; 64]);
    rig.map(p, dst, PAGE_SIZE, true);
    assert_eq!(current(&rig), vec![0; 64], "the new frame is empty");
    assert_eq!(rig.run(fill(2)).status, CompletionStatus::Success);
    assert_eq!(
        current(&rig),
        vec![0; 64],
        "the write went to the old frame"
    );
    let s = rig.dev.stats();
    assert_eq!((s.devtlb_misses, s.devtlb_hits), (2, 2));
    // An invalidation for another PASID or another page does not help.
    assert_eq!(
        rig.dev.invalidate_devtlb(DevTlbInvalidation::from_size_bit(
            pasid(2),
            false,
            dst,
            false
        )),
        0
    );
    assert_eq!(
        rig.dev.invalidate_devtlb(DevTlbInvalidation::from_size_bit(
            p,
            false,
            dst + PAGE_SIZE,
            false
        )),
        0
    );
    assert_eq!(rig.run(fill(3)).status, CompletionStatus::Success);
    assert_eq!(current(&rig), vec![0; 64]);
    assert_eq!(
        rig.dev
            .invalidate_devtlb(DevTlbInvalidation::from_size_bit(p, false, dst, false)),
        1
    );
    assert_eq!(rig.run(fill(4)).status, CompletionStatus::Success);
    assert_eq!(
        current(&rig),
        vec![4; 64],
        "after invalidation the new frame is used"
    );
    assert_eq!(rig.dev.stats().devtlb_invalidations, 3);
}

#[test]
fn ats_translated_request_refused_by_the_iommu() {
    let rig = Rig::new(ALL | CTRL_ATS_EN);
    let p = pasid(1);
    rig.map(p, 0x1000, PAGE_SIZE, true);
    rig.port.set_translated_ok(false);
    let d = Descriptor {
        completion: CompletionRequest::None,
        ..desc(
            p,
            Operation::Fill {
                pattern: 1,
                dst: 0x1000,
                size: 8,
            },
        )
    };
    rig.submit(d);
    rig.dev.process();
    let e = rig.dev.software_error().unwrap();
    assert_eq!(
        (e.status, e.addr),
        (CompletionStatus::TranslationFail, 0x1000)
    );
    assert_eq!(rig.port.read_dev(p, 0x1000, 8), [0; 8]);
}

#[test]
fn invalid_descriptors_report_their_status() {
    let rig = Rig::with_config(
        DmaEngineConfig {
            max_transfer_shift: 16,
            ..DmaEngineConfig::new(SourceId::new(0, 4, 0).unwrap())
        },
        ALL,
    );
    let p = pasid(1);
    let good = desc(
        p,
        Operation::Fill {
            pattern: 0,
            dst: 0x1000,
            size: 8,
        },
    )
    .to_raw();
    let cases = [
        (
            RawDescriptor {
                flags_opcode: (good.flags_opcode & 0xff_ffff) | 0x09 << 24,
                ..good
            },
            CompletionStatus::BadOpcode,
            0,
        ),
        (
            RawDescriptor {
                flags_opcode: good.flags_opcode | 0x10,
                ..good
            },
            CompletionStatus::InvalidFlags,
            0x10,
        ),
        (
            RawDescriptor { rsvd: 1, ..good },
            CompletionStatus::NonzeroReserved,
            0,
        ),
        (
            RawDescriptor {
                xfer_size: (1 << 16) + 1,
                ..good
            },
            CompletionStatus::TransferSize,
            0,
        ),
    ];
    for (raw, status, flags) in cases {
        rig.port.write_dev(p, COMP, &[0; 32]);
        rig.dev.portal_write(0x40, &raw.to_bytes()).unwrap();
        rig.dev.process();
        let r = rig.record(p, COMP);
        assert_eq!((r.status, r.invalid_flags), (status, flags), "{raw:x?}");
    }
    assert_eq!(rig.dev.stats().failed, 4);
    assert_eq!(rig.dev.software_error(), None);

    // Misaligned record address: only the software error register can say it.
    let raw = RawDescriptor {
        completion_addr: COMP + 8,
        ..good
    };
    rig.dev.portal_write(0, &raw.to_bytes()).unwrap();
    rig.dev.process();
    assert_eq!(
        rig.dev.software_error().unwrap().status,
        CompletionStatus::CompletionAddrAlign
    );
    // A second error while one is held sets overflow; an error that ranks before the
    // alignment check still never writes a record to a misaligned address.
    let before = rig.port.read_dev(p, COMP, 64);
    let raw = RawDescriptor {
        flags_opcode: (raw.flags_opcode & 0xff_ffff) | 0x09 << 24,
        completion_addr: COMP + 4,
        ..raw
    };
    rig.dev.portal_write(0, &raw.to_bytes()).unwrap();
    rig.dev.process();
    assert_ne!(rig.dev.mmio_read(REG_SWERR0).unwrap() & SWERR_OVERFLOW, 0);
    assert_eq!(rig.port.read_dev(p, COMP, 64), before);
    assert_eq!(rig.dev.stats().software_errors, 2);
}

#[test]
fn pasid_and_privilege_need_their_enables() {
    let rig = Rig::new(CTRL_PASID_EN);
    let mut d = desc(pasid(1), Operation::Nop);
    d.privileged = true;
    rig.submit(d);
    rig.dev.process();
    assert_eq!(
        rig.dev.software_error().unwrap().status,
        CompletionStatus::PrivilegeBad
    );
    rig.dev.mmio_write(REG_SWERR0, SWERR_VALID).unwrap();

    let rig = Rig::new(0);
    rig.submit(desc(pasid(1), Operation::Nop));
    rig.dev.process();
    assert_eq!(
        rig.dev.software_error().unwrap().status,
        CompletionStatus::PrivilegeBad
    );
    // Without PASID the same engine works.
    assert_eq!(
        rig.run(desc(None, Operation::Nop)).status,
        CompletionStatus::Success
    );
}

#[test]
fn registers_and_portal_reject_bad_accesses_without_change() {
    let config = DmaEngineConfig {
        ats: false,
        wq_size: 2,
        ..DmaEngineConfig::new(SourceId::new(1, 2, 3).unwrap())
    };
    let rig = Rig::with_config(config, ALL);
    let cap = rig.dev.mmio_read(REG_CAP).unwrap();
    assert_eq!(cap, config.cap());
    assert_eq!(cap & (CAP_PASID | CAP_ATS | CAP_PRS), CAP_PASID | CAP_PRS);
    assert_eq!((cap >> CAP_PASID_WIDTH_SHIFT) & 0xff, 20);
    assert_eq!((cap >> CAP_WQ_SIZE_SHIFT) & 0xffff, 2);
    let ctrl = rig.dev.mmio_read(REG_CTRL).unwrap();
    assert_eq!(ctrl, ALL | CTRL_ENABLE);
    assert_eq!(
        rig.dev.mmio_write(REG_CTRL, ctrl | CTRL_ATS_EN),
        Err(DmaError::Unsupported(CTRL_ATS_EN))
    );
    assert_eq!(
        rig.dev.mmio_write(REG_CTRL, ctrl & !CTRL_PRI_EN),
        Err(DmaError::ConfigWhileEnabled)
    );
    assert_eq!(
        rig.dev.mmio_write(REG_CAP, 0),
        Err(DmaError::ReadOnly(REG_CAP))
    );
    assert_eq!(rig.dev.mmio_read(0x18), Err(DmaError::NoRegister(0x18)));
    assert_eq!(
        rig.dev.mmio_write(REG_STATUS, 1),
        Err(DmaError::ReadOnly(REG_STATUS))
    );
    assert_eq!(rig.dev.mmio_read(REG_CTRL).unwrap(), ctrl);

    let nop = desc(None, Operation::Nop).encode();
    assert_eq!(
        rig.dev.portal_write(8, &nop),
        Err(DmaError::PortalOffset(8))
    );
    assert_eq!(
        rig.dev.portal_write(PORTAL_SIZE, &nop),
        Err(DmaError::PortalOffset(PORTAL_SIZE))
    );
    rig.dev.portal_write(0xfc0, &nop).unwrap();
    rig.dev.portal_write(0, &nop).unwrap();
    assert_eq!(rig.dev.portal_write(0, &nop), Err(DmaError::Retry));
    assert_eq!(rig.dev.stats().submitted, 2);
    assert_eq!(rig.dev.process(), 2);

    // Disabling needs an idle engine.
    rig.port.set_pri(true);
    let mut d = desc(
        pasid(1),
        Operation::Fill {
            pattern: 0,
            dst: 0xf0_0000,
            size: 8,
        },
    );
    d.block_on_fault = true;
    rig.submit(d);
    rig.dev.process();
    assert_eq!(rig.dev.mmio_write(REG_CTRL, ALL), Err(DmaError::Busy));
    let req = rig.port.take_requests()[0];
    rig.dev.page_response(PrgResponse {
        pasid: req.pasid,
        prgi: req.prgi,
        code: ResponseCode::InvalidRequest,
    });
    rig.dev.process();
    rig.dev.mmio_write(REG_CTRL, ALL).unwrap();
    assert_eq!(rig.dev.mmio_read(REG_STATUS).unwrap() & STATUS_ENABLED, 0);
    assert_eq!(rig.dev.portal_write(0, &nop), Err(DmaError::Disabled));
    assert!(DmaEngine::new(
        DmaEngineConfig {
            pri_capacity: 600,
            ..config
        },
        rig.port.clone()
    )
    .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn memmove_matches_a_memmove_model(
        src_off in 0usize..3 * PAGE_SIZE as usize,
        dst_off in 0usize..3 * PAGE_SIZE as usize,
        len in 1usize..PAGE_SIZE as usize * 2,
        ats: bool,
    ) {
        let rig = Rig::new(ALL | if ats { CTRL_ATS_EN } else { 0 });
        let p = pasid(1);
        let base = 0x100_0000u64;
        let span = 5 * PAGE_SIZE as usize;
        rig.map(p, base, span as u64, true);
        let init = pattern(span, src_off as u8 ^ len as u8);
        rig.port.write_dev(p, base, &init);
        let mut model = init.clone();
        model.copy_within(src_off..src_off + len, dst_off);
        let r = rig.run(desc(p, Operation::Memmove {
            src: base + src_off as u64,
            dst: base + dst_off as u64,
            size: len as u32,
        }));
        prop_assert_eq!(r.status, CompletionStatus::Success);
        prop_assert_eq!(rig.port.read_dev(p, base, span), model);
    }

    /// Two device windows, far apart or the same, map frames that are contiguous in host
    /// memory and overlap there at any page distance: whatever the offsets, a memmove from
    /// one window to the other is a memmove of the bytes in host memory.
    #[test]
    fn memmove_between_aliased_windows_is_a_memmove_in_host_memory(
        shift in -2i64..=2,
        same_window: bool,
        src_off in 0u64..2 * PAGE_SIZE,
        dst_off in 0u64..2 * PAGE_SIZE,
        len in 1u64..=2 * PAGE_SIZE,
        ats: bool,
    ) {
        let rig = Rig::new(ALL | if ats { CTRL_ATS_EN } else { 0 });
        let p = pasid(1);
        let (a, b) = (0x100_0000u64, 0x300_0000u64);
        let pages = 4;
        let fa = FRAMES + 2 * PAGE_SIZE;
        let fb = fa.checked_add_signed(shift * PAGE_SIZE as i64).unwrap();
        rig.map_frames(p, a, fa, pages, true);
        rig.map_frames(p, b, fb, pages, true);
        let span = 8 * PAGE_SIZE as usize;
        let init = pattern(span, src_off as u8 ^ dst_off as u8);
        rig.port.memory().write(FRAMES, &init).unwrap();
        let (dst, dst_frame) = if same_window { (a, fa) } else { (b, fb) };
        let mut model = init.clone();
        let from = (fa + src_off - FRAMES) as usize;
        model.copy_within(from..from + len as usize, (dst_frame + dst_off - FRAMES) as usize);
        let r = rig.run(desc(p, Operation::Memmove {
            src: a + src_off,
            dst: dst + dst_off,
            size: len as u32,
        }));
        prop_assert_eq!(r.status, CompletionStatus::Success);
        prop_assert_eq!(
            r.result,
            u8::from(same_window && dst_off > src_off && dst_off - src_off < len)
        );
        prop_assert_eq!(rig.host(FRAMES, span), model);
    }

    #[test]
    fn arbitrary_descriptor_bytes_never_panic_and_always_complete(
        descs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 64), 1..4),
        features in 0u64..32,
    ) {
        let rig = Rig::new(features & !CTRL_ENABLE);
        rig.port.set_pri(true);
        // Small, mapped targets so that some random descriptors really run.
        rig.map(None, 0, 4 * PAGE_SIZE, true);
        for bytes in &descs {
            let mut b = [0u8; 64];
            b.copy_from_slice(bytes);
            // Keep transfers short: random sizes would take long, not break anything.
            b[34] = 0;
            b[35] = 0;
            rig.dev.portal_write(0, &b).unwrap();
        }
        rig.dev.process();
        // Without block-on-fault PRI never parks; with it, answer every request.
        loop {
            let reqs = rig.port.take_requests();
            if reqs.is_empty() {
                break;
            }
            for req in reqs {
                rig.dev.page_response(PrgResponse {
                    pasid: req.pasid,
                    prgi: req.prgi,
                    code: ResponseCode::InvalidRequest,
                });
            }
            rig.dev.process();
        }
        prop_assert!(rig.dev.is_idle());
        let s = rig.dev.stats();
        prop_assert_eq!(s.completed, descs.len() as u64);
    }
}

#[test]
fn pcie_capabilities_follow_the_configuration() {
    let sid = SourceId::new(1, 2, 3).unwrap();
    let narrow = DmaEngineConfig {
        pasid_width: 8,
        ats_queue_depth: 5,
        ..DmaEngineConfig::new(sid)
    };
    let rig = Rig::with_config(narrow, ALL);
    let caps = AtsEndpoint::pcie_capabilities(&*rig.dev);
    assert_eq!(caps.ats.map(|a| a.queue_depth()), Some(5));
    assert!(caps.pri);
    assert_eq!(caps.pasid_width, Some(8));
    assert_eq!(
        (rig.dev.mmio_read(REG_CAP).unwrap() >> CAP_PASID_WIDTH_SHIFT) & 0xff,
        8
    );
    let full = DmaEngineConfig::new(sid).pcie_capabilities();
    assert_eq!(full.ats.map(|a| a.queue_depth()), Some(32));
    assert!(full.pri);
    assert_eq!(full.pasid_width, Some(20));
    let none = DmaEngineConfig {
        ats: false,
        pasid: false,
        prs: false,
        ..narrow
    };
    assert_eq!(none.pcie_capabilities(), PcieCapabilities::default());
    for bad in [
        DmaEngineConfig {
            pasid_width: 0,
            ..narrow
        },
        DmaEngineConfig {
            pasid_width: 21,
            ..narrow
        },
        DmaEngineConfig {
            ats_queue_depth: 32,
            ..narrow
        },
    ] {
        assert_eq!(
            DmaEngine::new(bad, rig.port.clone()).err(),
            Some(DmaError::BadConfig)
        );
    }
}

/// What a page of a random device window is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageKind {
    Hole,
    ReadOnly,
    Writable,
}

/// A page of a random device window: its kind, and whether its frame follows the previous
/// page's in host memory.
fn page_spec() -> impl Strategy<Value = (PageKind, bool)> {
    let kind = prop_oneof![
        1 => Just(PageKind::Hole),
        1 => Just(PageKind::ReadOnly),
        6 => Just(PageKind::Writable),
    ];
    (kind, proptest::bool::weighted(0.75))
}

/// 4 KiB pages of each random window.
const WINDOW_PAGES: u64 = 16;
/// The size of a large page of a random window.
const LARGE: u64 = 4 * PAGE_SIZE;

/// A random device window of [`WINDOW_PAGES`] pages at `base`: 4 KiB pages and 16 KiB
/// pages (`large[i]`: the `i`-th 16 KiB of the window is one page, of its first 4 KiB's
/// kind), each page's frames contiguous with the page before or elsewhere. `pages` holds
/// each 4 KiB's frame and kind: the model of the mappings.
#[derive(Clone, Debug)]
struct Window {
    base: u64,
    pages: Vec<(u64, PageKind)>,
}

impl Window {
    fn build(base: u64, next: &mut u64, specs: &[(PageKind, bool)], large: &[bool]) -> Window {
        let mut pages = Vec::new();
        for (slot, &big) in large.iter().enumerate() {
            let specs = &specs[slot * 4..slot * 4 + 4];
            if big {
                if !specs[0].1 {
                    *next += 3 * PAGE_SIZE;
                }
                *next = next.next_multiple_of(LARGE);
                (0..4).for_each(|i| pages.push((*next + i * PAGE_SIZE, specs[0].0)));
                *next += LARGE;
            } else {
                for &(kind, follows) in specs {
                    if !follows {
                        *next += 2 * PAGE_SIZE;
                    }
                    pages.push((*next, kind));
                    *next += PAGE_SIZE;
                }
            }
        }
        Window { base, pages }
    }

    /// Maps the window in `rig`'s port.
    fn map(&self, rig: &Rig, p: Option<Pasid>, large: &[bool]) {
        for (i, &(hpa, kind)) in self.pages.iter().enumerate() {
            let addr = self.base + i as u64 * PAGE_SIZE;
            let big = large[i / 4];
            if kind == PageKind::Hole || (big && i % 4 != 0) {
                continue;
            }
            let size = if big { LARGE } else { PAGE_SIZE };
            rig.port
                .map_page(p, addr, hpa, size, kind == PageKind::Writable);
        }
    }

    /// The frame of device address `addr` if the window maps it for `write`.
    fn frame(&self, addr: u64, write: bool) -> Option<u64> {
        let i = addr.checked_sub(self.base)? / PAGE_SIZE;
        let &(hpa, kind) = self.pages.get(i as usize)?;
        let allowed = match kind {
            PageKind::Hole => false,
            PageKind::ReadOnly => !write,
            PageKind::Writable => true,
        };
        allowed.then_some(hpa + addr % PAGE_SIZE)
    }
}

/// The outcome of a memmove byte by byte, in the descriptor's direction, each byte's
/// source translated before its destination: the bytes of host memory from `FRAMES` on,
/// and the record's status, fault address, fault direction and bytes completed.
fn memmove_byte_by_byte(
    host: &mut [u8],
    src: (&Window, u64),
    dst: (&Window, u64),
    len: u64,
) -> (CompletionStatus, u64, bool, u64) {
    let descending = dst.1 > src.1 && dst.1 - src.1 < len;
    for k in 0..len {
        let i = if descending { len - 1 - k } else { k };
        let (s, d) = (src.1 + i, dst.1 + i);
        let Some(hs) = src.0.frame(s, false) else {
            return (CompletionStatus::TranslationFail, s, false, k);
        };
        let Some(hd) = dst.0.frame(d, true) else {
            return (CompletionStatus::TranslationFail, d, true, k);
        };
        host[(hd - FRAMES) as usize] = host[(hs - FRAMES) as usize];
    }
    (CompletionStatus::Success, 0, false, len)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A memmove over random mappings (holes, read-only pages, 4 KiB and 16 KiB pages,
    /// frames contiguous or not), between two windows or within one (either direction),
    /// leaves the same bytes and the same record whether the IOMMU answers for runs of
    /// pages or for one page at a time, and both are the memmove done byte by byte up to
    /// the first byte that faults.
    #[test]
    fn memmove_over_runs_matches_the_page_by_page_memmove(
        src_specs in proptest::collection::vec(page_spec(), WINDOW_PAGES as usize),
        dst_specs in proptest::collection::vec(page_spec(), WINDOW_PAGES as usize),
        src_large in proptest::collection::vec(proptest::bool::weighted(0.3), 4),
        dst_large in proptest::collection::vec(proptest::bool::weighted(0.3), 4),
        same_window: bool,
        src_off in 0..WINDOW_PAGES * PAGE_SIZE,
        dst_off in 0..WINDOW_PAGES * PAGE_SIZE,
        len_seed: u64,
        ats: bool,
    ) {
        let p = pasid(1);
        let mut next = FRAMES;
        let a = Window::build(0x100_0000, &mut next, &src_specs, &src_large);
        let b = Window::build(0x200_0000, &mut next, &dst_specs, &dst_large);
        let (dst_window, dst_large) = if same_window { (&a, &src_large) } else { (&b, &dst_large) };
        let room = WINDOW_PAGES * PAGE_SIZE - src_off.max(dst_off);
        let len = 1 + len_seed % room;
        let (src, dst) = (a.base + src_off, dst_window.base + dst_off);
        let span = (next - FRAMES) as usize;
        let init = pattern(span, len as u8);
        let mut model = init.clone();
        let (status, fault_addr, fault_write, done) =
            memmove_byte_by_byte(&mut model, (&a, src), (dst_window, dst), len);
        let descending = dst > src && dst - src < len;

        let mut outcomes = Vec::new();
        for lookahead in [false, true] {
            let rig = Rig::new(ALL | if ats { CTRL_ATS_EN } else { 0 });
            rig.port.set_lookahead(lookahead);
            a.map(&rig, p, &src_large);
            if !same_window {
                b.map(&rig, p, dst_large);
            }
            rig.port.memory().write(FRAMES, &init).unwrap();
            let r = rig.run(desc(p, Operation::Memmove { src, dst, size: len as u32 }));
            prop_assert_eq!(r.status, status, "lookahead {}", lookahead);
            prop_assert_eq!(u64::from(r.bytes_completed), done);
            prop_assert_eq!(r.result, u8::from(descending));
            if status != CompletionStatus::Success {
                prop_assert_eq!((r.fault_addr, r.fault_write), (fault_addr, fault_write));
            }
            prop_assert!(rig.host(FRAMES, span) == model, "bytes differ, lookahead {}", lookahead);
            outcomes.push(rig.dev.stats());
        }
        prop_assert!(outcomes[1].translations <= outcomes[0].translations);
        prop_assert!(outcomes[1].memmove_runs <= outcomes[0].memmove_runs);
    }
}

/// A run of one translation is checked once in each operand: with ATS, a 16 KiB page is
/// one translated request of the source and one of the destination, not four of each;
/// without ATS and with the IOMMU answering for runs, 64 KiB contiguous in both operands is
/// one translation of each and one copy.
#[test]
fn a_run_of_one_translation_is_checked_and_moved_once() {
    let p = pasid(1);
    let (src, dst) = (0x40_0000u64, 0x80_0000u64);
    let no_record = |op| Descriptor {
        completion: CompletionRequest::None,
        ..desc(p, op)
    };
    let rig = Rig::new(ALL | CTRL_ATS_EN);
    rig.port.map_page(p, src, FRAMES, LARGE, false);
    rig.port.map_page(p, dst, FRAMES + LARGE, LARGE, true);
    let data = pattern(LARGE as usize, 4);
    rig.port.memory().write(FRAMES, &data).unwrap();
    let op = Operation::Memmove {
        src,
        dst,
        size: LARGE as u32,
    };
    rig.submit(no_record(op));
    assert_eq!(rig.dev.process(), 1);
    assert_eq!(rig.host(FRAMES + LARGE, LARGE as usize), data);
    assert_eq!(rig.port.translated_checks(), 2);
    let s = rig.dev.stats();
    assert_eq!((s.completed, s.failed, s.memmove_runs), (1, 0, 1));
    assert_eq!(s.devtlb_misses, 2);

    let rig = Rig::new(ALL);
    rig.port.set_lookahead(true);
    let pages = 16;
    rig.map_frames(p, src, FRAMES, pages, false);
    rig.map_frames(p, dst, FRAMES + 0x10_0000, pages, true);
    let data = pattern((pages * PAGE_SIZE) as usize, 9);
    rig.port.memory().write(FRAMES, &data).unwrap();
    rig.submit(no_record(Operation::Memmove {
        src,
        dst,
        size: (pages * PAGE_SIZE) as u32,
    }));
    assert_eq!(rig.dev.process(), 1);
    assert_eq!(rig.host(FRAMES + 0x10_0000, data.len()), data);
    let s = rig.dev.stats();
    assert_eq!((s.translations, s.memmove_runs), (2, 1));
}

/// A run that leaves host memory several pages in moves the requests before the first
/// one outside it, which fails at its own address, whether the IOMMU answers for runs or
/// for pages (which only changes where requests begin).
#[test]
fn a_long_run_that_leaves_host_memory_stops_at_the_first_request_outside_it() {
    for lookahead in [false, true] {
        let rig = Rig::new(ALL);
        rig.port.set_lookahead(lookahead);
        let p = pasid(2);
        let end = rig.port.memory().size();
        let (src, dst, pages) = (0x40_0000u64, 0x80_0000u64, 6);
        rig.map_frames(p, src, FRAMES, pages, false);
        // The destination's last two pages map past the end of host memory.
        rig.map_frames(p, dst, end - 4 * PAGE_SIZE, pages, true);
        let data = pattern((pages * PAGE_SIZE) as usize, 8);
        rig.port.memory().write(FRAMES, &data).unwrap();
        let r = rig.run(desc(
            p,
            Operation::Memmove {
                src: src + 0x100,
                dst: dst + 0x100,
                size: (pages * PAGE_SIZE - 0x100) as u32,
            },
        ));
        assert_eq!(
            r.status,
            CompletionStatus::AccessError,
            "lookahead {lookahead}"
        );
        assert!(r.fault_write);
        // Page by page, requests end at page ends and the fifth page's is the first
        // outside memory; over runs they are 4 KiB from 0x100 on, and the fourth ends
        // past it.
        let done = if lookahead {
            3 * PAGE_SIZE
        } else {
            4 * PAGE_SIZE - 0x100
        };
        assert_eq!(r.fault_addr, dst + 0x100 + done);
        assert_eq!(u64::from(r.bytes_completed), done);
        let moved = end - 4 * PAGE_SIZE + 0x100;
        assert_eq!(
            rig.host(moved, done as usize),
            data[0x100..0x100 + done as usize]
        );
        let untouched = (end - moved - done) as usize;
        assert_eq!(
            rig.host(moved + done, untouched),
            vec![0; untouched],
            "nothing of the request that leaves memory"
        );
    }
}
