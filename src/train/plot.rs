//! Training curves as a PNG, drawn in pure Rust: line charts with "nice" ticks, a legend and
//! markers, text from an embedded 8x8 bitmap font (no system fonts or libraries).
//!
//! ```
//! use candle_zoo::train::plot::{render_png, Chart, Series};
//!
//! let loss = Chart {
//!     title: "loss".into(),
//!     x_label: "epoch".into(),
//!     y_label: "cross-entropy".into(),
//!     series: vec![
//!         Series { name: "train".into(), points: vec![(1.0, 2.3), (2.0, 1.1), (3.0, 0.6)], ..Default::default() },
//!         Series {
//!             name: "val, mean of 3 seeds".into(),
//!             points: vec![(1.0, 2.1), (2.0, 1.3), (3.0, 0.9)],
//!             band: vec![(1.0, 2.0, 2.2), (2.0, 1.1, 1.5), (3.0, 0.8, 1.0)],
//!         },
//!     ],
//! };
//! let dir = tempfile::tempdir()?;
//! render_png(&[loss], dir.path().join("curves.png"))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::{Error, Result};
use image::{Rgb, RgbImage};

/// One line on a chart: `(x, y)` points drawn in order; non-finite points are skipped (the line
/// breaks there).
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Name shown in the legend.
    pub name: String,
    /// The points, in drawing order.
    pub points: Vec<(f64, f64)>,
    /// An optional shaded band around the line, `(x, low, high)` in `x` order (for example the
    /// spread over seeds), drawn under every line in a pale shade of the series' colour.
    pub band: Vec<(f64, f64, f64)>,
}

/// One panel: a title, axis labels and its series (each drawn in its own colour, with a legend).
#[derive(Debug, Clone, Default)]
pub struct Chart {
    /// Text above the panel.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label along the y axis (drawn vertically).
    pub y_label: String,
    /// The lines; a chart without finite points shows "no data".
    pub series: Vec<Series>,
}

/// Image width in pixels.
pub const WIDTH: u32 = 800;
/// Height of one chart panel in pixels; charts are stacked vertically.
pub const PANEL_HEIGHT: u32 = 400;

/// Series colours (matplotlib's "tab10"), cycled when a chart has more series.
pub const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

const SCALE: i64 = 2;
/// Width and height of one character cell at [`SCALE`].
const CH: i64 = 8 * SCALE;
const BG: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const FAINT: Rgb<u8> = Rgb([150, 150, 150]);
const LEGEND_ROW: i64 = CH + 6;
const MAX_LEGEND_ROWS: usize = 3;
/// Data are clamped to this magnitude so that ranges and steps stay finite.
const HUGE: f64 = 1e300;

/// Renders the charts stacked vertically into one PNG ([`WIDTH`] x `n *` [`PANEL_HEIGHT`]) at
/// `path`, written atomically. An empty slice gives one "no data" panel.
pub fn render_png(charts: &[Chart], path: impl AsRef<std::path::Path>) -> Result<()> {
    let bytes = render_png_bytes(charts)?;
    crate::io::write_atomic(path, &bytes)
}

/// [`render_png`], returning the encoded PNG bytes instead of writing a file.
///
/// ```
/// use candle_zoo::train::plot::{render_png_bytes, Chart, Series};
///
/// let acc = Chart {
///     title: "accuracy".into(),
///     x_label: "epoch".into(),
///     y_label: "top-1".into(),
///     series: vec![Series { name: "val".into(), points: vec![(1.0, 0.25), (2.0, 0.5)], ..Default::default() }],
/// };
/// let png = render_png_bytes(&[acc])?;
/// assert_eq!(&png[1..4], b"PNG");
/// # Ok::<(), candle_zoo::Error>(())
/// ```
pub fn render_png_bytes(charts: &[Chart]) -> Result<Vec<u8>> {
    let placeholder = [Chart::default()];
    let charts = if charts.is_empty() {
        &placeholder[..]
    } else {
        charts
    };
    let panels = u32::try_from(charts.len())
        .ok()
        .and_then(|n| n.checked_mul(PANEL_HEIGHT))
        .ok_or_else(|| Error::Invalid(format!("plot: too many charts ({})", charts.len())))?;
    let mut img = RgbImage::from_pixel(WIDTH, panels, BG);
    for (i, chart) in charts.iter().enumerate() {
        draw_chart(&mut img, chart, i as i64 * PANEL_HEIGHT as i64);
    }
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Invalid(format!("plot: could not encode the PNG: {e}")))?;
    Ok(bytes)
}

