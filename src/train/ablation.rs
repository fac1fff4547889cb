//! The AlexNet paper's claims as an ablation study: variants of one model and one recipe, each
//! trained from the same seeds, compared with the baseline seed by seed.
//!
//! | claim (Krizhevsky et al., 2012) | variant | measured as |
//! |---|---|---|
//! | ReLU reaches 25% training error 6x faster than tanh (Figure 1) | `tanh` | epochs to the target training error, tanh / ReLU |
//! | overlapping pooling lowers top-1/top-5 error by 0.4/0.3 points | `non-overlapping-pool` | validation error, variant - baseline |
//! | response normalization lowers them by 1.4/1.2 points | `lrn` (added where the layout has none) or `no-lrn` | validation error without LRN - with |
//! | dropout fights overfitting ... | `no-dropout` | train - validation top-1 gap, variant - baseline |
//! | ... at about twice the iterations to converge | `no-dropout` | epochs to the target training error, baseline / variant |
//! | crops and flips: without them, substantial overfitting | `no-crops-flips` | the gap and the validation error, variant - baseline |
//! | PCA lighting lowers top-1 error by over 1 point | `no-lighting` | validation top-1 error, variant - baseline |
//!
//! A [`Study`] trains every (variant, seed) run with [`Trainer`] in its own folder
//! (`runs/<variant>/seed-<seed>/`, with the usual checkpoint, so a killed study resumes where it
//! stopped) and writes `ablation.csv` (every epoch of every run), `ablation.md` (one row per
//! claim: the paper's figure, the measured effect as mean ± std over seeds, and whether it
//! reproduced) and `ablation.png` (validation error per variant with the spread over seeds, and
//! Figure 1's training-error curves with the target line).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::plot::{render_png, Chart, Series};
use super::{EpochRecord, Event, TrainConfig, Trainer, CHECKPOINT};
use crate::data::dataset::ImageFolder;
use crate::data::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::models::alexnet::{Activation, Config, Pooling};

/// Every epoch of every run.
pub const ABLATION_CSV: &str = "ablation.csv";
/// The claims, measured.
pub const ABLATION_MD: &str = "ablation.md";
/// The curves.
pub const ABLATION_PNG: &str = "ablation.png";
/// What the study in a folder is: a second study with other settings is refused there.
pub const STUDY_TXT: &str = "study.txt";

/// One arm of the study: the baseline, or the baseline with one thing changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Its name in files and tables (`baseline`, `tanh`, ...).
    pub name: String,
    pub model: Config,
    pub train: TrainConfig,
}

/// The variants and seeds of a study, and the training error Figure 1 measures time to.
#[derive(Debug, Clone)]
pub struct Study {
    pub variants: Vec<Variant>,
    pub seeds: Vec<u64>,
    pub preprocess: Preprocess,
    /// Figure 1's target: 0.25 training error.
    pub target_error: f64,
}

/// The figures of one (variant, seed) run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    pub variant: String,
    pub seed: u64,
    pub history: Vec<EpochRecord>,
}

/// The name of each variant [`Study::paper`] builds, in order.
pub const VARIANTS: [&str; 7] = [
    "baseline",
    "tanh",
    "non-overlapping-pool",
    "lrn",
    "no-dropout",
    "no-crops-flips",
    "no-lighting",
];

impl Study {
    /// The study of every claim: `model` and `train` as the baseline (ReLU, overlapping pools,
    /// LRN as the layout has it, dropout, crops, flips and PCA lighting: give the published
    /// choices), and one variant per claim, each trained from every seed of `seeds`. The LRN
    /// variant is called `lrn` where the baseline has none (torchvision's layout) and `no-lrn`
    /// where it has.
    pub fn paper(
        model: &Config,
        train: &TrainConfig,
        preprocess: Preprocess,
        seeds: Vec<u64>,
    ) -> Result<Self> {
        if seeds.is_empty() {
            return Err(Error::Invalid(
                "an ablation study needs at least one seed".into(),
            ));
        }
        let variant = |name: &str, model: Config, train: TrainConfig| Variant {
            name: name.into(),
            model,
            train,
        };
        let base = || train.clone();
        let lrn_name = if model.lrn { "no-lrn" } else { "lrn" };
        let variants = vec![
            variant("baseline", model.clone(), base()),
            variant(
                "tanh",
                model.clone().with_activation(Activation::Tanh),
                base(),
            ),
            variant(
                "non-overlapping-pool",
                model.clone().with_pooling(Pooling::NonOverlapping),
                base(),
            ),
            variant(lrn_name, model.clone().with_lrn(!model.lrn), base()),
            variant("no-dropout", model.clone().with_dropout(0.0), base()),
            variant(
                "no-crops-flips",
                model.clone(),
                TrainConfig {
                    random_crop: false,
                    flip: false,
                    ..base()
                },
            ),
            variant(
                "no-lighting",
                model.clone(),
                TrainConfig {
                    lighting: 0.0,
                    ..base()
                },
            ),
        ];
        Ok(Self {
            variants,
            seeds,
            preprocess,
            target_error: 0.25,
        })
    }

