//! Two threads that wait for each other by spinning, pinned to two CPUs for as long as
//! they are measured: the socket probe's client and host ([`super::socket::SocketVm`])
//! and the two-thread probes' timing and second threads ([`super::lockstep`]).

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// The calling thread on one CPU and the threads [`PinnedApart::start`] starts on
/// another, while it lives; the calling thread's CPUs come back when it is dropped.
///
/// Spinning for a peer pays only while the two run on two cores at once. Left to the
/// scheduler they often share one: a thread woken by another (a doorbell written to a
/// UNIX socket, an order sent over a channel) is placed on the waker's CPU when no other
/// CPU is idle, and from then on each side spins on the core the other needs. That was
/// the socket probe's slow mode (at load average 9: 108 µs per forwarded invalidation,
/// two 50 µs spins and the call; 98 % of the calls rang the doorbell of a host asleep,
/// 0.4 % with the two pinned apart), whether or not other probes ran first in the
/// process, and what a run under `taskset -c 0` measures; and the DMA probe's two-thread
/// samples that read about one thread's speed (a p10 of 0.47x in one idle run of stop 28).
pub(super) struct PinnedApart {
    /// The calling thread's CPUs before, to restore (none when not pinned).
    restore: Option<CpuSet>,
}

impl PinnedApart {
    /// Runs `peer`, which starts threads, with the calling thread on the second CPU it may
    /// use (a thread starts with its creator's CPUs, so they and the threads they start
    /// get that one), then moves the calling thread to the first; with fewer than two
    /// CPUs (or when the affinity cannot be set), runs it as it is.
    pub(super) fn start<T>(peer: impl FnOnce() -> T) -> (T, PinnedApart) {
        let Ok(mask) = sched_getaffinity(None) else {
            return (peer(), PinnedApart { restore: None });
        };
        let mut cpus = (0..CpuSet::MAX_CPU).filter(|&c| mask.is_set(c));
        let (Some(mine), Some(theirs)) = (cpus.next(), cpus.next()) else {
            return (peer(), PinnedApart { restore: None });
        };
        let only = |cpu: usize| {
            let mut set = CpuSet::new();
            set.set(cpu);
            set
        };
        let apart = PinnedApart {
            restore: sched_setaffinity(None, &only(theirs)).ok().map(|()| mask),
        };
        let started = peer();
        if apart.restore.is_some() && sched_setaffinity(None, &only(mine)).is_err() {
            // The calling thread stays with its peer; restored on drop all the same.
            tracing::warn!("bench: the timing thread could not be moved off its peer's CPU");
        }
        (started, apart)
    }
}

impl Drop for PinnedApart {
    fn drop(&mut self) {
        if let Some(mask) = &self.restore {
            if let Err(e) = sched_setaffinity(None, mask) {
                tracing::warn!("bench: the timing thread keeps one CPU: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_runs_on_another_cpu_and_the_cpus_come_back() {
        let before = sched_getaffinity(None).unwrap();
        let cpus = (0..CpuSet::MAX_CPU).filter(|&c| before.is_set(c)).count();
        let (peer, apart) = PinnedApart::start(|| {
            std::thread::spawn(|| sched_getaffinity(None).unwrap())
                .join()
                .unwrap()
        });
        let mine = sched_getaffinity(None).unwrap();
        if cpus >= 2 {
            assert_eq!((mine.count(), peer.count()), (1, 1));
            let on = |set: &CpuSet| (0..CpuSet::MAX_CPU).find(|&c| set.is_set(c));
            assert_ne!(on(&mine), on(&peer));
        } else {
            assert_eq!(mine, before);
        }
        drop(apart);
        assert_eq!(sched_getaffinity(None).unwrap(), before);
    }
}
