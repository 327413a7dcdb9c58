//! A second thread that runs its half of each sample in lockstep with the timing thread:
//! what the two-thread workloads ([`super::translate::TwoThreadHits`],
//! [`super::dma::TwoEngineMemmove`]) share.
//!
//! The thread is spawned once. For each sample it prepares (untimed), says it is ready,
//! spins until told to go, does the timed work, says it is done, then checks (untimed) and
//! reports. The timing thread starts the clock once the second thread is ready and stops
//! it when both are done, so a sample times the work, not thread start-up or wake-up.
//! While the second thread lives, it and the timing thread are pinned to two CPUs
//! ([`PinnedApart`]): woken by each sample's order, it was otherwise sometimes placed on
//! the timing thread's CPU, and that sample timed both halves on one core.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::pin::PinnedApart;
use super::BenchError;

/// The second thread's half of a sample.
pub(super) trait SampleHalf: Send + 'static {
    /// Untimed, before the clock starts.
    fn prepare(&mut self) -> Result<(), BenchError> {
        Ok(())
    }

    /// The timed work: `iters` operations.
    fn work(&mut self, iters: u64) -> Result<(), BenchError>;

    /// Untimed, after the clock stopped: whether the work was really done.
    fn check(&mut self) -> Result<(), BenchError> {
        Ok(())
    }
}

/// One sample on both threads.
#[derive(Debug)]
pub(super) struct Sample<R> {
    /// From the second thread being told to go until both halves were done.
    pub wall: Duration,
    /// The second thread's half, as it timed it (from its start to its end).
    pub theirs: Duration,
    /// What the calling thread's half returned.
    pub mine: R,
}

/// Each sample's number, set by the second thread when it is ready and when it is done,
/// and by the timing thread to start it.
#[derive(Default)]
struct Flags {
    ready: AtomicU64,
    go: AtomicU64,
    done: AtomicU64,
}

/// The second thread and its way of meeting the timing thread.
pub(super) struct SecondThread {
    name: &'static str,
    orders: Option<mpsc::Sender<u64>>,
    results: mpsc::Receiver<Result<Duration, BenchError>>,
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
    sample: u64,
    /// Dropped after the thread has ended: the timing thread gets its CPUs back.
    _apart: PinnedApart,
}

impl SecondThread {
    /// Starts the thread `name`, which runs `half` for each sample, on another CPU than
    /// the calling thread's (when it may use two).
    pub(super) fn spawn(name: &'static str, mut half: impl SampleHalf) -> Result<Self, BenchError> {
        let flags = Arc::new(Flags::default());
        let (orders, inbox) = mpsc::channel::<u64>();
        let (report, results) = mpsc::channel();
        let theirs = Arc::clone(&flags);
        let (thread, apart) = PinnedApart::start(|| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let mut sample = 0;
                    while let Ok(iters) = inbox.recv() {
                        sample += 1;
                        let r = half.prepare().and_then(|()| {
                            theirs.ready.store(sample, Ordering::Release);
                            while theirs.go.load(Ordering::Acquire) < sample {
                                std::hint::spin_loop();
                            }
                            let start = Instant::now();
                            let worked = half.work(iters);
                            let took = start.elapsed();
                            theirs.done.store(sample, Ordering::Release);
                            worked.and_then(|()| half.check()).map(|()| took)
                        });
                        // A failure before `ready` still releases the timing thread.
                        theirs.ready.store(sample, Ordering::Release);
                        theirs.done.store(sample, Ordering::Release);
                        if report.send(r).is_err() {
                            break;
                        }
                    }
                })
        });
        Ok(SecondThread {
            name,
            orders: Some(orders),
            results,
            flags,
            thread: Some(thread?),
            sample: 0,
            _apart: apart,
        })
    }

    /// One sample of `iters` operations on each thread: `mine` runs on the calling thread
    /// while the second thread does its half. `Err` when the second thread's half failed
    /// or the thread is gone.
    pub(super) fn sample<R>(
        &mut self,
        iters: u64,
        mine: impl FnOnce() -> R,
    ) -> Result<Sample<R>, BenchError> {
        let sample = self.ready(iters)?;
        let start = Instant::now();
        self.flags.go.store(sample, Ordering::Release);
        let mine = mine();
        self.wait_for(&self.flags.done, sample)?;
        let wall = start.elapsed();
        let theirs = self.results.recv().map_err(|_| self.gone())??;
        Ok(Sample { wall, theirs, mine })
    }

    /// The second thread's half of a sample of `iters` operations, alone: the calling
    /// thread sleeps meanwhile (it neither works nor spins). How long the half took, as
    /// the second thread timed it; `Err` as [`SecondThread::sample`].
    pub(super) fn alone(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let sample = self.ready(iters)?;
        self.flags.go.store(sample, Ordering::Release);
        self.results.recv().map_err(|_| self.gone())?
    }

    /// Orders the next sample of `iters` operations and waits until the second thread is
    /// ready for it: the sample's number.
    fn ready(&mut self, iters: u64) -> Result<u64, BenchError> {
        self.sample += 1;
        let orders = self.orders.as_ref().ok_or_else(|| self.gone())?;
        orders.send(iters).map_err(|_| self.gone())?;
        self.wait_for(&self.flags.ready, self.sample)?;
        Ok(self.sample)
    }

    /// Samples the second thread has finished.
    #[cfg(test)]
    pub(super) fn samples_done(&self) -> u64 {
        self.flags.done.load(Ordering::Acquire)
    }

    fn gone(&self) -> BenchError {
        BenchError::Check(format!("the bench thread {} is gone", self.name))
    }

    /// Spins until `flag` reaches `sample`, yielding the core between looks (the machine
    /// may have no idle core); `Err` when the thread has ended meanwhile or is gone.
    fn wait_for(&self, flag: &AtomicU64, sample: u64) -> Result<(), BenchError> {
        let thread = self.thread.as_ref().ok_or_else(|| self.gone())?;
        while flag.load(Ordering::Acquire) < sample {
            if thread.is_finished() {
                return Err(BenchError::Check(format!(
                    "the bench thread {} ended before its sample",
                    self.name
                )));
            }
            std::thread::yield_now();
        }
        Ok(())
    }
}

