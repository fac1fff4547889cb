//! Evaluation: loss, top-1, top-5 and the confusion matrix of a model on a labelled set, on
//! the centre crop or the paper's ten crops.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::Event;
use crate::data::augment::Augment;
use crate::data::dataset::{ImageFolder, LabelledLoader};
use crate::error::Result;
use crate::models::alexnet::AlexNet;

/// Loss and accuracy over a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub images: usize,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    /// `confusion[true][predicted]` image counts.
    pub confusion: Vec<Vec<u64>>,
    /// Images that could not be read, with why.
    pub failed: Vec<(PathBuf, String)>,
}

impl Evaluation {
    /// The confusion matrix as an aligned text table, one row per true class.
    ///
    /// ```
    /// use candle_zoo::train::Evaluation;
    /// let eval = Evaluation {
    ///     images: 3, loss: 0.5, top1: 2.0 / 3.0, top5: 1.0,
    ///     confusion: vec![vec![1, 1], vec![0, 1]], failed: vec![],
    /// };
    /// let table = eval.confusion_table(&["cat".into(), "dog".into()]);
    /// assert_eq!(table.lines().nth(1), Some("[0] cat   1   1"));
    /// ```
    pub fn confusion_table(&self, classes: &[String]) -> String {
        let labels: Vec<String> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| format!("[{i}] {c}"))
            .collect();
        let label_w = labels.iter().map(|l| l.len()).max().unwrap_or(0);
        let max = self.confusion.iter().flatten().max().copied().unwrap_or(0);
        let cell_w = max.to_string().len().max(classes.len().to_string().len()) + 3;
        let mut out = " ".repeat(label_w);
        for j in 0..classes.len() {
            out.push_str(&format!("{:>cell_w$}", format!("[{j}]")));
        }
        out.push('\n');
        for (label, row) in labels.iter().zip(&self.confusion) {
            out.push_str(&format!("{label:<label_w$}"));
            for n in row {
                out.push_str(&format!("{n:>cell_w$}"));
            }
            out.push('\n');
        }
        out
    }
}

/// Top-1 and top-5 hits of a batch of logits.
pub(super) fn hits(logits: &Tensor, labels: &[u32]) -> Result<(u64, u64)> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut top1, mut top5) = (0, 0);
    for (row, &label) in rows.iter().zip(labels) {
        let rank = rank_of(row, label as usize);
        top1 += (rank == 0) as u64;
        top5 += (rank < 5) as u64;
    }
    Ok((top1, top5))
}

/// How many classes score strictly higher than `label` (ties count in the label's favour).
fn rank_of(row: &[f32], label: usize) -> usize {
    let s = row[label];
    row.iter().filter(|&&v| v > s).count()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Loss, top-1, top-5 and the confusion matrix of `model` on `data`, in eval mode (no
/// dropout), on the centre crop of `augment`'s pipeline or, with `ten_crop`, the softmax
/// averaged over the paper's ten crops.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &AlexNet,
    data: Arc<ImageFolder>,
    augment: &Augment,
    batch_size: usize,
    workers: usize,
    ten_crop: bool,
    device: &Device,
    observer: &mut dyn FnMut(Event) -> ControlFlow<()>,
) -> Result<Evaluation> {
    let classes = model.num_classes();
    let mut eval = Evaluation {
        images: 0,
        loss: 0.0,
        top1: 0.0,
        top5: 0.0,
        confusion: vec![vec![0; classes]; classes],
        failed: Vec::new(),
    };
    let (mut loss_sum, mut top1, mut top5) = (0.0, 0u64, 0u64);
    let _ = observer(Event::EvalStart { images: data.len() });
    let mut score = |probs: Vec<Vec<f32>>, labels: &[u32], eval: &mut Evaluation| {
        for (row, &label) in probs.iter().zip(labels) {
            let label = label as usize;
            let rank = rank_of(row, label);
            top1 += (rank == 0) as u64;
            top5 += (rank < 5) as u64;
            loss_sum -= (row[label].max(1e-30) as f64).ln();
            eval.confusion[label][argmax(row)] += 1;
            eval.images += 1;
        }
    };
    if ten_crop {
        for (path, label) in data.samples() {
            let crops = crate::data::guard_decode(path, || {
                augment
                    .preprocess
                    .open(path)
                    .and_then(|img| augment.ten_crop(&img))
            });
            let crops = match crops {
                Ok(c) => c,
                Err(e) => {
                    let _ = observer(Event::Skipped { path, error: &e });
                    eval.failed.push((path.clone(), e.to_string()));
                    continue;
                }
            };
            let side = augment.preprocess.crop as usize;
            let x = Tensor::from_vec(crops.concat(), (crops.len(), 3, side, side), device)?;
            let probs =
                candle_nn::ops::softmax(&model.forward_t(&x, false)?, 1)?.mean_keepdim(0)?;
            score(probs.to_vec2::<f32>()?, &[*label as u32], &mut eval);
            let _ = observer(Event::EvalBatch { images: 1 });
        }
    } else {
        let order: Vec<usize> = (0..data.len()).collect();
        let loader = LabelledLoader::new(
            data.clone(),
            order,
            augment.clone(),
            batch_size,
            false,
            workers,
            0,
            0,
        )?;
        for batch in loader {
            let batch = batch?;
            for (path, error) in &batch.failed {
                let _ = observer(Event::Skipped { path, error });
                eval.failed.push((path.clone(), error.to_string()));
            }
            if batch.is_empty() {
                continue;
            }
            let (x, _) = batch.tensors(device)?;
            let probs = candle_nn::ops::softmax(&model.forward_t(&x, false)?, 1)?;
            score(probs.to_vec2::<f32>()?, &batch.labels, &mut eval);
            let _ = observer(Event::EvalBatch {
                images: batch.len(),
            });
        }
    }
    let n = eval.images.max(1) as f64;
    eval.loss = loss_sum / n;
    eval.top1 = top1 as f64 / n;
    eval.top5 = top5 as f64 / n;
    Ok(eval)
}
