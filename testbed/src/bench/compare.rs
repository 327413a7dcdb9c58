//! `vsva bench --compare-quick`: each probe run in full and then at once quick, each
//! figure of the quick run held to the full run's (issue 14: a figure must not depend on
//! how many samples it was given).

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::figures::Figure;
use super::measure::Spread;
use super::report::BenchReport;

/// A quick median agrees with the full run's when it is within this share of the full
/// median, or within the full run's 10th to 90th percentiles.
pub const TOLERANCE: f64 = 0.10;

/// One figure as both runs measured it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FigureComparison {
    /// The figure.
    pub figure: Figure,
    /// The full run's median and spread.
    pub full: Spread,
    /// The quick run's median and spread.
    pub quick: Spread,
}

impl FigureComparison {
    /// The quick median over the full one.
    pub fn ratio(&self) -> f64 {
        self.quick.p50 / self.full.p50
    }

    /// Whether the quick median is within [`TOLERANCE`] of the full median, or within the
    /// full run's 10th to 90th percentiles.
    pub fn agrees(&self) -> bool {
        (self.ratio() - 1.0).abs() <= TOLERANCE
            || (self.full.p10..=self.full.p90).contains(&self.quick.p50)
    }
}

/// Every figure both runs measured, and those only one of them did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    /// Figures both runs measured, in report order.
    pub figures: Vec<FigureComparison>,
    /// Figures one run measured and the other did not (its probe failed in it).
    pub one_sided: Vec<Figure>,
}

impl Comparison {
    /// Holds `quick` to `full`, figure by figure.
    pub fn of(full: &BenchReport, quick: &BenchReport) -> Comparison {
        let mut c = Comparison::default();
        for &figure in Figure::ALL {
            match (full.spread(figure), quick.spread(figure)) {
                (Some(full), Some(quick)) => c.figures.push(FigureComparison {
                    figure,
                    full,
                    quick,
                }),
                (None, None) => {}
                _ => c.one_sided.push(figure),
            }
        }
        c
    }

    /// The figures whose quick median disagrees with the full run's.
    pub fn disagreeing(&self) -> Vec<Figure> {
        self.figures
            .iter()
            .filter(|f| !f.agrees())
            .map(|f| f.figure)
            .collect()
    }

    /// One line per figure: the full run's median and spread, the quick run's, their
    /// ratio and whether they agree; then a summary line.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<28} {:>30} {:>30} {:>7}  agree",
            "figure", "full (p10-p90)", "quick (p10-p90)", "ratio"
        );
        let cell = |s: Spread| format!("{:.4} ({:.4}-{:.4})", s.p50, s.p10, s.p90);
        for f in &self.figures {
            let _ = writeln!(
                out,
                "{:<28} {:>30} {:>30} {:>6.3}x  {}",
                f.figure.key(),
                cell(f.full),
                cell(f.quick),
                f.ratio(),
                if f.agrees() { "yes" } else { "NO" }
            );
        }
        for f in &self.one_sided {
            let _ = writeln!(out, "{:<28} measured by one run only", f.key());
        }
        let _ = writeln!(
            out,
            "{} of {} figures agree (quick median within {:.0} % of the full one, or within \
             its p10-p90)",
            self.figures.len() - self.disagreeing().len(),
            self.figures.len(),
            TOLERANCE * 100.0
        );
        out
    }

    /// As one JSON object: `figures` maps each key to `full`, `quick` (each `[p10, p50,
    /// p90]`), `ratio` and `agrees`; `disagreeing` and `one_sided` list keys.
    pub fn json(&self) -> Value {
        let spread = |s: Spread| json!([s.p10, s.p50, s.p90]);
        let figures: serde_json::Map<String, Value> = self
            .figures
            .iter()
            .map(|f| {
                (
                    f.figure.key().to_string(),
                    json!({
                        "full": spread(f.full),
                        "quick": spread(f.quick),
                        "ratio": f.ratio(),
                        "agrees": f.agrees(),
                    }),
                )
            })
            .collect();
        let keys = |fs: &[Figure]| fs.iter().map(|f| f.key()).collect::<Vec<_>>();
        json!({
            "figures": figures,
            "disagreeing": keys(&self.disagreeing()),
            "one_sided": keys(&self.one_sided),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(p10: f64, p50: f64, p90: f64) -> Spread {
        Spread { p10, p50, p90 }
    }

    #[test]
    fn a_quick_median_agrees_within_the_tolerance_or_the_full_spread() {
        let full = spread(90.0, 100.0, 150.0);
        let at = |q: f64| FigureComparison {
            figure: Figure::FwdInvNs,
            full,
            quick: spread(q, q, q),
        };
        assert!(at(109.0).agrees() && at(91.0).agrees());
        assert!(at(140.0).agrees(), "inside p10-p90");
        assert!(!at(160.0).agrees() && !at(85.0).agrees());
        assert!((at(160.0).ratio() - 1.6).abs() < 1e-12);
    }

    #[test]
    fn figures_are_compared_by_key_and_one_sided_ones_listed() {
        let (mut full, mut quick) = (BenchReport::new(false), BenchReport::new(true));
        full.set(Figure::FwdInvNs, spread(1000.0, 1300.0, 1400.0));
        quick.set(Figure::FwdInvNs, spread(4000.0, 4661.0, 5000.0));
        full.set(Figure::GuestBindNs, spread(2300.0, 2359.0, 2400.0));
        quick.set(Figure::GuestBindNs, spread(2300.0, 2400.0, 2500.0));
        full.set(Figure::PrqRoundtripNs, Spread::exact(3000.0));
        let c = Comparison::of(&full, &quick);
        assert_eq!(c.figures.len(), 2);
        assert_eq!(c.disagreeing(), vec![Figure::FwdInvNs]);
        assert_eq!(c.one_sided, vec![Figure::PrqRoundtripNs]);
        let json = c.json();
        assert_eq!(json["disagreeing"], json!(["fwd_inv_ns"]));
        assert_eq!(json["figures"]["guest_bind_ns"]["agrees"], json!(true));
        let table = c.table();
        assert!(table.contains("1 of 2 figures agree"), "{table}");
        assert!(
            table.contains("prq_roundtrip_ns") && table.contains("NO"),
            "{table}"
        );
    }
}
