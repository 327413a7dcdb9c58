//! The report: figures by key, each goal's verdict, the table and the JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::figures::{Bound, Figure, Goal, Unit, GOALS};
use super::measure::Spread;
use super::steal::ProbeSteal;

/// What one run measured. A figure nothing measured is missing (`null` in JSON), never
/// estimated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BenchReport {
    /// The CPU model (`model name` of /proc/cpuinfo), when readable.
    pub cpu: Option<String>,
    /// Whether the run sampled in quick mode.
    pub quick: bool,
    /// CPUs the process may use.
    pub cpus: Option<usize>,
    /// The one-minute load average when the run started: above `cpus - 1`, the
    /// two-thread figure had no idle core for its second thread.
    pub load_average: Option<f64>,
    values: BTreeMap<Figure, Spread>,
    /// Measurements that failed, by name, with the reason; their figures are missing.
    pub failures: Vec<(String, String)>,
    /// Figures no probe of the run measures (their slots wait for a probe).
    pub unmeasured: Vec<Figure>,
    /// Each probe's wall time and the steal time over it, in the order they ran.
    pub steal: Vec<ProbeSteal>,
}

/// How a goal fared in a report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GoalResult {
    /// The goal.
    pub goal: Goal,
    /// The goal's figure as measured; `None` when not measured.
    pub figure: Option<f64>,
    /// The baseline figure as measured; `None` for an absolute goal or when not measured.
    pub baseline: Option<f64>,
    /// The value held to the bound: figure ÷ baseline, or the figure itself.
    pub compared: Option<f64>,
    /// `None` when a value is missing.
    pub met: Option<bool>,
}

impl GoalResult {
    /// The compared value over the bound, oriented so that at most 1 meets the goal.
    pub fn score(&self) -> Option<f64> {
        self.compared.map(|v| self.goal.bound.score(v))
    }

    /// The compared value with its unit ("5.73×", "82.6 ns").
    pub fn compared_text(&self) -> Option<String> {
        let unit = match self.goal.baseline {
            Some(_) => Unit::Times,
            None => self.goal.figure.unit(),
        };
        self.compared.map(|v| format_value(v, unit))
    }

    /// The goal's bound with its unit ("≤ 2×", "≤ 100 ns").
    pub fn bound_text(&self) -> String {
        format_bound(&self.goal)
    }
}

/// The one-minute load average (/proc/loadavg).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The CPU model string of this machine.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn format_value(v: f64, unit: Unit) -> String {
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    match unit {
        Unit::Times => format!("{v:.digits$}×"),
        _ => format!("{v:.digits$} {}", unit.symbol()),
    }
}

/// The median with its unit, then the 10th to 90th percentiles when they differ from it
/// ("11.6 ns (11.2–12.4)").
fn format_spread(s: Spread, unit: Unit) -> String {
    let median = format_value(s.p50, unit);
    if s.p10 == s.p50 && s.p90 == s.p50 {
        return median;
    }
    let bare = |v: f64| {
        let text = format_value(v, unit);
        match unit {
            Unit::Times => text.trim_end_matches('×').to_string(),
            _ => text.trim_end_matches(unit.symbol()).trim_end().to_string(),
        }
    };
    format!("{median} ({}–{})", bare(s.p10), bare(s.p90))
}

fn format_bound(goal: &Goal) -> String {
    let (op, limit) = match goal.bound {
        Bound::AtMost(l) => ("≤", l),
        Bound::AtLeast(l) => ("≥", l),
    };
    if goal.baseline.is_some() || goal.figure.unit() == Unit::Times {
        format!("{op} {limit}×")
    } else {
        format!("{op} {limit} {}", goal.figure.unit().symbol())
    }
}

impl BenchReport {
    /// An empty report for this machine.
    pub fn new(quick: bool) -> Self {
        BenchReport {
            cpu: cpu_model(),
            quick,
            cpus: std::thread::available_parallelism().ok().map(|n| n.get()),
            load_average: load_average(),
            ..BenchReport::default()
        }
    }

    /// Records a figure; a value that is not finite is not a measurement and is ignored.
    pub fn set(&mut self, figure: Figure, value: Spread) {
        if value.is_finite() {
            self.values.insert(figure, value);
        }
    }

    /// A figure's median, if measured.
    pub fn get(&self, figure: Figure) -> Option<f64> {
        self.spread(figure).map(|s| s.p50)
    }

