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
    /// Samples per workload; the median is reported.
    pub samples: usize,
}

/// Samples are short and many: on a loaded machine a sample that shares its core with
/// another process's time slice is an outlier the median leaves out, where a long sample
/// would carry part of the slice. A full run's samples (1 ms) are shorter than a time
/// slice: with 5 ms samples, a run beside a two-core compile doubled the forwarded-path
/// figures, as nearly every sample was preempted once.
impl SampleBudget {
    /// `vsva bench --quick`.
    pub const QUICK: SampleBudget = SampleBudget {
        sample: Duration::from_millis(2),
        samples: 101,
    };
    /// `vsva bench`.
    pub const FULL: SampleBudget = SampleBudget {
        sample: Duration::from_millis(1),
        samples: 1001,
    };
}

/// The number of operations that fills one sample of `budget`, found by doubling from one
/// (the doubling runs double as warm-up).
fn calibrate(w: &mut dyn Workload, budget: &SampleBudget) -> Result<u64, BenchError> {
    let mut iters = 1u64;
    loop {
        let t = w.run(iters)?;
        if t >= budget.sample / 4 || iters >= 1 << 40 {
            let per_op = t.as_secs_f64() / iters as f64;
            let fit = budget.sample.as_secs_f64() / per_op.max(1e-12);
            return Ok((fit as u64).clamp(1, 1 << 40));
        }
        iters *= 2;
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn ns_per_op(t: Duration, iters: u64) -> f64 {
    t.as_secs_f64() * 1e9 / iters as f64
}

/// Nanoseconds per operation of `w`: the median over the samples.
pub fn measure(w: &mut dyn Workload, budget: &SampleBudget) -> Result<f64, BenchError> {
    let iters = calibrate(w, budget)?;
    let mut xs = Vec::with_capacity(budget.samples);
    for _ in 0..budget.samples.max(1) {
        xs.push(ns_per_op(w.run(iters)?, iters));
    }
    Ok(median(xs))
}

/// Which sample stands for a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistic {
    /// The median sample.
    Median,
    /// The fastest sample: for workloads that need more than one idle core, where a
    /// sample during which another process held a core says nothing about the workload.
    Fastest,
}

/// Nanoseconds per operation of a figure's workload and of its baseline's, sampled in
/// turn; the median of each.
pub fn measure_pair(
    figure: &mut dyn Workload,
    baseline: &mut dyn Workload,
    budget: &SampleBudget,
) -> Result<(f64, f64), BenchError> {
    measure_pair_with(figure, baseline, budget, Statistic::Median)
}

/// [`measure_pair`] with the sample that stands for each workload chosen by `stat`.
pub fn measure_pair_with(
    figure: &mut dyn Workload,
    baseline: &mut dyn Workload,
    budget: &SampleBudget,
    stat: Statistic,
) -> Result<(f64, f64), BenchError> {
    let (fi, bi) = (calibrate(figure, budget)?, calibrate(baseline, budget)?);
    let n = budget.samples.max(1);
    let (mut fs, mut bs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        fs.push(ns_per_op(figure.run(fi)?, fi));
        bs.push(ns_per_op(baseline.run(bi)?, bi));
    }
    let pick = |xs: Vec<f64>| match stat {
        Statistic::Median => median(xs),
        Statistic::Fastest => xs.into_iter().fold(f64::INFINITY, f64::min),
    };
    Ok((pick(fs), pick(bs)))
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
        let ns = measure(&mut w, &SampleBudget::QUICK).unwrap();
        assert!((ns - 250.0).abs() < 1e-6, "{ns}");
        assert!(w.calls > SampleBudget::QUICK.samples as u64);
    }

    #[test]
    fn pairs_are_measured_separately() {
        let mut a = Fixed { ns: 40, calls: 0 };
        let mut b = Fixed { ns: 10, calls: 0 };
        let (x, y) = measure_pair(&mut a, &mut b, &SampleBudget::QUICK).unwrap();
        assert!((x - 40.0).abs() < 1e-6 && (y - 10.0).abs() < 1e-6);
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
    fn the_fastest_sample_leaves_out_every_slow_one() {
        let (mut a, mut b) = (Noisy { calls: 0 }, Fixed { ns: 50, calls: 0 });
        let (x, y) =
            measure_pair_with(&mut a, &mut b, &SampleBudget::QUICK, Statistic::Fastest).unwrap();
        assert!((x - 100.0).abs() < 1e-6 && (y - 50.0).abs() < 1e-6);
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
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
