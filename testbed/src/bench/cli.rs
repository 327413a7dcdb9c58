//! The `vsva bench` command: arguments, and what it prints.

use std::io::Write;
use std::path::PathBuf;

use super::compare::Comparison;
use super::plot::plot_svg;
use super::report::BenchReport;
use super::suite::{run, run_paired, BenchOptions};
use super::BenchError;

/// Arguments of `vsva bench`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct BenchArgs {
    /// Sample briefly (under a minute on two cores).
    #[arg(long)]
    pub quick: bool,
    /// Print the report as one JSON object, on the last line.
    #[arg(long)]
    pub json: bool,
    /// Draw each ratio against its goal into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Run only the measurements whose name contains this.
    #[arg(long, value_name = "NAME")]
    pub only: Option<String>,
    /// Run each measurement in full and at once quick, and hold each quick figure to the
    /// full one; fails when one disagrees (for an idle machine: under load both move).
    #[arg(long, conflicts_with_all = ["quick", "plot"])]
    pub compare_quick: bool,
}

/// Runs the measurements with a progress bar, prints the table to standard output, draws
/// the plot if asked and prints the JSON object last if asked. A measurement that failed
/// (its set-up refused, or one of its own checks of the work done) fails the command,
/// naming each failed measurement and its check, after the table and JSON are printed.
///
/// With `--compare-quick` it prints the comparison ([`Comparison::table`], each run's
/// [`BenchReport::steal_line`], and [`Comparison::json`] last if asked) instead, returns
/// the full run's report, and fails when either run's measurement failed or a figure
/// disagrees.
pub fn run_cli(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    if args.compare_quick {
        return compare_quick(args);
    }
    let report = run(&BenchOptions {
        quick: args.quick,
        only: args.only.clone(),
        progress: true,
    });
    let mut out = std::io::stdout().lock();
    write!(out, "{}", report.table())?;
    if let Some(path) = &args.plot {
        plot_svg(&report, path)?;
        writeln!(out, "plot: {}", path.display())?;
    }
    if args.json {
        writeln!(out, "{}", report.json())?;
    }
    failed(&report)?;
    Ok(report)
}

/// `vsva bench --compare-quick`.
fn compare_quick(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    let [full, quick] = run_paired(&BenchOptions {
        quick: false,
        only: args.only.clone(),
        progress: true,
    });
    let comparison = Comparison::of(&full, &quick);
    let mut out = std::io::stdout().lock();
    write!(out, "{}", comparison.table())?;
    for (run, report) in [("full", &full), ("quick", &quick)] {
        if let Some(line) = report.steal_line() {
            writeln!(out, "{run} run: {line}")?;
        }
    }
    if args.json {
        writeln!(out, "{}", comparison.json())?;
    }
    failed(&full)?;
    failed(&quick)?;
    let disagreeing: Vec<&str> = comparison.disagreeing().iter().map(|f| f.key()).collect();
    if !disagreeing.is_empty() {
        return Err(BenchError::Disagree(disagreeing.join(", ")));
    }
    Ok(full)
}

/// `Err` listing the failed measurements, if any.
fn failed(report: &BenchReport) -> Result<(), BenchError> {
    if report.failures.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = report
        .failures
        .iter()
        .map(|(name, reason)| format!("{name}: {reason}"))
        .collect();
    Err(BenchError::Failed(list.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_measurement_fails_the_command_and_is_named() {
        let mut r = BenchReport::default();
        assert!(failed(&r).is_ok());
        r.fail("nested-memmove", "check failed: the copy differs at byte 5");
        r.fail("ioctl-map", "check failed: no mapping");
        let e = failed(&r).unwrap_err().to_string();
        assert_eq!(
            e,
            "measurements failed: nested-memmove: check failed: the copy differs at byte 5; \
             ioctl-map: check failed: no mapping"
        );
    }
}