    /// A figure's median and spread, if measured.
    pub fn spread(&self, figure: Figure) -> Option<Spread> {
        self.values.get(&figure).copied()
    }

    /// Records that the measurement `name` failed.
    pub fn fail(&mut self, name: &str, reason: impl ToString) {
        self.failures.push((name.to_string(), reason.to_string()));
    }

    /// Every goal with its verdict.
    pub fn goals(&self) -> Vec<GoalResult> {
        GOALS
            .iter()
            .map(|&goal| {
                let figure = self.get(goal.figure);
                let baseline = goal.baseline.and_then(|b| self.get(b));
                let compared = match goal.baseline {
                    None => figure,
                    Some(_) => figure.zip(baseline).map(|(f, b)| f / b),
                };
                GoalResult {
                    goal,
                    figure,
                    baseline,
                    compared,
                    met: compared
                        .filter(|c| c.is_finite())
                        .map(|c| goal.bound.holds(c)),
                }
            })
            .collect()
    }

    /// The JSON object: every figure's key with its median (`null` when missing),
    /// `spread` with each measured figure's 10th and 90th percentiles, `cpu`, `quick`, the
    /// failed measurements, the unmeasured figures' keys and `steal` (per probe, its
    /// `wall_ms` and the `steal_ms` over it).
    pub fn json(&self) -> Value {
        let number = |v: f64| {
            serde_json::Number::from_f64((v * 1000.0).round() / 1000.0)
                .map_or(Value::Null, Value::Number)
        };
        let mut map = Map::new();
        let mut spread = Map::new();
        for &f in Figure::ALL {
            let s = self.spread(f);
            map.insert(
                f.key().to_string(),
                s.map_or(Value::Null, |s| number(s.p50)),
            );
            if let Some(s) = s {
                spread.insert(
                    f.key().to_string(),
                    Value::Array(vec![number(s.p10), number(s.p90)]),
                );
            }
        }
        map.insert("spread".into(), Value::Object(spread));
        map.insert(
            "cpu".into(),
            self.cpu.clone().map_or(Value::Null, Value::String),
        );
        map.insert("quick".into(), Value::Bool(self.quick));
        map.insert("cpus".into(), self.cpus.map_or(Value::Null, Value::from));
        map.insert(
            "load_average".into(),
            self.load_average
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
        );
        let failures = self
            .failures
            .iter()
            .map(|(name, reason)| {
                let mut m = Map::new();
                m.insert("measurement".into(), Value::String(name.clone()));
                m.insert("error".into(), Value::String(reason.clone()));
                Value::Object(m)
            })
            .collect();
        map.insert("failures".into(), Value::Array(failures));
        let unmeasured = self
            .unmeasured
            .iter()
            .map(|f| Value::String(f.key().into()))
            .collect();
        map.insert("unmeasured".into(), Value::Array(unmeasured));
        let steal = self
            .steal
            .iter()
            .map(|p| {
                let mut m = Map::new();
                m.insert("wall_ms".into(), number(p.wall.as_secs_f64() * 1e3));
                m.insert(
                    "steal_ms".into(),
                    p.steal
                        .map_or(Value::Null, |s| number(s.as_secs_f64() * 1e3)),
                );
                (p.name.clone(), Value::Object(m))
            })
            .collect();
        map.insert("steal".into(), Value::Object(steal));
        Value::Object(map)
    }

