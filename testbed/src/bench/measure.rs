//! Timing: workloads that time themselves, and a sampler that runs a figure and its
//! baseline in alternate samples, so that both see the same machine load.
//!
//! A workload's `run(iters)` does `iters` operations and returns the time they took; work
//! it must redo between operations (emptying the IOMMU's caches) stays outside that time.
//! Criterion drives the same workloads through `iter_custom`.

use std::time::Duration;

use super::BenchError;

/// Something to time.
pub trait Workload {
    /// Runs `iters` operations and returns how long they took.
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError>;
}

/// How long to sample each workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleBudget {
    /// Target duration of one sample.
    pub sample: Duration,
    /// Samples per workload; the median is reported, with the 10th and 90th percentiles.
    pub samples: usize,
}

/// Samples are short and many: on a loaded machine a sample that shares its core with
/// another process's time slice is an outlier the median leaves out, where a long sample
/// would carry part of the slice. Samples (1 ms) are shorter than a time slice: with 5 ms
/// samples, a run beside a two-core compile doubled the forwarded-path figures, as nearly
/// every sample was preempted once. Quick and full runs sample equally long and differ
/// only in how many samples they take, so that a figure does not depend on the mode: with
/// 2 ms quick samples, more of them were preempted on a loaded machine and the quick
/// medians of the PASID churn were 3-4× the full run's.
impl SampleBudget {
    /// `vsva bench --quick`.
    pub const QUICK: SampleBudget = SampleBudget {
        sample: Duration::from_millis(1),
        samples: 151,
    };
    /// `vsva bench`.
    pub const FULL: SampleBudget = SampleBudget {
        sample: Duration::from_millis(1),
        samples: 1001,
    };

    /// The budget of a probe whose every call is followed by long untimed work (checks,
    /// caches put back): samples a tenth as long and a tenth as many, but never fewer
    /// than [`SHORTENED_MIN_SAMPLES`], so that a quick run's median is not that of a
    /// handful of samples (16 of them, when a full run had 101, put two quick figures of
    /// the invalidation probes 11-25 % off the full run's under load).
    pub fn shortened(&self) -> SampleBudget {
        SampleBudget {
            sample: self.sample / 10,
            samples: (self.samples / 10 + 1).max(SHORTENED_MIN_SAMPLES.min(self.samples)),
        }
    }
}

impl SampleBudget {
    /// One of `parts` equal shares of the samples (rounded up), each as long: for a probe
    /// that samples `parts` instances of what it measures in turn.
    pub fn split(&self, parts: usize) -> SampleBudget {
        SampleBudget {
            sample: self.sample,
            samples: self.samples.div_ceil(parts.max(1)),
        }
    }
}

/// The fewest samples [`SampleBudget::shortened`] takes.
pub const SHORTENED_MIN_SAMPLES: usize = 61;

/// Samples' worth of untimed runs each workload makes after its calibration and before its
/// first sample, in both modes: a workload's first runs take its page faults, fill the
/// CPU's caches and the structures it grows, and a quick run, with a seventh of the full
/// run's samples, would count a seventh as many of them in its median.
pub const WARM_UP_SAMPLES: usize = 10;

/// The number of operations that fills one sample of `budget`, found by doubling from one.
///
/// The run that reaches a quarter of a sample decides, and it is made twice, the shorter
/// of the two deciding: the first run of a workload can be one slow operation (a peer
/// thread woken from its sleep, a first page fault) that alone takes a quarter of a
/// sample, and a count fitted to it would leave every sample a couple of operations, each
/// sample's own start-up cost spread over them. That was the socket probe's slow mode: a
/// first page request of 375 µs (the host's thread asleep) fitted 2 operations to a
/// sample, and each sample, which begins with the host asleep after its in-process twin's
/// sample, then read 40 µs a round trip instead of 7.
fn calibrate(w: &mut dyn Workload, budget: &SampleBudget) -> Result<u64, BenchError> {
    let mut iters = 1u64;
    loop {
        let t = w.run(iters)?;
        if t >= budget.sample / 4 || iters >= 1 << 40 {
            let t = t.min(w.run(iters)?);
            let per_op = t.as_secs_f64() / iters as f64;
            let fit = budget.sample.as_secs_f64() / per_op.max(1e-12);
            return Ok((fit as u64).clamp(1, 1 << 40));
        }
        iters *= 2;
    }
}

