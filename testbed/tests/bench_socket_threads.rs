//! The socket probe's VM (`vsva bench`'s `socket-forwarded`) leaves no thread behind and
//! gives the bench's thread its CPUs back; while it lives, the bench's thread and the
//! host's threads run on different CPUs. One test in its own process, so that no other
//! test's threads come and go in the counts.

use rustix::thread::{sched_getaffinity, CpuSet, Pid};
use vsva_testbed::bench::socket::{SocketPageRequest, SocketVm};
use vsva_testbed::bench::Workload;

/// The ids of the process's threads.
fn tasks() -> Vec<i32> {
    let mut ids: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

/// The CPUs thread `tid` may run on.
fn cpus(tid: i32) -> Vec<usize> {
    let mask = sched_getaffinity(Pid::from_raw(tid)).unwrap();
    (0..CpuSet::MAX_CPU).filter(|&c| mask.is_set(c)).collect()
}

#[test]
fn the_socket_vm_pins_its_two_sides_apart_and_leaves_nothing_behind() {
    let me = rustix::thread::gettid().as_raw_nonzero().get();
    let (before, mine) = (tasks(), cpus(me));
    let vm = SocketVm::new().unwrap();
    let host: Vec<i32> = tasks()
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    // The host's serving thread and the connection's.
    assert_eq!(host.len(), 2, "{host:?}");
    if mine.len() >= 2 {
        assert_eq!(cpus(me), [mine[0]]);
        for t in &host {
            assert_eq!(cpus(*t), [mine[1]], "host thread {t}");
        }
    } else {
        assert_eq!(cpus(me), mine);
    }
    SocketPageRequest::new(&vm).unwrap().run(2).unwrap();
    drop(vm);
    assert_eq!(tasks(), before);
    assert_eq!(cpus(me), mine);
}