/// An axis: the range it shows, `lo..=hi` (the data plus a margin), and its nice tick step.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Axis {
    /// The range and a nice step (1, 2, 2.5 or 5 times a power of ten) for data in `min..=max`,
    /// aiming at about `target` ticks; integral data (epochs) get integral steps.
    fn new(min: f64, max: f64, target: usize, integral: bool) -> Self {
        let (mut min, mut max) = (min.clamp(-HUGE, HUGE), max.clamp(-HUGE, HUGE));
        // A flat series (or a single point) gets a band around its value instead of a zero span.
        if max - min <= max.abs().max(min.abs()) * 1e-12 || !(max - min).is_normal() {
            let c = min / 2.0 + max / 2.0;
            let mut half = if c == 0.0 { 1.0 } else { c.abs() * 0.1 };
            if integral || !half.is_normal() {
                half = half.max(1.0);
            }
            (min, max) = (c - half, c + half);
        }
        // A margin keeps markers at the extremes off the frame.
        let pad = (max - min) * 0.05;
        let (lo, hi) = (min - pad, max + pad);
        let raw = (hi - lo) / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .into_iter()
            .map(|m| m * mag)
            .filter(|s| !integral || s.fract() == 0.0)
            .find(|&s| s >= raw * (1.0 - 1e-9))
            .unwrap_or(10.0 * mag);
        let step = if integral { step.max(1.0) } else { step };
        Axis { lo, hi, step }
    }

    /// The multiples of the step within `lo..=hi` (at most 50, whatever the float noise).
    fn ticks(&self) -> Vec<f64> {
        let first = (self.lo / self.step - 1e-9).ceil();
        (0..50)
            .map(|k| (first + k as f64) * self.step)
            .take_while(|&v| v <= self.hi + self.step * 1e-9)
            .collect()
    }

    /// Position of `v` in `0..=1` along the axis.
    fn frac(&self, v: f64) -> f64 {
        let t = (v.clamp(-HUGE, HUGE) - self.lo) / (self.hi - self.lo);
        if t.is_finite() {
            t.clamp(0.0, 1.0)
        } else {
            0.5
        }
    }

    /// A tick label: fixed-point with as many decimals as the step needs, or scientific
    /// (`2.5e-4`) for steps of 1e-3 or less and values of 1e5 or more; trailing zeros trimmed.
    fn label(&self, v: f64) -> String {
        if v.abs() < self.step * 1e-6 {
            return "0".into();
        }
        let big = self.lo.abs().max(self.hi.abs()) >= 1e5;
        if self.step < 1.001e-3 || big {
            let exp = v.abs().log10().floor();
            let digits = decimals(self.step / 10f64.powf(exp)).min(6);
            let s = format!("{v:.digits$e}");
            match s.split_once('e') {
                Some((mantissa, e)) => format!("{}e{e}", trim_zeros(mantissa)),
                None => s,
            }
        } else {
            trim_zeros(&format!("{v:.*}", decimals(self.step).min(10))).to_string()
        }
    }
}