    /// Keeps only the named variants (the baseline always stays: every claim is measured
    /// against it). An unknown name is an error listing the known ones.
    pub fn only(mut self, names: &[String]) -> Result<Self> {
        // `lrn` names the LRN arm whichever way it goes.
        let named =
            |v: &Variant, name: &str| v.name == name || (name == "lrn" && v.name == "no-lrn");
        for name in names {
            if !self.variants.iter().any(|v| named(v, name)) {
                let all: Vec<_> = self.variants.iter().map(|v| v.name.as_str()).collect();
                return Err(Error::parse("variant", name, all.join(", ")));
            }
        }
        self.variants
            .retain(|v| v.name == "baseline" || names.iter().any(|n| named(v, n)));
        Ok(self)
    }

    /// The folder of one run.
    pub fn run_dir(out: &Path, variant: &str, seed: u64) -> PathBuf {
        out.join("runs").join(variant).join(format!("seed-{seed}"))
    }

    /// What the study is, as recorded in [`STUDY_TXT`]: every setting that shapes its results
    /// (not the worker count).
    pub fn description(&self) -> String {
        let mut s = format!(
            "seeds {:?}\npreprocess {}\ntarget training error {}\n",
            self.seeds, self.preprocess, self.target_error
        );
        for v in &self.variants {
            let train = TrainConfig {
                workers: 0,
                ..v.train.clone()
            };
            s.push_str(&format!("{}: {:?} {:?}\n", v.name, v.model, train));
        }
        s
    }

