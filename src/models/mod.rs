//! The models, one folder each: [`alexnet`] today.
//!
//! A model folder holds the model (a struct with its learnable layers as public fields, a
//! `Config`, `load(vb)` that reads any checkpoint of it, candle's `Module`), the points where it
//! can be tapped, and its training mode. The layers it is built from are in [`crate::layers`],
//! its published weights in [`crate::weights`].

pub mod alexnet;

pub use alexnet::AlexNet;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The `k` largest entries of a 1-D tensor, largest first, as `(index, value)`; ties keep the
/// lower index first.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let p = Tensor::new(&[0.1f32, 0.6, 0.3], &Device::Cpu)?;
/// assert_eq!(candle_zoo::models::top_k(&p, 2)?, vec![(1, 0.6), (2, 0.3)]);
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