/// Fewest decimals that write `x` exactly (up to float noise).
fn decimals(x: f64) -> usize {
    (0..10)
        .find(|&d| {
            let scaled = x * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.abs().max(1.0)
        })
        .unwrap_or(10)
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// The finite points of a series, split into runs at non-finite points.
fn runs(series: &Series) -> Vec<&[(f64, f64)]> {
    let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    let runs = series.points.split(|p| !finite(p));
    runs.filter(|r| !r.is_empty()).collect()
}

/// The axis for data in `min..=max` drawn `len` pixels long, with as many ticks as leave each
/// label the `room` (in pixels along the axis) it needs.
fn fit_axis(min: f64, max: f64, len: i64, integral: bool, room: impl Fn(&str) -> i64) -> Axis {
    let fits = |a: &Axis| {
        let spacing = a.step / (a.hi - a.lo) * len as f64;
        let need = a.ticks().iter().map(|&v| room(&a.label(v))).max();
        spacing >= need.unwrap_or(0) as f64
    };
    (2..=(len / 40).clamp(2, 12) as usize)
        .rev()
        .map(|target| Axis::new(min, max, target, integral))
        .find(fits)
        .unwrap_or_else(|| Axis::new(min, max, 1, integral))
}

/// Draws the legend under the title (entries left to right, wrapping onto at most
/// [`MAX_LEGEND_ROWS`] rows) and returns how many rows it took.
fn draw_legend(img: &mut RgbImage, series: &[Series], top: i64) -> i64 {
    let (left, right) = (60, WIDTH as i64 - 20);
    // Swatch, gap, name, gap: long names are cut to fit one row.
    let max_chars = ((right - left - 60) / CH) as usize;
    let (mut x, mut row) = (left, 0);
    for (i, s) in series.iter().enumerate() {
        let mut name: String = s.name.chars().take(max_chars).collect();
        if name.len() < s.name.len() {
            name = name
                .chars()
                .take(max_chars - 2)
                .chain("..".chars())
                .collect();
        }
        let entry = 36 + text_width(&name) + 24;
        if x + entry > right && x > left {
            (x, row) = (left, row + 1);
        }
        if row >= MAX_LEGEND_ROWS as i64 {
            return row;
        }
        let y = top + row * LEGEND_ROW;
        line(img, (x, y + CH / 2), (x + 28, y + CH / 2), colour(i));
        disc(img, x + 14, y + CH / 2, 3, colour(i));
        text(img, x + 36, y, &name, INK);
        x += entry;
    }
    if series.is_empty() {
        0
    } else {
        row + 1
    }
}

fn draw_chart(img: &mut RgbImage, chart: &Chart, top: i64) {
    let width = WIDTH as i64;
    text_centred(img, width / 2, top + 10, &chart.title, INK);
    let legend_top = top + 10 + CH + 8;
    let rows = draw_legend(img, &chart.series, legend_top);

    let runs: Vec<Vec<_>> = chart.series.iter().map(runs).collect();
    let bands: Vec<Vec<(f64, f64, f64)>> = chart.series.iter().map(band).collect();
    let band_points: Vec<(f64, f64)> = bands
        .iter()
        .flatten()
        .flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)])
        .collect();
    let points = || {
        runs.iter()
            .flatten()
            .flat_map(|r| r.iter())
            .chain(band_points.iter())
    };
    let range = |f: fn(&(f64, f64)) -> f64| {
        let (lo, hi) = (f64::INFINITY, f64::NEG_INFINITY);
        points()
            .map(f)
            .fold((lo, hi), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let integral = |f: fn(&(f64, f64)) -> f64| points().all(|p| f(p).fract() == 0.0);
    let ((xmin, xmax), (ymin, ymax)) = (range(|p| p.0), range(|p| p.1));
    let has_data = ymin <= ymax;
    let labelled = |a: &Axis| -> Vec<(f64, String)> {
        let ticks = if has_data { a.ticks() } else { Vec::new() };
        ticks.into_iter().map(|v| (v, a.label(v))).collect()
    };

    // Layout, from the outside in: the y axis first, as its labels' width sets the plot's left.
    let x_label_y = top + PANEL_HEIGHT as i64 - 10 - CH;
    let (plot_top, plot_bottom) = (legend_top + rows * LEGEND_ROW + 8, x_label_y - 18 - CH);
    let ph = plot_bottom - plot_top;
    // Y labels need their height plus a gap; x labels their width plus a gap.
    let y_axis = fit_axis(ymin, ymax, ph, integral(|p| p.1), |_| 3 * CH);
    let y_ticks = labelled(&y_axis);
    let tick_w = y_ticks
        .iter()
        .map(|(_, l)| text_width(l))
        .max()
        .unwrap_or(0);
    let plot_left = 10 + CH + 10 + tick_w + 12;
    let x_room = |l: &str| text_width(l) + 2 * CH;
    let x_axis = fit_axis(
        xmin,
        xmax,
        width - 24 - plot_left,
        integral(|p| p.0),
        x_room,
    );
    let x_ticks = labelled(&x_axis);
    // Room on the right for half of the last x label, which is centred on its tick.
    let last_w = x_ticks.last().map_or(0, |(_, l)| text_width(l));
    let plot_right = width - (last_w / 2 + 10).max(24);
    let pw = plot_right - plot_left;
    let px = |x: f64| plot_left + (x_axis.frac(x) * pw as f64).round() as i64;
    let py = |y: f64| plot_bottom - (y_axis.frac(y) * ph as f64).round() as i64;

    for (v, l) in &y_ticks {
        let y = py(*v);
        fill(img, plot_left, y, pw, 1, GRID);
        fill(img, plot_left - 5, y, 5, 1, INK);
        text(img, plot_left - 10 - text_width(l), y - CH / 2, l, INK);
    }
    for (v, l) in &x_ticks {
        let x = px(*v);
        fill(img, x, plot_top, 1, ph, GRID);
        fill(img, x, plot_bottom, 1, 5, INK);
        text_centred(img, x, plot_bottom + 10, l, INK);
    }
    // Frame on top of the grid.
    fill(img, plot_left, plot_top, pw + 1, 1, INK);
    fill(img, plot_left, plot_bottom, pw + 1, 1, INK);
    fill(img, plot_left, plot_top, 1, ph, INK);
    fill(img, plot_right, plot_top, 1, ph, INK);
    text_centred(img, plot_left + pw / 2, x_label_y, &chart.x_label, INK);
    let y_label_bottom = plot_top + (ph + text_width(&chart.y_label)) / 2;
    text_up(img, 10, y_label_bottom, &chart.y_label, INK);

    if !has_data {
        let middle = plot_top + (ph - CH) / 2;
        text_centred(img, plot_left + pw / 2, middle, "no data", FAINT);
    }
    for (i, band) in bands.iter().enumerate() {
        for w in band.windows(2) {
            let ((x0, lo0, hi0), (x1, lo1, hi1)) = (w[0], w[1]);
            let (c0, c1) = (px(x0), px(x1));
            for c in c0..=c1 {
                let t = if c1 > c0 {
                    (c - c0) as f64 / (c1 - c0) as f64
                } else {
                    0.0
                };
                let (lo, hi) = (lo0 + t * (lo1 - lo0), hi0 + t * (hi1 - hi0));
                for r in py(hi)..=py(lo) {
                    shade(img, c, r, colour(i));
                }
            }
        }
    }
    for (i, series_runs) in runs.iter().enumerate() {
        for run in series_runs {
            let pts: Vec<(i64, i64)> = run.iter().map(|&(x, y)| (px(x), py(y))).collect();
            for w in pts.windows(2) {
                line(img, w[0], w[1], colour(i));
            }
            for &(x, y) in &pts {
                disc(img, x, y, 4, colour(i));
            }
        }
    }
}

/// A series' band: its finite entries, `low <= high`, in `x` order.
fn band(series: &Series) -> Vec<(f64, f64, f64)> {
    let mut band: Vec<_> = series
        .band
        .iter()
        .filter(|(x, lo, hi)| x.is_finite() && lo.is_finite() && hi.is_finite())
        .map(|&(x, lo, hi)| (x, lo.min(hi), lo.max(hi)))
        .collect();
    band.sort_by(|a, b| a.0.total_cmp(&b.0));
    band
}

/// Mixes a quarter of `c` into the pixel: overlapping bands stay visible through each other.
fn shade(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if (0..img.width() as i64).contains(&x) && (0..img.height() as i64).contains(&y) {
        let p = img.get_pixel_mut(x as u32, y as u32);
        for k in 0..3 {
            p.0[k] = ((3 * p.0[k] as u16 + c.0[k] as u16) / 4) as u8;
        }
    }
}

fn colour(i: usize) -> Rgb<u8> {
    Rgb(PALETTE[i % PALETTE.len()])
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if (0..img.width() as i64).contains(&x) && (0..img.height() as i64).contains(&y) {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn fill(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(img, xx, yy, c);
        }
    }
}

/// A 2-pixel-thick line (Bresenham, stamping 2x2 squares).
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = ((x1 - x0).signum(), (y1 - y0).signum());
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        fill(img, x, y, 2, 2, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn disc(img: &mut RgbImage, cx: i64, cy: i64, r: i64, c: Rgb<u8>) {
    for dy in -r..=r {
        for dx in -r..=r {
            if dx * dx + dy * dy <= r * r + r / 2 {
                put(img, cx + dx, cy + dy, c);
            }
        }
    }
}

fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * CH
}

/// Calls `dot(col, row)` for each lit font pixel of `s`, in unscaled glyph coordinates laid out
/// left to right; non-ASCII characters show as `?`.
fn glyph_dots(s: &str, mut dot: impl FnMut(i64, i64)) {
    for (i, ch) in s.chars().enumerate() {
        let code = if ch.is_ascii() { ch } else { '?' } as usize;
        for (row, bits) in font8x8::legacy::BASIC_LEGACY[code].iter().enumerate() {
            for col in (0..8).filter(|b| bits & (1 << b) != 0) {
                dot(i as i64 * 8 + col, row as i64);
            }
        }
    }
}

/// Horizontal text centred on `cx`, its top at `y`.
fn text_centred(img: &mut RgbImage, cx: i64, y: i64, s: &str, c: Rgb<u8>) {
    text(img, cx - text_width(s) / 2, y, s, c);
}

/// Horizontal text with its top-left corner at `(x, y)`.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    glyph_dots(s, |gx, gy| {
        fill(img, x + gx * SCALE, y + gy * SCALE, SCALE, SCALE, c)
    });
}

