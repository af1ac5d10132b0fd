//! PNG plots of latency distributions, drawn by the benches themselves
//! (`--plot DIR`).
//!
//! plotters with its bitmap backend and the `ab_glyph` text renderer: no
//! fontconfig or freetype to link, but a TrueType file to read at run time,
//! DejaVu Sans from Debian's `fonts-dejavu-core` unless `BENCH_PLOT_FONT`
//! names another.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;

const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// One colour per series, told apart in print and by most colour-blind readers.
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Registers the font once per process under the family name plotters asks for.
fn font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = std::env::var("BENCH_PLOT_FONT").unwrap_or_else(|_| DEFAULT_FONT.into());
            let bytes = std::fs::read(&path).map_err(|e| {
                format!("reading the plot font {path}: {e} (apt-get install fonts-dejavu-core, or set BENCH_PLOT_FONT to a .ttf file)")
            })?;
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a TrueType font plotters can read"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A cumulative distribution per series over a logarithmic x axis:
/// `series` holds `(name, samples)`; samples <= 0 are drawn at the axis start.
pub fn cdf(path: &Path, title: &str, x_label: &str, series: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
    font()?;
    let positive = || series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|&v| v > 0.0);
    let lo = positive().fold(f64::INFINITY, f64::min);
    let hi = positive().fold(0.0, f64::max);
    anyhow::ensure!(lo.is_finite() && hi > 0.0, "nothing to plot in {}", path.display());
    let (lo, hi) = (lo * 0.8, hi * 1.25);

    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(log_ticks(lo, hi)), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_label_formatter(&|v| {
            let text = format!("{v:.3}");
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        })
        .y_desc("fraction of samples at or below")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (i, (name, samples)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        let points = sorted.iter().enumerate().map(|(k, &v)| (v.max(lo), (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(3)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Ticks of a logarithmic axis from `lo` to `hi`: 1, 2 and 5 times each
/// power of ten, or every digit where that leaves fewer than four (a range
/// of less than a decade).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let ticks = |digits: &[f64]| -> Vec<f64> {
        let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (first..=last)
            .flat_map(|e| digits.iter().map(move |d| d * 10f64.powi(e)))
            .filter(|t| (lo..=hi).contains(t))
            .collect()
    };
    let coarse = ticks(&[1.0, 2.0, 5.0]);
    if coarse.len() >= 4 {
        coarse
    } else {
        ticks(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
    }
}
