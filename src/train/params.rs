//! The run's parameters: fresh seeded weights, pretrained ones on top, and the optimizer's
//! groups under a [`ParamPolicy`].

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::optim::ParamGroup;
use super::ParamPolicy;
use crate::error::{Error, Result};
use crate::models::alexnet::{AlexNet, Config};
use crate::rng::Rng;

/// Stream id of the initial weights.
const INIT_STREAM: u64 = u64::MAX - 2;

/// Where a run's weights start.
pub(super) enum Start<'a> {
    /// Fresh seeded weights (see [`init_weights`]), then these (checkpoint key names) on top:
    /// layers without an entry, such as a new head, keep their fresh weights.
    Fresh {
        seed: u64,
        pretrained: &'a [(String, Tensor)],
    },
    /// Every variable from these tensors, read from `from` (a checkpoint being resumed).
    Restored {
        tensors: &'a HashMap<String, Tensor>,
        from: &'a std::path::Path,
    },
}

/// The model of `config` on `device` with its weights in variables, by checkpoint key, set as
/// `start` says. A tensor without a place in the model, or of the wrong shape, is an error
/// naming it; so is a variable a restored checkpoint lacks.
pub(super) fn build_model(
    config: &Config,
    start: Start,
    device: &Device,
) -> Result<(AlexNet, HashMap<String, Var>)> {
    let varmap = VarMap::new();
    let model = AlexNet::new(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let vars: HashMap<String, Var> = varmap
        .data()
        .lock()
        .expect("VarMap lock poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let set = |key: &str, var: &Var, t: &Tensor| -> Result<()> {
        if var.dims() != t.dims() {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                expected: var.dims().to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(var.set(&t.to_device(device)?.to_dtype(DType::F32)?)?)
    };
    match start {
        Start::Fresh { seed, pretrained } => {
            init_weights(&model, &vars, seed)?;
            for (key, t) in pretrained {
                let var = vars.get(key).ok_or_else(|| {
                    Error::Invalid(format!(
                        "pretrained weight `{key}` has no place in a {} model",
                        config.layout
                    ))
                })?;
                set(key, var, t)?;
            }
        }
        Start::Restored { tensors, from } => {
            for (key, var) in &vars {
                let t = tensors.get(key).ok_or_else(|| Error::MissingKey {
                    key: key.clone(),
                    hint: from.display().to_string(),
                })?;
                set(key, var, t)?;
            }
        }
    }
    Ok((model, vars))
}

/// Fresh weights from the run's seed (candle's own initialisers draw from its unseeded RNG):
/// He-uniform weights, `U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`, which keep the scale of ReLU
/// activations through the layers (PyTorch's default shrinks them layer by layer, and a small
/// AlexNet then barely starts), a head at a tenth of that, and zero biases.
fn init_weights(model: &AlexNet, vars: &HashMap<String, Var>, seed: u64) -> Result<()> {
    let head = model
        .layers()
        .into_iter()
        .find(|l| l.is_head())
        .map(|l| format!("{}.", l.key))
        .expect("a model has a head");
    let mut keys: Vec<&String> = vars.keys().collect();
    keys.sort();
    for (i, key) in keys.into_iter().enumerate() {
        let var = &vars[key];
        let dims = var.dims().to_vec();
        let n = var.elem_count();
        let values = if key.ends_with(".weight") {
            let fan_in: usize = dims[1..].iter().product();
            // The head starts 10x smaller: near-uniform first predictions, a loss near
            // ln(classes), instead of large random logits that the first steps overshoot.
            let scale = if key.starts_with(&head) { 0.1 } else { 1.0 };
            let bound = scale * (6.0 / fan_in.max(1) as f64).sqrt() as f32;
            let mut rng = Rng::stream(seed, &[INIT_STREAM, i as u64]);
            (0..n)
                .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                .collect()
        } else {
            vec![0f32; n]
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// The optimizer's parameter groups under `policy`: frozen layers left out; biases at 2x lr
/// without decay under Caffe's policy; the head (fc8) at `head_lr_mult`.
pub fn param_groups(
    model: &AlexNet,
    vars: &HashMap<String, Var>,
    policy: &ParamPolicy,
) -> Result<Vec<ParamGroup>> {
    let (bias_lr, bias_wd) = if policy.caffe_biases {
        (2.0, 0.0)
    } else {
        (1.0, policy.weight_decay)
    };
    let mut groups: Vec<ParamGroup> = Vec::new();
    let mut add = |name: &str, key: String, lr: f64, wd: f64| -> Result<()> {
        let var = vars
            .get(&key)
            .ok_or_else(|| Error::Invalid(format!("no variable `{key}` in the model")))?
            .clone();
        match groups.iter_mut().find(|g| g.name == name) {
            Some(g) => g.params.push((key, var)),
            None => groups.push(
                ParamGroup::new(name, vec![(key, var)])
                    .lr_mult(lr)
                    .weight_decay(wd),
            ),
        }
        Ok(())
    };
    let trained = model
        .layers()
        .into_iter()
        .filter(|l| policy.freeze_through.is_none_or(|f| l.tap > f));
    for layer in trained {
        let (lr, tag) = if layer.is_head() {
            (policy.head_lr_mult, "head ")
        } else {
            (1.0, "")
        };
        let key = layer.key;
        add(
            &format!("{tag}weights"),
            format!("{key}.weight"),
            lr,
            policy.weight_decay,
        )?;
        add(
            &format!("{tag}biases"),
            format!("{key}.bias"),
            lr * bias_lr,
            bias_wd,
        )?;
    }
    if groups.is_empty() {
        return Err(Error::Invalid(format!(
            "freezing through {} leaves nothing to train",
            policy.freeze_through.map_or("-".into(), |t| t.to_string())
        )));
    }
    Ok(groups)
}