impl Drop for SecondThread {
    /// Closes the order channel, which ends the thread, and joins it.
    fn drop(&mut self) {
        drop(self.orders.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("bench: the thread {} panicked", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its operations; fails its check when told to.
    struct Counter {
        ops: Arc<AtomicU64>,
        fail_check: bool,
    }

    impl SampleHalf for Counter {
        fn work(&mut self, iters: u64) -> Result<(), BenchError> {
            self.ops.fetch_add(iters, Ordering::Relaxed);
            Ok(())
        }

        fn check(&mut self) -> Result<(), BenchError> {
            if self.fail_check {
                Err(BenchError::Check("told to fail".into()))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn both_halves_run_every_sample_and_a_failed_check_fails_the_sample() {
        let ops = Arc::new(AtomicU64::new(0));
        let half = Counter {
            ops: Arc::clone(&ops),
            fail_check: false,
        };
        let mut second = SecondThread::spawn("lockstep-test", half).unwrap();
        let mut mine = 0;
        for iters in [3, 5, 7] {
            mine += second.sample(iters, || iters * 2).unwrap().mine;
        }
        assert_eq!((ops.load(Ordering::Relaxed), mine), (15, 30));
        drop(second);

        let half = Counter {
            ops: Arc::clone(&ops),
            fail_check: true,
        };
        let mut failing = SecondThread::spawn("lockstep-test", half).unwrap();
        let e = failing.sample(1, || ()).unwrap_err();
        assert!(e.to_string().contains("told to fail"), "{e}");
        assert_eq!(ops.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn a_half_alone_runs_on_the_second_thread_and_is_timed_there() {
        let ops = Arc::new(AtomicU64::new(0));
        let half = Counter {
            ops: Arc::clone(&ops),
            fail_check: false,
        };
        let mut second = SecondThread::spawn("lockstep-test", half).unwrap();
        second.alone(4).unwrap();
        let s = second.sample(3, || ()).unwrap();
        assert!(s.theirs <= s.wall, "{s:?}");
        assert_eq!((ops.load(Ordering::Relaxed), second.samples_done()), (7, 2));
    }

    #[test]
    fn the_thread_is_spawned_once_and_ends_on_drop() {
        let ops = Arc::new(AtomicU64::new(0));
        let half = Counter {
            ops: Arc::clone(&ops),
            fail_check: false,
        };
        let mut second = SecondThread::spawn("lockstep-test", half).unwrap();
        let id = second.thread.as_ref().unwrap().thread().id();
        for _ in 0..5 {
            second.sample(1, || ()).unwrap();
            assert_eq!(second.thread.as_ref().unwrap().thread().id(), id);
        }
        assert_eq!(second.samples_done(), 5);
        let flags = Arc::clone(&second.flags);
        drop(second);
        assert_eq!((Arc::strong_count(&flags), Arc::strong_count(&ops)), (1, 1));
    }
}