    /// Trains every run not finished yet, in `out`: finished runs are read back, interrupted
    /// ones resumed from their checkpoints. `resume` must be true when `out` already holds this
    /// study; a different study there is refused. `observer` sees each run's events, and can
    /// stop the study by breaking (the results so far are returned).
    pub fn run(
        &self,
        data: &(ImageFolder, Option<ImageFolder>),
        out: &Path,
        resume: bool,
        device: &Device,
        observer: &mut dyn FnMut(&Variant, u64, Event) -> ControlFlow<()>,
    ) -> Result<Vec<RunResult>> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let record = out.join(STUDY_TXT);
        let description = self.description();
        match std::fs::read_to_string(&record) {
            Ok(saved) if saved != description => {
                return Err(Error::Invalid(format!(
                    "{} holds another study (its {STUDY_TXT} differs from these settings): \
                     choose another output folder",
                    out.display()
                )))
            }
            Ok(_) if !resume => {
                return Err(Error::Invalid(format!(
                    "{} already holds this study: resume it, or choose another output folder",
                    out.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomic(&record, description.as_bytes())?
            }
            Err(e) => return Err(Error::io(&record, e)),
        }
        let (train, val) = data;
        let mut results = Vec::new();
        for v in &self.variants {
            for &seed in &self.seeds {
                let dir = Self::run_dir(out, &v.name, seed);
                let config = TrainConfig {
                    seed,
                    ..v.train.clone()
                };
                let mut trainer = if dir.join(CHECKPOINT).exists() {
                    Trainer::resume(
                        &dir,
                        train.clone(),
                        val.clone(),
                        Some(config.epochs),
                        Some(config.workers),
                        device,
                    )?
                } else {
                    Trainer::new(
                        &v.model,
                        self.preprocess.clone(),
                        train.clone(),
                        val.clone(),
                        config,
                        &dir,
                        device,
                    )?
                };
                let mut stopped = false;
                trainer.run(&mut |e| {
                    let flow = observer(v, seed, e);
                    stopped |= flow.is_break();
                    flow
                })?;
                results.push(RunResult {
                    variant: v.name.clone(),
                    seed,
                    history: trainer.history().to_vec(),
                });
                if stopped {
                    return Ok(results);
                }
            }
        }
        Ok(results)
    }

    /// Writes [`ABLATION_CSV`], [`ABLATION_MD`] and [`ABLATION_PNG`] into `out`.
    pub fn report(&self, results: &[RunResult], out: &Path) -> Result<Vec<ClaimRow>> {
        write_atomic(out.join(ABLATION_CSV), csv(results).as_bytes())?;
        let rows = self.claims(results);
        write_atomic(
            out.join(ABLATION_MD),
            self.markdown(&rows, results).as_bytes(),
        )?;
        render_png(&self.charts(results), out.join(ABLATION_PNG))?;
        Ok(rows)
    }

    /// Each claim whose variant ran, measured against the baseline seed by seed.
    pub fn claims(&self, results: &[RunResult]) -> Vec<ClaimRow> {
        let target = self.target_error;
        let epochs = |r: &RunResult| epochs_to(&r.history, target);
        let max_epochs = results.iter().map(|r| r.history.len()).max().unwrap_or(0);
        let pct = |x: f64| 100.0 * x;
        let mut rows = Vec::new();
        let mut claim =
            |claim: &str,
             paper: &str,
             variant: &str,
             unit: Unit,
             f: &dyn Fn(&RunResult, &RunResult) -> Option<f64>| {
                let pairs: Vec<f64> = paired(results, variant)
                    .filter_map(|(base, var)| f(base, var))
                    .collect();
                if paired(results, variant).next().is_some() {
                    rows.push(ClaimRow::new(claim, paper, variant, unit, &pairs));
                }
            };
        // A run that never reached the target counts as reaching it one epoch after its last (a
        // bound: the table says so); a pair whose faster arm never reached it measures nothing.
        let censored = |r: &RunResult| epochs(r).unwrap_or(max_epochs as f64 + 1.0);
        let ratio = |slow: &RunResult, fast: &RunResult| {
            epochs(fast)?;
            Some(censored(slow) / censored(fast))
        };
        claim(
            &format!(
                "ReLU reaches {:.0}% training error faster than tanh (Figure 1)",
                pct(target)
            ),
            "6x",
            "tanh",
            Unit::Ratio,
            &|base, var| ratio(var, base),
        );
        let err1 =
            |r: &RunResult| last_epochs(r, |e| Some(1.0 - e.val_top1.unwrap_or(e.train_top1)));
        let err5 =
            |r: &RunResult| last_epochs(r, |e| Some(1.0 - e.val_top5.unwrap_or(e.train_top5)));
        let gap = |r: &RunResult| last_epochs(r, |e| e.val_top1.map(|v| e.train_top1 - v));
        for (variant, what, p1, p5) in [
            (
                "non-overlapping-pool",
                "Overlapping pooling lowers",
                "0.4",
                "0.3",
            ),
            ("no-lighting", "PCA lighting lowers", "over 1", "-"),
            ("no-crops-flips", "Crops and flips lower", "not stated", "-"),
            ("no-dropout", "Dropout lowers", "not stated", "-"),
        ] {
            claim(
                &format!("{what} top-1 error (points)"),
                p1,
                variant,
                Unit::Points,
                &|b, v| Some(pct(err1(v)? - err1(b)?)),
            );
            if p5 != "-" {
                claim(
                    &format!("{what} top-5 error (points)"),
                    p5,
                    variant,
                    Unit::Points,
                    &|b, v| Some(pct(err5(v)? - err5(b)?)),
                );
            }
        }
        // LRN: the arm with it minus the arm without, whichever is the baseline.
        for (variant, sign) in [("lrn", -1.0), ("no-lrn", 1.0)] {
            claim(
                "Response normalization lowers top-1 error (points)",
                "1.4",
                variant,
                Unit::Points,
                &move |b, v| Some(sign * pct(err1(v)? - err1(b)?)),
            );
            claim(
                "Response normalization lowers top-5 error (points)",
                "1.2",
                variant,
                Unit::Points,
                &move |b, v| Some(sign * pct(err5(v)? - err5(b)?)),
            );
        }
        for (variant, what) in [
            (
                "no-dropout",
                "Dropout narrows the train-val top-1 gap (points)",
            ),
            (
                "no-crops-flips",
                "Crops and flips narrow the train-val top-1 gap (points)",
            ),
        ] {
            claim(
                what,
                "\"substantial overfitting\" without",
                variant,
                Unit::Points,
                &|b, v| Some(pct(gap(v)? - gap(b)?)),
            );
        }
        claim(
            &format!(
                "Dropout takes more epochs to {:.0}% training error",
                pct(target)
            ),
            "about 2x",
            "no-dropout",
            Unit::Ratio,
            &|base, var| ratio(base, var),
        );
        rows
    }

    fn markdown(&self, rows: &[ClaimRow], results: &[RunResult]) -> String {
        let epochs = results.iter().map(|r| r.history.len()).max().unwrap_or(0);
        let mut s = format!(
            "# AlexNet's claims, re-run\n\n{} variants x {} seeds ({:?}), {epochs} epochs each. \
             Effects are the variant against the baseline with the same seed, as mean ± std over \
             seeds, signed so that a positive value agrees with the paper; errors and gaps \
             are the mean of each run's last {LAST_EPOCHS} epochs. Reproduced: `yes` when \
             the mean agrees and exceeds one standard deviation, `weak` when it agrees within \
             the spread, `no` when it disagrees, `-` when nothing could be measured. In the \
             epoch ratios, a run that never reached the target training error counts as \
             reaching it one epoch after the last (so the ratio is a lower bound), and a seed \
             whose faster arm never reached it is left out.\n\n",
            self.variants.len(),
            self.seeds.len(),
            self.seeds
        );
        s.push_str("| claim | paper | variant | measured | seeds | reproduced |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for r in rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.claim,
                r.paper,
                r.variant,
                r.measured(),
                r.n,
                r.verdict()
            ));
        }
        s.push_str(&format!(
            "\n## Last {LAST_EPOCHS} epochs, mean over runs and seeds\n\n"
        ));
        s.push_str("| variant | train top-1 | val top-1 | val top-5 | epochs to target |\n");
        s.push_str("|---|---|---|---|---|\n");
        for v in &self.variants {
            let runs: Vec<_> = results.iter().filter(|r| r.variant == v.name).collect();
            let mean = |f: &dyn Fn(&EpochRecord) -> Option<f64>| {
                let xs: Vec<f64> = runs.iter().filter_map(|r| last_epochs(r, f)).collect();
                match mean_std(&xs) {
                    Some((m, _)) => format!("{:.1}%", 100.0 * m),
                    None => "-".into(),
                }
            };
            let reached: Vec<String> = runs
                .iter()
                .map(|r| {
                    epochs_to(&r.history, self.target_error)
                        .map_or("never".into(), |e| format!("{e:.1}"))
                })
                .collect();
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                v.name,
                mean(&|e| Some(e.train_top1)),
                mean(&|e| e.val_top1),
                mean(&|e| e.val_top5),
                reached.join(", ")
            ));
        }
        s
    }

    fn charts(&self, results: &[RunResult]) -> Vec<Chart> {
        let curve = |variant: &str, f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Series {
            let runs: Vec<_> = results.iter().filter(|r| r.variant == variant).collect();
            let epochs = runs.iter().map(|r| r.history.len()).max().unwrap_or(0);
            let mut series = Series {
                name: variant.into(),
                ..Default::default()
            };
            for e in 0..epochs {
                let xs: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.history.get(e).and_then(f))
                    .map(|v| 100.0 * v)
                    .collect();
                if let Some((m, _)) = mean_std(&xs) {
                    let x = (e + 1) as f64;
                    let (lo, hi) = xs
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                            (l.min(v), h.max(v))
                        });
                    series.points.push((x, m));
                    series.band.push((x, lo, hi));
                }
            }
            series
        };
        let val_err = |e: &EpochRecord| Some(1.0 - e.val_top1.unwrap_or(e.train_top1));
        let train_err = |e: &EpochRecord| Some(1.0 - e.train_top1);
        let mut figure1: Vec<Series> = ["baseline", "tanh"]
            .into_iter()
            .filter(|v| self.variants.iter().any(|x| x.name == *v))
            .map(|v| {
                let mut s = curve(v, &train_err);
                s.name = if v == "tanh" {
                    "tanh"
                } else {
                    "ReLU (baseline)"
                }
                .into();
                s
            })
            .collect();
        let epochs = results.iter().map(|r| r.history.len()).max().unwrap_or(1);
        figure1.push(Series {
            name: format!("{:.0}% training error", 100.0 * self.target_error),
            points: vec![
                (1.0, 100.0 * self.target_error),
                (epochs as f64, 100.0 * self.target_error),
            ],
            ..Default::default()
        });
        let seeds = self.seeds.len();
        vec![
            Chart {
                title: format!("Val top-1 error (band: {seeds} seeds)"),
                x_label: "epoch".into(),
                y_label: "error %".into(),
                series: self
                    .variants
                    .iter()
                    .map(|v| curve(&v.name, &val_err))
                    .collect(),
            },
            Chart {
                title: "Figure 1: training error, ReLU vs tanh".into(),
                x_label: "epoch".into(),
                y_label: "training error %".into(),
                series: figure1,
            },
        ]
    }
}

