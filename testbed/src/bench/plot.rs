//! `vsva bench --plot FILE.svg`: each goal's measured ratio against its goal.
//!
//! One row per goal. The bar is the compared value divided by the goal's limit (inverted
//! for "at least" goals), on a log axis, so every goal sits at 1 and a bar that stops left
//! of the line meets its goal. The row's caption gives the ratio and the goal in their own
//! terms; a goal with a missing figure gets a caption and no bar.

use std::path::Path;

use plotters::prelude::*;

use super::report::BenchReport;
use super::BenchError;

const ROW_PX: u32 = 34;
const MET: RGBColor = RGBColor(46, 139, 87);
const NOT_MET: RGBColor = RGBColor(200, 55, 45);
const MISSING: RGBColor = RGBColor(140, 140, 140);

fn plot_error(e: impl std::fmt::Display) -> BenchError {
    BenchError::Plot(e.to_string())
}

/// Draws the report's goals into an SVG file at `path`.
pub fn plot_svg(report: &BenchReport, path: &Path) -> Result<(), BenchError> {
    let goals = report.goals();
    let rows = goals.len().max(1) as f64;
    let scores: Vec<f64> = goals.iter().filter_map(|g| g.score()).collect();
    let lo = scores.iter().copied().fold(0.25f64, f64::min) / 1.5;
    let hi = scores.iter().copied().fold(4.0f64, f64::max) * 1.5;

    let height = 90 + ROW_PX * goals.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "vsva bench: each figure against its goal ({})",
                report.cpu.as_deref().unwrap_or("unknown CPU")
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..rows)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("measured ÷ goal (left of 1 meets the goal; log scale)")
        .draw()
        .map_err(plot_error)?;

    let font = ("sans-serif", 12).into_font();
    for (i, g) in goals.iter().enumerate() {
        // Row 0 at the top.
        let top = rows - i as f64;
        let caption = match (g.compared_text(), g.met) {
            (Some(v), Some(met)) => format!(
                "{}: {v} (goal {}, {})",
                g.goal.name,
                g.bound_text(),
                if met { "met" } else { "not met" }
            ),
            _ => format!("{}: missing", g.goal.name),
        };
        let color = match g.met {
            Some(true) => MET,
            Some(false) => NOT_MET,
            None => MISSING,
        };
        chart
            .draw_series(std::iter::once(Text::new(
                caption,
                (lo * 1.05, top - 0.08),
                font.clone().color(&color),
            )))
            .map_err(plot_error)?;
        if let Some(score) = g.score() {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(lo, top - 0.55), (score.clamp(lo, hi), top - 0.9)],
                    color.filled(),
                )))
                .map_err(plot_error)?;
        }
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, 0.0), (1.0, rows)],
            BLACK.stroke_width(2),
        )))
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::figures::{Figure, GOALS};
    use crate::bench::Spread;

    #[test]
    fn writes_an_svg_with_a_caption_per_goal() {
        let mut r = BenchReport::default();
        r.set(Figure::IotlbHitNs, Spread::exact(30.0));
        r.set(Figure::HashmapLookupNs, Spread::exact(10.0));
        r.set(Figure::ReadsPerMiss, Spread::exact(2.0));
        let dir = std::env::temp_dir().join(format!("vsva-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("goals.svg");
        plot_svg(&r, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for g in GOALS {
            assert!(svg.contains(g.name), "{}", g.name);
        }
        assert!(svg.contains("not met") && svg.contains("missing"));
    }

    #[test]
    fn an_unwritable_path_is_an_error() {
        let r = BenchReport::default();
        let path = Path::new("/nonexistent-dir/vsva/goals.svg");
        assert!(matches!(plot_svg(&r, path), Err(BenchError::Plot(_))));
    }
}