/// [`WARM_UP_SAMPLES`] runs of `iters` operations of each workload, in turn, untimed.
fn warm_up(ws: &mut [(&mut dyn Workload, u64)]) -> Result<(), BenchError> {
    for _ in 0..WARM_UP_SAMPLES {
        for (w, iters) in ws.iter_mut() {
            w.run(*iters)?;
        }
    }
    Ok(())
}

/// Nanoseconds per operation of each sample of a workload, in sampling order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples(Vec<f64>);

impl Samples {
    /// The samples' median and spread.
    pub fn spread(&self) -> Spread {
        Spread::of(self.0.clone())
    }

    /// `f(self[i], other[i])` for each pair of samples taken in turn, summarised: the
    /// spread of a ratio whose two sides saw the same moment's load.
    pub fn paired(&self, other: &Samples, f: impl Fn(f64, f64) -> f64) -> Spread {
        Spread::of(
            self.0
                .iter()
                .zip(&other.0)
                .map(|(&a, &b)| f(a, b))
                .collect(),
        )
    }

    /// The samples, in sampling order.
    pub fn values(&self) -> &[f64] {
        &self.0
    }

    /// `other`'s samples after these.
    pub fn append(&mut self, other: Samples) {
        self.0.extend(other.0);
    }
}

/// A figure summarised over its samples: the median, with the 10th and 90th percentiles
/// as its spread (nearest-rank). A figure is never a best case.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The 10th percentile.
    pub p10: f64,
    /// The median.
    pub p50: f64,
    /// The 90th percentile.
    pub p90: f64,
}

impl Spread {
    /// A value without spread: a count, not a timing.
    pub const fn exact(v: f64) -> Spread {
        Spread {
            p10: v,
            p50: v,
            p90: v,
        }
    }

    /// The median and percentiles of `xs` (not finite when `xs` is empty).
    pub fn of(mut xs: Vec<f64>) -> Spread {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        if n == 0 {
            return Spread::exact(f64::NAN);
        }
        let rank = |q: f64| xs[((q * (n - 1) as f64).round() as usize).min(n - 1)];
        let p50 = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Spread {
            p10: rank(0.1),
            p50,
            p90: rank(0.9),
        }
    }

    /// The spread of `f` of the figure, for a monotonic `f` (increasing or decreasing:
    /// the percentiles are put back in order).
    pub fn map(self, f: impl Fn(f64) -> f64) -> Spread {
        let (a, b) = (f(self.p10), f(self.p90));
        Spread {
            p10: a.min(b),
            p50: f(self.p50),
            p90: a.max(b),
        }
    }

    /// Whether every value is finite.
    pub fn is_finite(&self) -> bool {
        self.p10.is_finite() && self.p50.is_finite() && self.p90.is_finite()
    }
}

fn ns_per_op(t: Duration, iters: u64) -> f64 {
    t.as_secs_f64() * 1e9 / iters as f64
}

/// Nanoseconds per operation of `w`, one value per sample.
pub fn measure(w: &mut dyn Workload, budget: &SampleBudget) -> Result<Samples, BenchError> {
    let iters = calibrate(w, budget)?;
    warm_up(&mut [(w, iters)])?;
    let mut xs = Vec::with_capacity(budget.samples);
    for _ in 0..budget.samples.max(1) {
        xs.push(ns_per_op(w.run(iters)?, iters));
    }
    Ok(Samples(xs))
}

/// Nanoseconds per operation of a figure's workload and of its baseline's, sampled in
/// turn so that both see the same machine load.
pub fn measure_pair(
    figure: &mut dyn Workload,
    baseline: &mut dyn Workload,
    budget: &SampleBudget,
) -> Result<(Samples, Samples), BenchError> {
    let (fi, bi) = (calibrate(figure, budget)?, calibrate(baseline, budget)?);
    warm_up(&mut [(figure, fi), (baseline, bi)])?;
    let n = budget.samples.max(1);
    let (mut fs, mut bs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        fs.push(ns_per_op(figure.run(fi)?, fi));
        bs.push(ns_per_op(baseline.run(bi)?, bi));
    }
    Ok((Samples(fs), Samples(bs)))
}