/// How a claim's effect is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Percentage points; the paper's direction is positive.
    Points,
    /// A ratio; the paper's direction is above 1.
    Ratio,
}

/// One measured claim.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRow {
    pub claim: String,
    /// The paper's figure, as it states it.
    pub paper: String,
    pub variant: String,
    pub unit: Unit,
    /// Mean and standard deviation (n - 1) of the per-seed effects; std 0 for one seed.
    pub mean: f64,
    pub std: f64,
    /// The seeds measured.
    pub n: usize,
}

impl ClaimRow {
    fn new(claim: &str, paper: &str, variant: &str, unit: Unit, effects: &[f64]) -> Self {
        let (mean, std) = mean_std(effects).unwrap_or((f64::NAN, f64::NAN));
        Self {
            claim: claim.into(),
            paper: paper.into(),
            variant: variant.into(),
            unit,
            mean,
            std,
            n: effects.len(),
        }
    }

    /// The effect as the table shows it: `2.1 ± 0.4` points or `3.0x ± 0.5`.
    pub fn measured(&self) -> String {
        if self.n == 0 {
            return "not measurable".into();
        }
        match self.unit {
            Unit::Points => format!("{:+.1} ± {:.1}", self.mean, self.std),
            Unit::Ratio => format!("{:.2}x ± {:.2}", self.mean, self.std),
        }
    }

