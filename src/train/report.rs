//! What a run reports: a row per epoch in `metrics.csv`, curves in `metrics.png`, and the last
//! evaluation's confusion matrix in `confusion.csv`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::eval::Evaluation;
use super::plot::{render_png, Chart, Series};
use super::{METRICS_CSV, METRICS_PNG};
use crate::error::Result;
use crate::io::csv_field;

/// One epoch's figures. Accuracies are fractions in `[0, 1]`; validation figures are `None`
/// without a validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub train_top5: f64,
    pub val_loss: Option<f64>,
    pub val_top1: Option<f64>,
    pub val_top5: Option<f64>,
    /// Wall-clock seconds of the epoch, evaluation included.
    pub seconds: f64,
}

/// The columns of `metrics.csv`, as its header.
pub(super) const METRICS_COLUMNS: &str =
    "epoch,lr,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5,seconds";

impl EpochRecord {
    /// The record as a row of `metrics.csv` ([`METRICS_COLUMNS`]), without the line end.
    pub(super) fn csv_row(&self) -> String {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        format!(
            "{},{},{:.6},{:.6},{:.6},{},{},{},{:.1}",
            self.epoch,
            self.lr,
            self.train_loss,
            self.train_top1,
            self.train_top5,
            opt(self.val_loss),
            opt(self.val_top1),
            opt(self.val_top5),
            self.seconds
        )
    }
}

/// Rewrites `metrics.csv` and `metrics.png` from the history.
pub(super) fn write_metrics(out: &Path, history: &[EpochRecord]) -> Result<()> {
    let mut csv = format!("{METRICS_COLUMNS}\n");
    for r in history {
        csv.push_str(&r.csv_row());
        csv.push('\n');
    }
    crate::io::write_atomic(out.join(METRICS_CSV), csv.as_bytes())?;
    let series = |name: &str, f: &dyn Fn(&EpochRecord) -> Option<f64>| Series {
        name: name.to_string(),
        points: history
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect(),
        ..Default::default()
    };
    let pct = |v: f64| 100.0 * v;
    let charts = [
        Chart {
            title: "Loss".into(),
            x_label: "epoch".into(),
            y_label: "cross-entropy".into(),
            series: vec![
                series("train", &|r| Some(r.train_loss)),
                series("val", &|r| r.val_loss),
            ],
        },
        Chart {
            title: "Accuracy".into(),
            x_label: "epoch".into(),
            y_label: "%".into(),
            series: vec![
                series("train top-1", &|r| Some(pct(r.train_top1))),
                series("val top-1", &|r| r.val_top1.map(pct)),
                series("val top-5", &|r| r.val_top5.map(pct)),
            ],
        },
    ];
    render_png(&charts, out.join(METRICS_PNG))
}

/// Writes a confusion matrix as CSV: a header of predicted classes, one row per true class.
pub fn write_confusion(path: &Path, eval: &Evaluation, classes: &[String]) -> Result<()> {
    let mut csv = String::from("true\\predicted");
    for c in classes {
        csv.push(',');
        csv.push_str(&csv_field(c));
    }
    csv.push('\n');
    for (c, row) in classes.iter().zip(&eval.confusion) {
        csv.push_str(&csv_field(c));
        for n in row {
            csv.push_str(&format!(",{n}"));
        }
        csv.push('\n');
    }
    crate::io::write_atomic(path, csv.as_bytes())
}
