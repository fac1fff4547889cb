//! Stochastic gradient descent with momentum and weight decay (PyTorch's `torch.optim.SGD`
//! semantics), parameter groups with their own learning-rate multiplier and weight decay,
//! learning-rate schedules, and optimizer state that can be saved in a checkpoint. [`Sgd`]
//! implements candle's [`candle_nn::Optimizer`] too.
//!
//! candle's own `candle_nn::SGD` has neither momentum nor weight decay. [`Sgd`] follows
//! `torch/optim/sgd.py` (`_single_tensor_sgd`) step for step:
//!
//! ```text
//! d_p = grad + weight_decay * p
//! if momentum != 0:
//!     buf = d_p                                            (first step of this parameter)
//!     buf = momentum * buf + (1 - dampening) * d_p         (later steps)
//!     d_p = d_p + momentum * buf  if nesterov  else  buf
//! p = p - lr * d_p
//! ```
//!
//! On the CPU, f32 and f64 parameters are updated in place in one pass over memory (weight decay,
//! momentum and the update fused in a candle in-place op); elsewhere the same maths runs as tensor
//! ops followed by [`candle_core::Var::set`].
//!
//! [`Scheduler`] drives the learning rate from epoch to epoch ([`LrSchedule`]: constant, PyTorch's
//! `StepLR`, or `ReduceLROnPlateau`).

#[cfg(feature = "cuda")]
mod cuda;
mod schedule;
mod sgd;

pub use schedule::{LrSchedule, PlateauMode, Scheduler};
pub use sgd::{ParamGroup, Sgd, SgdConfig, SgdState};