/// [`measure_pair`] with one operation count for both workloads, calibrated on the
/// baseline: for a figure whose sample must do the baseline's work (two threads doing one
/// thread's hits each), so that a calibration run the machine's load slowed cannot shrink
/// its samples to a few operations that time a thread's wake-up instead.
pub fn measure_pair_same_count(
    figure: &mut dyn Workload,
    baseline: &mut dyn Workload,
    budget: &SampleBudget,
) -> Result<(Samples, Samples), BenchError> {
    let iters = calibrate(baseline, budget)?;
    warm_up(&mut [(figure, iters), (baseline, iters)])?;
    let n = budget.samples.max(1);
    let (mut fs, mut bs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        fs.push(ns_per_op(figure.run(iters)?, iters));
        bs.push(ns_per_op(baseline.run(iters)?, iters));
    }
    Ok((Samples(fs), Samples(bs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports a fixed cost per operation without spending it.
    struct Fixed {
        ns: u64,
        calls: u64,
    }

    impl Workload for Fixed {
        fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
            self.calls += 1;
            Ok(Duration::from_nanos(self.ns * iters))
        }
    }

    #[test]
    fn measure_reports_the_cost_per_operation() {
        let mut w = Fixed { ns: 250, calls: 0 };
        let ns = measure(&mut w, &SampleBudget::QUICK).unwrap().spread();
        assert!((ns.p50 - 250.0).abs() < 1e-6, "{ns:?}");
        assert_eq!(ns.p10, ns.p90);
        assert!(w.calls > SampleBudget::QUICK.samples as u64);
    }

    #[test]
    fn a_split_budget_keeps_the_sample_length_and_shares_the_samples() {
        let b = SampleBudget::QUICK.split(5);
        assert_eq!((b.sample, b.samples), (SampleBudget::QUICK.sample, 31));
        assert_eq!(SampleBudget::FULL.split(5).samples * 5, 1005);
        assert_eq!(SampleBudget::FULL.split(0), SampleBudget::FULL);
        let mut a = measure(&mut Fixed { ns: 40, calls: 0 }, &b).unwrap();
        a.append(measure(&mut Fixed { ns: 60, calls: 0 }, &b).unwrap());
        assert_eq!(a.values().len(), 62);
        assert_eq!((a.values()[30], a.values()[31]), (40.0, 60.0));
    }

    #[test]
    fn pairs_are_measured_separately() {
        let mut a = Fixed { ns: 40, calls: 0 };
        let mut b = Fixed { ns: 10, calls: 0 };
        let (x, y) = measure_pair(&mut a, &mut b, &SampleBudget::QUICK).unwrap();
        assert!((x.spread().p50 - 40.0).abs() < 1e-6 && (y.spread().p50 - 10.0).abs() < 1e-6);
        let ratio = x.paired(&y, |a, b| a / b);
        assert!((ratio.p10 - 4.0).abs() < 1e-6 && (ratio.p90 - 4.0).abs() < 1e-6);
    }

    /// Costs `ns` per operation, and its first run `first` more.
    struct ColdStart {
        ns: u64,
        first: Duration,
        calls: u64,
    }

    impl Workload for ColdStart {
        fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
            self.calls += 1;
            let once = if self.calls == 1 {
                self.first
            } else {
                Duration::ZERO
            };
            Ok(once + Duration::from_nanos(self.ns * iters))
        }
    }

    #[test]
    fn one_slow_first_operation_does_not_shrink_the_samples() {
        // The socket probe's first page request: 375 µs where each later one takes 7 µs.
        let mut w = ColdStart {
            ns: 7_000,
            first: Duration::from_micros(375),
            calls: 0,
        };
        let iters = calibrate(&mut w, &SampleBudget::QUICK).unwrap();
        let fit = SampleBudget::QUICK.sample.as_nanos() as u64 / 7_000;
        assert!(
            iters.abs_diff(fit) <= 1,
            "{iters} operations a sample, not about {fit}"
        );
    }

    /// Costs 100 ns per operation, except every third run, which costs 300.
    struct Noisy {
        calls: u64,
    }

    impl Workload for Noisy {
        fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
            self.calls += 1;
            let ns = if self.calls % 3 == 0 { 300 } else { 100 };
            Ok(Duration::from_nanos(ns * iters))
        }
    }

    #[test]
    fn the_spread_shows_slow_samples_the_median_leaves_out() {
        let mut a = Noisy { calls: 0 };
        let s = measure(&mut a, &SampleBudget::QUICK).unwrap().spread();
        assert!((s.p50 - 100.0).abs() < 1e-6, "{s:?}");
        assert!((s.p10 - 100.0).abs() < 1e-6, "{s:?}");
        assert!((s.p90 - 300.0).abs() < 1e-6, "{s:?}");
    }

    /// Records the operation counts it is asked for.
    struct Counts(Vec<u64>);

    impl Workload for Counts {
        fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
            self.0.push(iters);
            Ok(Duration::from_nanos(10 * iters))
        }
    }

    #[test]
    fn a_pair_of_the_same_count_runs_the_baselines_count() {
        let (mut a, mut b) = (Counts(Vec::new()), Counts(Vec::new()));
        measure_pair_same_count(&mut a, &mut b, &SampleBudget::QUICK).unwrap();
        let n = *b.0.last().unwrap();
        assert!(n > 1000, "{n}");
        assert!(a.0.iter().all(|&i| i == n));
        assert_eq!(a.0.len(), SampleBudget::QUICK.samples + WARM_UP_SAMPLES);
    }

    /// Costs 100 ns per operation, except in the `WARM_UP_SAMPLES` runs after its first
    /// `fast` ones, which cost 1 µs: a workload that settles after a start-up.
    struct Settling {
        calls: usize,
        fast: usize,
    }

    impl Workload for Settling {
        fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
            self.calls += 1;
            let slow = (self.fast + 1..=self.fast + WARM_UP_SAMPLES).contains(&self.calls);
            Ok(Duration::from_nanos(if slow { 1000 } else { 100 } * iters))
        }
    }

    #[test]
    fn a_shortened_budget_keeps_enough_samples_in_both_modes() {
        let (quick, full) = (
            SampleBudget::QUICK.shortened(),
            SampleBudget::FULL.shortened(),
        );
        assert_eq!(quick.sample, Duration::from_micros(100));
        assert_eq!(full.sample, Duration::from_micros(100));
        assert_eq!(quick.samples, SHORTENED_MIN_SAMPLES);
        assert_eq!(full.samples, 101);
        let tiny = SampleBudget {
            sample: Duration::from_millis(1),
            samples: 3,
        };
        assert_eq!(tiny.shortened().samples, 3);
    }

    #[test]
    fn warm_up_runs_are_not_samples_and_both_modes_agree() {
        for budget in [SampleBudget::QUICK, SampleBudget::FULL] {
            // The calibration's runs, counted on a twin.
            let mut twin = Settling {
                calls: 0,
                fast: usize::MAX - WARM_UP_SAMPLES,
            };
            calibrate(&mut twin, &budget).unwrap();
            // Slow just after its calibration: every slow run is a warm-up run.
            let mut w = Settling {
                calls: 0,
                fast: twin.calls,
            };
            let s = measure(&mut w, &budget).unwrap();
            assert_eq!(w.calls, twin.calls + WARM_UP_SAMPLES + budget.samples);
            assert_eq!(s.values().len(), budget.samples);
            assert!(
                s.values().iter().all(|&ns| (ns - 100.0).abs() < 1e-6),
                "{:?}",
                s.spread()
            );
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = Spread::of((1..=11).map(f64::from).rev().collect());
        assert_eq!((s.p10, s.p50, s.p90), (2.0, 6.0, 10.0));
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).p50, 2.5);
        assert!(!Spread::of(vec![]).is_finite());
    }

    #[test]
    fn a_decreasing_map_keeps_the_percentiles_in_order() {
        let s = Spread::of(vec![1.0, 2.0, 4.0]).map(|x| 8.0 / x);
        assert_eq!((s.p10, s.p50, s.p90), (2.0, 4.0, 8.0));
    }

    #[test]
    fn a_failing_workload_fails_the_measurement() {
        struct Failing;
        impl Workload for Failing {
            fn run(&mut self, _: u64) -> Result<Duration, BenchError> {
                Err(BenchError::Check("no".into()))
            }
        }
        assert!(matches!(
            measure(&mut Failing, &SampleBudget::QUICK),
            Err(BenchError::Check(_))
        ));
    }
}