/// Text rotated a quarter turn anticlockwise (reading upwards), starting at `(x, bottom)`.
fn text_up(img: &mut RgbImage, x: i64, bottom: i64, s: &str, c: Rgb<u8>) {
    let y = |gx: i64| bottom - (gx + 1) * SCALE;
    glyph_dots(s, |gx, gy| {
        fill(img, x + gy * SCALE, y(gx), SCALE, SCALE, c)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.into(),
            points: points.to_vec(),
            ..Default::default()
        }
    }

    fn chart(series: Vec<Series>) -> Chart {
        Chart {
            title: "loss".into(),
            x_label: "epoch".into(),
            y_label: "value".into(),
            series,
        }
    }

    fn out_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join("candle-zoo-plot-test");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn decode(charts: &[Chart]) -> RgbImage {
        let bytes = render_png_bytes(charts).unwrap();
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8()
    }

    fn count(img: &RgbImage, c: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == c).count()
    }

    #[test]
    fn png_has_the_expected_size_and_line_colours() {
        let epochs = |f: fn(f64) -> f64| {
            (1..=10)
                .map(|e| (e as f64, f(e as f64)))
                .collect::<Vec<_>>()
        };
        let loss = chart(vec![
            series("train", &epochs(|e| 2.3 / e)),
            series("val", &epochs(|e| 2.0 / e + 0.3)),
        ]);
        let acc = Chart {
            title: "accuracy".into(),
            x_label: "epoch".into(),
            y_label: "fraction".into(),
            series: vec![
                series("top-1", &epochs(|e| 0.06 * e)),
                series("top-5", &epochs(|e| 0.3 + 0.05 * e)),
                series("lr", &epochs(|e| 1e-3 / e)),
            ],
        };
        let img = decode(&[loss.clone(), acc.clone()]);
        assert_eq!(img.dimensions(), (WIDTH, 2 * PANEL_HEIGHT));
        // Each line spans most of the plot width, far more than its legend swatch alone.
        for c in &PALETTE[..3] {
            assert!(
                count(&img, *c) > 500,
                "colour {c:?}: {} pixels",
                count(&img, *c)
            );
        }
        // The top panel has two series, so the third colour appears only in the bottom one.
        let top = image::imageops::crop_imm(&img, 0, 0, WIDTH, PANEL_HEIGHT).to_image();
        assert_eq!(count(&top, PALETTE[2]), 0);
        assert!(count(&top, PALETTE[1]) > 500);
        // Kept in the temp dir so that a person can look at it.
        let path = out_dir().join("curves.png");
        render_png(&[loss, acc], &path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let nan = f64::NAN;
        let cases = vec![
            chart(vec![]),
            chart(vec![series("empty", &[])]),
            chart(vec![series("nan", &[(nan, 1.0), (1.0, f64::INFINITY)])]),
            chart(vec![series("one", &[(1.0, 0.5)])]),
            chart(vec![series("flat", &[(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)])]),
            chart(vec![series(
                "gap",
                &[(1.0, 1.0), (2.0, nan), (3.0, 2.0), (4.0, 3.0)],
            )]),
            chart(vec![series(
                "huge",
                &[(-f64::MAX, f64::MAX), (f64::MAX, -f64::MAX)],
            )]),
            chart(vec![series("tiny", &[(0.0, 1e-320), (1e-310, 2e-320)])]),
            chart(vec![series(&"long name ".repeat(20), &[(0.0, 1.0)]); 25]),
        ];
        for c in &cases {
            let img = decode(std::slice::from_ref(c));
            assert_eq!(img.dimensions(), (WIDTH, PANEL_HEIGHT));
        }
        assert_eq!(decode(&[]).dimensions(), (WIDTH, PANEL_HEIGHT));
        let path = out_dir().join("degenerate.png");
        render_png(&cases, &path).unwrap();
        let missing = out_dir().join("no-such-dir/plot.png");
        assert!(matches!(render_png(&[], missing), Err(Error::Io { .. })));
        // A single point still shows up as a marker.
        assert!(count(&decode(&cases[3..4]), PALETTE[0]) > 40);
    }

    #[test]
    fn nice_ticks_and_labels() {
        let labels = |a: Axis| a.ticks().iter().map(|&v| a.label(v)).collect::<Vec<_>>();
        let cases: [(f64, f64, usize, bool, &[&str]); 7] = [
            (0.0, 1.1, 5, false, &["0", "0.25", "0.5", "0.75", "1"]),
            (1.0, 10.0, 5, true, &["2", "4", "6", "8", "10"]),
            (1.0, 3.0, 6, true, &["1", "2", "3"]),
            (0.0, 3e-3, 4, false, &["0", "1e-3", "2e-3", "3e-3"]),
            (0.3, 1.6, 3, false, &["0.5", "1", "1.5"]),
            (0.0, 2e5, 3, false, &["0", "1e5", "2e5"]),
            (
                -12.0,
                48.0,
                7,
                false,
                &["-10", "0", "10", "20", "30", "40", "50"],
            ),
        ];
        for (min, max, target, integral, want) in cases {
            assert_eq!(labels(Axis::new(min, max, target, integral)), want);
        }
        // A single value gets a band around it.
        let a = Axis::new(5.0, 5.0, 4, true);
        assert!(a.lo < 5.0 && a.hi > 5.0 && a.step >= 1.0);
    }
}
