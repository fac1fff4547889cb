//! Gradients summed over the ranks in a few flat buckets, as PyTorch's DDP does: one collective
//! per bucket instead of one per parameter (16 in AlexNet), each large enough to run at the
//! link's bandwidth.

use std::rc::Rc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::watchdog::Watchdog;
use super::{collective_timeout, Collective};
use crate::error::Result;

/// A bucket's size, as DDP's default `bucket_cap_mb`: AlexNet's fc6 and fc7 weights (144 and
/// 64 MiB) get one each, the other 14 parameters (25.2 MiB) share two.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The parameters of a data-parallel run, in buckets, and the collective that sums them.
pub struct GradSync {
    comm: Rc<dyn Collective>,
    /// `None` in a world of one, where nothing waits.
    watchdog: Option<Watchdog>,
    buckets: Vec<Vec<(String, Var)>>,
}

impl GradSync {
    /// Buckets `params` in name order (every rank must build the same buckets) up to
    /// `bucket_bytes` each; a parameter of that size or more has a bucket of its own.
    pub fn new(
        comm: Rc<dyn Collective>,
        mut params: Vec<(String, Var)>,
        bucket_bytes: usize,
    ) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let mut buckets: Vec<Vec<(String, Var)>> = Vec::new();
        // The small parameters fill a bucket in turn; a large one goes alone, leaving it open.
        let (mut open, mut bytes) = (Vec::new(), 0);
        for (name, var) in params {
            let size = var.elem_count() * 4;
            if size >= bucket_bytes {
                buckets.push(vec![(name, var)]);
                continue;
            }
            if bytes + size > bucket_bytes {
                buckets.push(std::mem::take(&mut open));
                bytes = 0;
            }
            bytes += size;
            open.push((name, var));
        }
        if !open.is_empty() {
            buckets.push(open);
        }
        let watchdog = (comm.world_size() > 1)
            .then(|| collective_timeout().map(|t| Watchdog::new(comm.rank(), comm.world_size(), t)))
            .transpose()?;
        Ok(Self {
            comm,
            watchdog,
            buckets,
        })
    }

    pub fn comm(&self) -> &dyn Collective {
        &*self.comm
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The parameter names of each bucket, in the order they are summed.
    pub fn buckets(&self) -> Vec<Vec<&str>> {
        self.buckets
            .iter()
            .map(|b| b.iter().map(|(n, _)| n.as_str()).collect())
            .collect()
    }

    fn watch<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        match &self.watchdog {
            Some(w) => w.watch(what, f),
            None => f(),
        }
    }

    /// The sum over the ranks of `scale` times each parameter's gradient in `grads` (zeros for
    /// a rank without one, e.g. one whose share of the batch was empty), as a new store keyed
    /// like `grads`. With `scale` = this rank's share of the batch, the result is the gradient of
    /// the whole batch's mean loss. In a world of one this is `grads` scaled.
    pub fn all_reduce_grads(&self, grads: Option<&GradStore>, scale: f64) -> Result<GradStore> {
        let mut out = GradStore::default();
        for bucket in &self.buckets {
            let flat = bucket
                .iter()
                .map(|(_, var)| {
                    let g = match grads.and_then(|g| g.get(var.as_tensor())) {
                        Some(g) => (g.to_dtype(DType::F32)?.flatten_all()? * scale)?,
                        None => Tensor::zeros(var.elem_count(), DType::F32, var.device())?,
                    };
                    Ok(g)
                })
                .collect::<Result<Vec<_>>>()?;
            let flat = Tensor::cat(&flat, 0)?;
            let summed = self.watch("a gradient all-reduce", || self.comm.all_reduce(&flat))?;
            let mut at = 0;
            for (_, var) in bucket {
                let n = var.elem_count();
                let g = summed
                    .narrow(0, at, n)?
                    .reshape(var.shape())?
                    .to_dtype(var.dtype())?;
                out.insert(var.as_tensor(), g);
                at += n;
            }
        }
        Ok(out)
    }

    /// Sums `values` over the ranks, in place (counts, loss sums, metrics).
    pub fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        self.watch("a metrics all-reduce", || self.comm.all_reduce_f64(values))
    }

    /// Sets every variable of `vars` to rank 0's value (the others contribute zeros to a sum),
    /// so that all ranks start from the same weights whatever each read or drew.
    pub fn broadcast_from_rank0(&self, vars: &[(String, Var)]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mine = self.rank() == 0;
        for (_, var) in vars {
            let t = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
            let t = if mine { t } else { t.zeros_like()? };
            let summed = self.watch("the weights' broadcast", || self.comm.all_reduce(&t))?;
            var.set(&summed.reshape(var.shape())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Checks that every rank holds the same `values` (settings, data sizes, weights' sums):
    /// their sum must be `world` times this rank's. `what` names them in the error.
    pub fn check_same(&self, what: &str, values: &[f64]) -> Result<()> {
        let mut sum = values.to_vec();
        self.all_reduce_f64(&mut sum)?;
        let world = self.world_size() as f64;
        let same = sum
            .iter()
            .zip(values)
            .all(|(s, v)| (s - world * v).abs() <= 1e-9 * (world * v).abs().max(1.0));
        if same {
            Ok(())
        } else {
            Err(crate::error::Error::Distributed {
                rank: self.rank(),
                world: self.world_size(),
                reason: format!(
                    "the processes disagree on {what}: start them all with the same \
                     settings and data"
                ),
            })
        }
    }

    /// Ends every process of the run (see [`Collective::abort`]).
    pub fn abort(&self, code: i32) {
        self.comm.abort(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Single;
    use candle_core::Device;

    #[test]
    fn buckets_are_sorted_capped_and_a_big_parameter_stands_alone() {
        let d = Device::Cpu;
        let var = |n: usize| Var::zeros(n, DType::F32, &d).unwrap();
        let params = vec![
            ("fc6.weight".to_string(), var(1000)),
            ("conv1.bias".to_string(), var(10)),
            ("conv1.weight".to_string(), var(200)),
            ("conv2.weight".to_string(), var(300)),
        ];
        let sync = GradSync::new(Rc::new(Single), params, 2400).unwrap();
        assert_eq!(
            sync.buckets(),
            vec![
                vec!["fc6.weight"],
                vec!["conv1.bias", "conv1.weight", "conv2.weight"]
            ]
        );
        let sync = GradSync::new(Rc::new(Single), sync.buckets.concat(), 1201).unwrap();
        assert_eq!(
            sync.buckets(),
            vec![
                vec!["conv1.bias", "conv1.weight"],
                vec!["fc6.weight"],
                vec!["conv2.weight"]
            ]
        );
    }

    #[test]
    fn a_world_of_one_scales_and_fills_missing_gradients_with_zeros() {
        let d = Device::Cpu;
        let a = Var::new(&[1f32, 2., 3.], &d).unwrap();
        let b = Var::new(&[[1f32, 1.], [1., 1.]], &d).unwrap();
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let sync = GradSync::new(Rc::new(Single), params, BUCKET_BYTES).unwrap();
        let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let grads = loss.backward().unwrap();
        let out = sync.all_reduce_grads(Some(&grads), 0.5).unwrap();
        let ga = out.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ga, vec![0.5, 1.0, 1.5]);
        let gb = out.get(b.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gb, vec![vec![0.0, 0.0], vec![0.0, 0.0]]);
        sync.check_same("nothing", &[1.0, 2.0]).unwrap();
    }
}