    /// `yes`, `weak` or `no` (see the table's header), or `-` without measurements.
    pub fn verdict(&self) -> &'static str {
        let effect = match self.unit {
            Unit::Points => self.mean,
            Unit::Ratio => self.mean - 1.0,
        };
        if !effect.is_finite() {
            "-"
        } else if effect > 0.0 && (self.n < 2 || effect > self.std) {
            "yes"
        } else if effect > 0.0 {
            "weak"
        } else {
            "no"
        }
    }
}

/// The epochs a run's final figures average: single epochs of a short run at a constant rate
/// are noisy (validation error moves by several points from one epoch to the next).
pub const LAST_EPOCHS: usize = 3;

/// The mean of `f` over a run's last [`LAST_EPOCHS`] epochs.
fn last_epochs(r: &RunResult, f: impl Fn(&EpochRecord) -> Option<f64>) -> Option<f64> {
    let tail = &r.history[r.history.len().saturating_sub(LAST_EPOCHS)..];
    let xs: Option<Vec<f64>> = tail.iter().map(f).collect();
    mean_std(&xs?).map(|(m, _)| m)
}

/// The baseline and `variant` runs of each seed both ran.
fn paired<'a>(
    results: &'a [RunResult],
    variant: &'a str,
) -> impl Iterator<Item = (&'a RunResult, &'a RunResult)> + 'a {
    results
        .iter()
        .filter(move |r| r.variant == variant && !r.history.is_empty())
        .filter_map(move |v| {
            results
                .iter()
                .find(|b| b.variant == "baseline" && b.seed == v.seed && !b.history.is_empty())
                .map(|b| (b, v))
        })
}

/// When a run's training error first reached `target`, in epochs, interpolated linearly within
/// the epoch that crossed it (from the previous epoch's error; from chance, 1, before the
/// first); `None` if it never did.
pub fn epochs_to(history: &[EpochRecord], target: f64) -> Option<f64> {
    let mut before = 1.0;
    for (i, e) in history.iter().enumerate() {
        let err = 1.0 - e.train_top1;
        if err <= target {
            let into = if before > err {
                (before - target) / (before - err)
            } else {
                1.0
            };
            return Some(i as f64 + into.clamp(0.0, 1.0));
        }
        before = err;
    }
    None
}

/// Mean and sample standard deviation (0 for one value), `None` for none.
fn mean_std(xs: &[f64]) -> Option<(f64, f64)> {
    let n = xs.len();
    if n == 0 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some((mean, var.sqrt()))
}

