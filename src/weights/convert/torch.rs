//! PyTorch `.pth` (zip) and safetensors files as a source network: their weights in module
//! order.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{Op, Param, SourceNet};
use crate::error::{Error, Result};
use crate::models::alexnet::Layout;
use crate::weights::{metadata, Checkpoint, Format};

/// Reads a PyTorch or safetensors file: its weights in module order, and the layout its
/// metadata names, if any.
pub(super) fn read_torch(path: &Path) -> Result<(SourceNet, Option<Layout>)> {
    let ckpt = Checkpoint::open(path)?;
    let tensors: Vec<(String, Tensor)> = match ckpt.format() {
        Format::Safetensors => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::checkpoint(path, e))?
            .into_iter()
            .collect(),
        Format::Pth => crate::weights::pth::tensors(path)?.into_iter().collect(),
    };
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let param = |key: &str| -> Result<Param> {
        let t = by_name.get(key).ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
            hint: format!("{}: a weight without its bias", path.display()),
        })?;
        let t = t.to_dtype(DType::F32)?;
        Ok(Param {
            shape: t.dims().to_vec(),
            data: t.flatten_all()?.to_vec1()?,
        })
    };
    // Weights in module order: convolutions (4-D) then linear layers (2-D), each sorted by their
    // module path with numbers compared as numbers (`features.10` after `features.8`).
    let mut convs = Vec::new();
    let mut fcs = Vec::new();
    for (key, t) in &tensors {
        if let Some(prefix) = key.strip_suffix(".weight") {
            match t.rank() {
                4 => convs.push(prefix),
                2 => fcs.push(prefix),
                _ => {}
            }
        }
    }
    convs.sort_by_key(|p| natural_key(p));
    fcs.sort_by_key(|p| natural_key(p));
    let mut ops = Vec::new();
    for prefix in convs {
        ops.push(Op::Conv {
            name: prefix.to_string(),
            weight: param(&format!("{prefix}.weight"))?,
            bias: param(&format!("{prefix}.bias"))?,
            groups: None,
            stride: None,
            pad: None,
        });
    }
    for prefix in fcs {
        ops.push(Op::Fc {
            name: prefix.to_string(),
            weight: param(&format!("{prefix}.weight"))?,
            bias: param(&format!("{prefix}.bias"))?,
            transposed: false,
        });
    }
    let hint = metadata::layout(ckpt.metadata()).map_err(|e| Error::checkpoint(path, e))?;
    Ok((
        SourceNet {
            name: String::new(),
            ops,
        },
        hint,
    ))
}

/// Sort key that orders `a.10` after `a.8`.
fn natural_key(s: &str) -> Vec<(u64, String)> {
    s.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, part.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_ten_after_eight() {
        let mut keys = vec!["features.10", "features.8", "features.0", "features.3"];
        keys.sort_by_key(|k| natural_key(k));
        assert_eq!(
            keys,
            ["features.0", "features.3", "features.8", "features.10"]
        );
    }
}