    /// The table of goals: figure, baseline, ratio, goal and whether it is met; then the
    /// figures no goal names and the failed measurements.
    pub fn table(&self) -> String {
        let dash = || "—".to_string();
        let mut rows = vec![[
            "goal".to_string(),
            "figure (p10–p90)".into(),
            "baseline (p10–p90)".into(),
            "ratio".into(),
            "goal".into(),
            "met".into(),
        ]];
        for r in self.goals() {
            let unit = r.goal.figure.unit();
            rows.push([
                r.goal.name.to_string(),
                self.spread(r.goal.figure)
                    .map_or("missing".into(), |s| format_spread(s, unit)),
                match r.goal.baseline {
                    None => dash(),
                    Some(b) => self
                        .spread(b)
                        .map_or("missing".into(), |s| format_spread(s, b.unit())),
                },
                match r.goal.baseline {
                    None => dash(),
                    Some(_) => r
                        .compared
                        .map_or("—".into(), |v| format_value(v, Unit::Times)),
                },
                format_bound(&r.goal),
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "missing".into(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..6)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c == 0 {
                    let _ = write!(line, "{cell}{:pad$}", "");
                } else {
                    let _ = write!(line, "  {:pad$}{cell}", "");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let named: Vec<Figure> = GOALS
            .iter()
            .flat_map(|g| [Some(g.figure), g.baseline])
            .flatten()
            .collect();
        for (&f, &s) in &self.values {
            if !named.contains(&f) {
                let _ = writeln!(out, "{}: {}", f.key(), format_spread(s, f.unit()));
            }
        }
        for (name, reason) in &self.failures {
            let _ = writeln!(out, "failed: {name}: {reason}");
        }
        if !self.unmeasured.is_empty() {
            let keys: Vec<_> = self.unmeasured.iter().map(|f| f.key()).collect();
            let _ = writeln!(out, "not measured by any probe: {}", keys.join(", "));
        }
        let _ = write!(out, "cpu: {}", self.cpu.as_deref().unwrap_or("unknown"));
        if let Some(n) = self.cpus {
            let _ = write!(out, ", {n} CPUs");
        }
        if let Some(load) = self.load_average {
            let _ = write!(out, ", load average {load:.2} at start");
        }
        let _ = writeln!(out, "{}", if self.quick { " (quick)" } else { "" });
        if let Some(line) = self.steal_line() {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// The probes over which the hypervisor counted steal time, with how much, as one
    /// line; `None` when it counted none.
    pub fn steal_line(&self) -> Option<String> {
        let stolen: Vec<String> = self
            .steal
            .iter()
            .filter_map(|p| {
                let s = p.steal.filter(|s| !s.is_zero())?;
                Some(format!(
                    "{} {:.0} ms in {:.1} s",
                    p.name,
                    s.as_secs_f64() * 1e3,
                    p.wall.as_secs_f64()
                ))
            })
            .collect();
        (!stolen.is_empty()).then(|| {
            format!(
                "steal time (vCPUs kept waiting by the hypervisor): {}",
                stolen.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> BenchReport {
        let mut r = BenchReport {
            cpu: Some("Test CPU".into()),
            ..BenchReport::default()
        };
        r.set(
            Figure::IotlbHitNs,
            Spread {
                p10: 28.0,
                p50: 30.0,
                p90: 35.5,
            },
        );
        r.set(Figure::HashmapLookupNs, Spread::exact(10.0));
        r.set(Figure::MemcpyNestedGbps, Spread::exact(9.5));
        r.set(Figure::MemcpyPlainGbps, Spread::exact(10.0));
        r.set(Figure::ReadsPerMiss, Spread::exact(2.0));
        r.set(Figure::NestedWalkTableReads, Spread::exact(24.0));
        r
    }

    fn verdict(r: &BenchReport, figure: Figure) -> Option<bool> {
        r.goals()
            .into_iter()
            .find(|g| g.goal.figure == figure)
            .and_then(|g| g.met)
    }

    #[test]
    fn goals_compare_ratios_and_absolute_values() {
        let r = report();
        assert_eq!(verdict(&r, Figure::IotlbHitNs), Some(false));
        assert_eq!(verdict(&r, Figure::MemcpyNestedGbps), Some(true));
        assert_eq!(verdict(&r, Figure::ReadsPerMiss), Some(true));
        assert_eq!(verdict(&r, Figure::FwdInvNs), None);
        let hit = r.goals()[0];
        assert_eq!(hit.compared, Some(3.0));
        assert_eq!(hit.score(), Some(1.5));
        assert_eq!(hit.compared_text().as_deref(), Some("3.00×"));
        assert_eq!(hit.bound_text(), "≤ 2×");
        let reads = r
            .goals()
            .into_iter()
            .find(|g| g.goal.figure == Figure::ReadsPerMiss)
            .unwrap();
        assert_eq!(reads.compared_text().as_deref(), Some("2.00 reads"));
    }

    #[test]
    fn a_missing_baseline_leaves_the_goal_open() {
        let mut r = BenchReport::default();
        r.set(Figure::IotlbHitNs, Spread::exact(30.0));
        assert_eq!(verdict(&r, Figure::IotlbHitNs), None);
        r.set(Figure::HashmapLookupNs, Spread::exact(f64::NAN));
        assert_eq!(r.get(Figure::HashmapLookupNs), None);
    }

    #[test]
    fn json_has_every_key_and_nulls_for_missing_figures() {
        let v = report().json();
        let obj = v.as_object().unwrap();
        for f in Figure::ALL {
            assert!(obj.contains_key(f.key()), "{}", f.key());
        }
        assert_eq!(obj["iotlb_hit_ns"], Value::from(30.0));
        assert_eq!(
            obj["spread"]["iotlb_hit_ns"],
            serde_json::json!([28.0, 35.5])
        );
        assert_eq!(
            obj["spread"]["reads_per_miss"],
            serde_json::json!([2.0, 2.0])
        );
        assert_eq!(obj["spread"].get("fwd_inv_ns"), None);
        assert_eq!(obj["fwd_inv_ns"], Value::Null);
        assert_eq!(obj["cpu"], Value::from("Test CPU"));
        assert_eq!(obj["unmeasured"], Value::Array(vec![]));
        let line = v.to_string();
        assert!(!line.contains('\n'));
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn the_table_has_a_row_per_goal_and_the_other_figures() {
        let mut r = report();
        r.fail("stream", "model did not count");
        r.unmeasured = vec![Figure::FwdInvNs, Figure::GuestBindNs];
        let t = r.table();
        assert!(t.contains("not measured by any probe: fwd_inv_ns, guest_bind_ns"));
        let lines: Vec<_> = t.lines().collect();
        assert!(lines[0].starts_with("goal"));
        assert!(lines[1].starts_with("IOTLB hit vs hash map"));
        assert!(lines[1].contains("3.00×") && lines[1].ends_with("NO"));
        assert!(lines[1].contains("30.0 ns (28.0–35.5)"), "{}", lines[1]);
        assert!(t.contains("nested_walk_table_reads: 24.0 reads"));
        assert!(t.contains("failed: stream: model did not count"));
        assert!(t.ends_with("cpu: Test CPU\n"));
        r.cpus = Some(2);
        r.load_average = Some(3.5);
        assert!(r
            .table()
            .ends_with("cpu: Test CPU, 2 CPUs, load average 3.50 at start\n"));
        assert_eq!(
            lines.iter().filter(|l| l.ends_with("missing")).count(),
            GOALS.len() - 3
        );
    }

    #[test]
    fn probes_with_steal_time_are_named_in_the_table_and_all_in_the_json() {
        use std::time::Duration;
        let mut r = report();
        let probe = |name: &str, steal| ProbeSteal {
            name: name.into(),
            wall: Duration::from_millis(2400),
            steal,
        };
        r.steal = vec![
            probe("iotlb-hit", Some(Duration::ZERO)),
            probe("dma-2-threads", Some(Duration::from_millis(30))),
            probe("socket-forwarded", None),
        ];
        let t = r.table();
        assert!(
            t.ends_with(
                "steal time (vCPUs kept waiting by the hypervisor): dma-2-threads 30 ms in 2.4 s\n"
            ),
            "{t}"
        );
        let v = r.json();
        assert_eq!(v["steal"]["dma-2-threads"]["steal_ms"], Value::from(30.0));
        assert_eq!(v["steal"]["iotlb-hit"]["wall_ms"], Value::from(2400.0));
        assert_eq!(v["steal"]["socket-forwarded"]["steal_ms"], Value::Null);
        r.steal.truncate(1);
        assert!(!r.table().contains("steal time"));
    }

    #[test]
    fn values_are_formatted_with_their_units() {
        assert_eq!(format_value(1234.4, Unit::Nanoseconds), "1234 ns");
        assert_eq!(format_value(12.34, Unit::GigabytesPerSecond), "12.3 GB/s");
        assert_eq!(format_value(1.6, Unit::Times), "1.60×");
        let s = Spread {
            p10: 1.5,
            p50: 1.6,
            p90: 1.75,
        };
        assert_eq!(format_spread(s, Unit::Times), "1.60× (1.50–1.75)");
        assert_eq!(format_spread(Spread::exact(16.0), Unit::Bytes), "16.0 B");
        assert_eq!(format_bound(&GOALS[0]), "≤ 2×");
        assert_eq!(format_bound(&GOALS[1]), "≥ 1.6×");
        let reads = GOALS
            .iter()
            .find(|g| g.figure == Figure::ReadsPerMiss)
            .unwrap();
        assert_eq!(format_bound(reads), "≤ 2.5 reads");
    }
}