/// `variant,seed,` then `metrics.csv`'s columns, a row per epoch per run.
fn csv(results: &[RunResult]) -> String {
    let mut s = format!("variant,seed,{}\n", super::report::METRICS_COLUMNS);
    for r in results {
        for e in &r.history {
            s.push_str(&format!("{},{},{}\n", r.variant, r.seed, e.csv_row()));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: usize, train_top1: f64, val_top1: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            lr: 0.01,
            train_loss: 1.0,
            train_top1,
            train_top5: 0.9,
            val_loss: Some(1.0),
            val_top1: Some(val_top1),
            val_top5: Some(0.9),
            seconds: 1.0,
        }
    }

    #[test]
    fn epochs_to_the_target_interpolate_within_the_crossing_epoch() {
        let h = [
            record(1, 0.5, 0.5),
            record(2, 0.7, 0.6),
            record(3, 0.8, 0.7),
        ];
        // Error 0.5 -> 0.3 -> 0.2: 0.25 is crossed halfway through epoch 3.
        assert_eq!(epochs_to(&h, 0.25), Some(2.5));
        // Error from 1 (chance) to 0.5 in epoch 1: 0.75 is reached half way.
        assert_eq!(epochs_to(&h, 0.75), Some(0.5));
        assert_eq!(epochs_to(&h, 0.1), None);
    }

    #[test]
    fn claims_pair_seeds_and_sign_effects_the_papers_way() {
        let study = Study::paper(
            &Config::torchvision().with_classes(10),
            &TrainConfig::default(),
            Preprocess::torchvision(),
            vec![1, 2],
        )
        .unwrap();
        assert_eq!(
            study
                .variants
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            VARIANTS
        );
        let run = |variant: &str, seed, val: f64, train: [f64; 2]| RunResult {
            variant: variant.into(),
            seed,
            history: vec![record(1, train[0], val - 0.1), record(2, train[1], val)],
        };
        let results = [
            run("baseline", 1, 0.80, [0.6, 0.9]),
            run("baseline", 2, 0.82, [0.6, 0.9]),
            // LRN helps by 2 and 4 points on the two seeds.
            run("lrn", 1, 0.82, [0.6, 0.9]),
            run("lrn", 2, 0.86, [0.6, 0.9]),
            // tanh never reaches 25% error in 2 epochs: counted as 3.
            run("tanh", 1, 0.70, [0.3, 0.5]),
            run("tanh", 2, 0.70, [0.3, 0.5]),
        ];
        let rows = study.claims(&results);
        let lrn = rows
            .iter()
            .find(|r| r.variant == "lrn" && r.claim.contains("top-1"))
            .unwrap();
        assert!((lrn.mean - 3.0).abs() < 1e-9 && (lrn.std - 2f64.sqrt()).abs() < 1e-9);
        assert_eq!(lrn.n, 2);
        assert_eq!(lrn.verdict(), "yes");
        let tanh = rows.iter().find(|r| r.variant == "tanh").unwrap();
        // The baseline crosses 25% error at 1 + (0.4 - 0.25) / (0.4 - 0.1) = 1.5 epochs.
        assert!((tanh.mean - 3.0 / 1.5).abs() < 1e-9, "{tanh:?}");
        assert_eq!(tanh.measured(), "2.00x ± 0.00");
        // Variants that did not run have no row.
        assert!(rows.iter().all(|r| r.variant != "no-dropout"));
    }

    #[test]
    fn only_keeps_the_baseline_and_refuses_unknown_variants() {
        let study = Study::paper(
            &Config::bvlc_alexnet(),
            &TrainConfig::default(),
            Preprocess::caffe(),
            vec![0],
        )
        .unwrap();
        // The Caffe layouts have LRN: their arm drops it.
        assert!(study
            .variants
            .iter()
            .any(|v| v.name == "no-lrn" && !v.model.lrn));
        let names = |s: &Study| {
            s.variants
                .iter()
                .map(|v| v.name.clone())
                .collect::<Vec<_>>()
        };
        let kept = study.clone().only(&["tanh".into(), "lrn".into()]).unwrap();
        assert_eq!(names(&kept), ["baseline", "tanh", "no-lrn"]);
        let err = study.only(&["relu6".into()]).unwrap_err();
        assert!(err.to_string().contains("relu6"), "{err}");
    }
}
