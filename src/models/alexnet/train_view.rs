//! Training mode through candle's `ModuleT`, which `AlexNet`'s own `Module` impl cannot give.

use std::cell::RefCell;

use candle_core::{DType, ModuleT, Tensor};

use super::{AlexNet, Masks, Mode, Tap};
use crate::rng::Rng;

/// AlexNet in training mode for code written against candle's [`ModuleT`], from
/// [`AlexNet::train_view`].
///
/// `AlexNet` implements [`candle_core::Module`] (eval mode, as users expect), and candle
/// implements `ModuleT` for every `Module` by ignoring `train`: `x.apply_t(&model, true)` runs
/// **without** dropout. This view implements only `ModuleT`, so it cannot be mistaken for that:
/// `forward_t(x, true)` applies dropout (and the frozen prefix, if any), `forward_t(x, false)`
/// is eval mode.
///
/// Dropout masks come from candle's RNG, which cannot be seeded on the CPU, unless
/// [`TrainView::with_rng`] gives the crate's seeded [`Rng`] (what the trainer does, so that runs
/// are reproducible).
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_zoo::models::alexnet::{AlexNet, Config, Tap};
/// use candle_zoo::rng::Rng;
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let cfg = Config::torchvision().with_widths([8, 8, 8, 8, 8], 16).with_classes(3);
/// let model = AlexNet::new(&cfg, vb)?;
/// let x = Tensor::ones((2, 3, 64, 64), DType::F32, &Device::Cpu)?;
///
/// // Generic candle code sees training mode only through the view.
/// fn logits<M: ModuleT>(m: &M, x: &Tensor) -> candle_core::Result<Tensor> {
///     x.apply_t(m, true)
/// }
/// let mut rng = Rng::new(7);
/// let view = model.train_view().with_rng(&mut rng).freeze_through(Tap::Fc7);
/// let trained = logits(&view, &x)?;
/// let grads = trained.sum_all()?.backward()?;
/// assert!(grads.get(model.fc8.weight()).is_some());
/// assert!(grads.get(model.fc7.weight()).is_none()); // frozen: never computed
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TrainView<'a> {
    model: &'a AlexNet,
    masks: RefCell<Option<Masks<'a>>>,
    frozen: Option<Tap>,
    compute: Option<DType>,
}

impl<'a> TrainView<'a> {
    pub(super) fn new(model: &'a AlexNet) -> Self {
        Self {
            model,
            masks: RefCell::new(None),
            frozen: None,
            compute: None,
        }
    }

    /// Draws the dropout masks from `rng` instead of candle's unseeded generator.
    pub fn with_rng(self, rng: &'a mut Rng) -> Self {
        Self {
            masks: RefCell::new(Some(Masks::Stream(rng))),
            ..self
        }
    }

    /// Draws each sample's dropout masks from its own stream, `Rng::stream(seed, [epoch,
    /// sample, ..])`, where `samples[i]` is the dataset index of the batch's row `i`: a sample
    /// gets the same masks whatever batch, position or process it is trained in, so a
    /// data-parallel run draws what a single process does (what the trainer uses).
    ///
    /// ```
    /// # use candle_core::{DType, Device, ModuleT, Tensor};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # use candle_zoo::models::alexnet::{AlexNet, Config};
    /// # let varmap = VarMap::new();
    /// # let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// # let model = AlexNet::new(&Config::torchvision().with_widths([8; 5], 16).with_classes(3), vb)?;
    /// let x = Tensor::randn(0f32, 1., (3, 3, 64, 64), &Device::Cpu)?;
    /// let all = model.train_view().with_sample_masks(7, 0, &[10, 11, 12]).forward_t(&x, true)?;
    /// // Row 1 alone (sample 11) gets the logits it had inside the batch.
    /// let one = model.train_view().with_sample_masks(7, 0, &[11]).forward_t(&x.narrow(0, 1, 1)?, true)?;
    /// let diff = (all.narrow(0, 1, 1)? - one)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_sample_masks(self, seed: u64, epoch: u64, samples: &'a [usize]) -> Self {
        Self {
            masks: RefCell::new(Some(Masks::PerSample {
                seed,
                epoch,
                samples,
            })),
            ..self
        }
    }

    /// Freezes the layers up to and including `tap`: their output is detached from the graph,
    /// so a backward pass computes no gradient for them (or for anything before them).
    pub fn freeze_through(self, tap: impl Into<Option<Tap>>) -> Self {
        Self {
            frozen: tap.into(),
            ..self
        }
    }

    /// The model seen through this view.
    /// Mixed precision: the convs and fc layers compute in `dtype` (bf16 for `--precision
    /// bf16`) from casts of the weights, whose gradients come back to them in their own dtype
    /// (f32 master weights, updated in f32); pooling, LRN, dropout's scale and the logits (and
    /// so the loss) stay in the weights' dtype. bf16 has f32's exponent range, so no loss scaling
    /// is needed; f16 (which would need it) is for tests. Evaluation (`train == false`) is
    /// unaffected. `None` (what [`Precision::compute_dtype`](crate::train::Precision::compute_dtype)
    /// gives for f32) computes in the weights' dtype, as without this call.
    ///
    /// ```
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_zoo::models::alexnet::{AlexNet, Config, Layout};
    ///
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let config = Config::for_layout(Layout::TorchVision).with_widths([8, 8, 8, 8, 8], 16).with_classes(3);
    /// let model = AlexNet::new(&config, vb)?;
    /// let x = Tensor::randn(0f32, 1., (2, 3, 224, 224), &Device::Cpu)?;
    /// let logits = model.train_view().with_compute_dtype(DType::F16).forward_t(&x, true)?;
    /// assert_eq!(logits.dtype(), DType::F32); // the loss is computed in f32
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_compute_dtype(self, dtype: impl Into<Option<DType>>) -> Self {
        Self {
            compute: dtype.into(),
            ..self
        }
    }

    pub fn model(&self) -> &'a AlexNet {
        self.model
    }
}

impl ModuleT for TrainView<'_> {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train {
            return Ok(self.model.run(x, Tap::Fc8, Mode::Eval, |_, _| {})?);
        }
        let mut masks = self.masks.borrow_mut();
        let masks = match masks.as_mut() {
            None => None,
            Some(Masks::Stream(rng)) => Some(Masks::Stream(rng)),
            Some(Masks::PerSample {
                seed,
                epoch,
                samples,
            }) => Some(Masks::PerSample {
                seed: *seed,
                epoch: *epoch,
                samples,
            }),
        };
        let mode = Mode::Train {
            masks,
            frozen: self.frozen,
            compute: self.compute,
        };
        Ok(self.model.run(x, Tap::Fc8, mode, |_, _| {})?)
    }
}
