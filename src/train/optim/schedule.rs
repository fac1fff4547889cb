//! Learning-rate schedules: constant, PyTorch's `StepLR` and `ReduceLROnPlateau`, with their
//! state serialisable so that a resumed run continues the same schedule.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Whether a [`LrSchedule::Plateau`] metric should go down (a loss) or up (an accuracy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    /// Lower is better (e.g. validation loss).
    Min,
    /// Higher is better (e.g. validation top-1).
    Max,
}

/// How the learning rate changes from epoch to epoch. Parses from CLI strings
/// (`"constant"`, `"step:30:0.1"`, `"plateau:max:0.1:5"`, optionally
/// `"plateau:max:0.1:5:<threshold>:<min_lr>"`) and prints back in that form.
///
/// ```
/// use candle_zoo::train::optim::{LrSchedule, PlateauMode};
///
/// let s: LrSchedule = "step:30:0.1".parse()?;
/// assert_eq!(s, LrSchedule::Step { step_size: 30, gamma: 0.1 });
/// let p: LrSchedule = "plateau:max:0.1:5".parse()?;
/// assert_eq!(p, LrSchedule::Plateau { mode: PlateauMode::Max, factor: 0.1, patience: 5,
///                                      threshold: 1e-4, min_lr: 0.0 });
/// assert!("step:0:0.1".parse::<LrSchedule>().unwrap_err().to_string().contains("step size"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LrSchedule {
    /// The base learning rate throughout.
    Constant,
    /// x gamma every `step_size` epochs (PyTorch StepLR; Caffe's "step" policy).
    Step {
        /// Epochs between reductions (>= 1).
        step_size: usize,
        /// Multiplier applied at each reduction.
        gamma: f64,
    },
    /// x factor when the monitored metric has not improved for `patience` epochs
    /// (PyTorch ReduceLROnPlateau, threshold_mode "rel", cooldown 0).
    Plateau {
        /// Whether the metric should fall or rise.
        mode: PlateauMode,
        /// Multiplier applied at each reduction (0 < factor < 1).
        factor: f64,
        /// Epochs without improvement tolerated before reducing.
        patience: usize,
        /// Relative improvement that counts (PyTorch's default 1e-4).
        threshold: f64,
        /// Floor of the learning rate.
        min_lr: f64,
    },
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Constant => write!(f, "constant"),
            Self::Step { step_size, gamma } => write!(f, "step:{step_size}:{gamma}"),
            Self::Plateau {
                mode,
                factor,
                patience,
                threshold,
                min_lr,
            } => {
                let mode = match mode {
                    PlateauMode::Min => "min",
                    PlateauMode::Max => "max",
                };
                write!(f, "plateau:{mode}:{factor}:{patience}:{threshold}:{min_lr}")
            }
        }
    }
}

impl FromStr for LrSchedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |what: String| {
            Error::Invalid(format!(
                "lr schedule `{s}`: {what} (expected `constant`, `step:<epochs>:<gamma>` or \
                 `plateau:<min|max>:<factor>:<patience>[:<threshold>[:<min_lr>]]`)"
            ))
        };
        let parts: Vec<&str> = s.trim().split(':').map(str::trim).collect();
        let float = |name: &str, v: &str| -> Result<f64> {
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => Err(bad(format!("{name} `{v}` is not a finite number"))),
            }
        };
        match parts.as_slice() {
            ["constant"] => Ok(Self::Constant),
            ["step", size, gamma] => {
                let step_size = match size.parse::<usize>() {
                    Ok(n) if n >= 1 => n,
                    _ => return Err(bad(format!("step size `{size}` is not a positive integer"))),
                };
                let gamma = float("gamma", gamma)?;
                if gamma <= 0.0 {
                    return Err(bad(format!("gamma `{gamma}` must be > 0")));
                }
                Ok(Self::Step { step_size, gamma })
            }
            ["plateau", mode, factor, patience, rest @ ..] if rest.len() <= 2 => {
                let mode = match *mode {
                    "min" => PlateauMode::Min,
                    "max" => PlateauMode::Max,
                    other => return Err(bad(format!("mode `{other}` is not `min` or `max`"))),
                };
                let f = float("factor", factor)?;
                if !(f > 0.0 && f < 1.0) {
                    return Err(bad(format!("factor `{factor}` must be between 0 and 1")));
                }
                let patience = patience.parse::<usize>().map_err(|_| {
                    bad(format!(
                        "patience `{patience}` is not a non-negative integer"
                    ))
                })?;
                let threshold = match rest.first() {
                    Some(t) => float("threshold", t)?,
                    None => 1e-4,
                };
                let min_lr = match rest.get(1) {
                    Some(m) => float("min_lr", m)?,
                    None => 0.0,
                };
                if threshold < 0.0 {
                    return Err(bad(format!("threshold `{threshold}` must be >= 0")));
                }
                if min_lr < 0.0 {
                    return Err(bad(format!("min_lr `{min_lr}` must be >= 0")));
                }
                Ok(Self::Plateau {
                    mode,
                    factor: f,
                    patience,
                    threshold,
                    min_lr,
                })
            }
            [name, ..] if matches!(*name, "constant" | "step" | "plateau") => Err(bad(format!(
                "wrong number of `:`-separated fields for `{name}`"
            ))),
            [name, ..] => Err(bad(format!("unknown schedule `{name}`"))),
            [] => Err(bad("empty".to_string())),
        }
    }
}

/// A learning-rate schedule with its state (epoch, best metric, bad epochs, current lr);
/// serialisable so that a resumed run continues the same schedule.
///
/// ```
/// use candle_zoo::train::optim::{LrSchedule, Scheduler};
///
/// let mut s = Scheduler::new("step:2:0.1".parse()?, 0.01);
/// assert_eq!(s.lr(), 0.01);
/// assert_eq!(s.epoch_end(None)?, 0.01);   // after epoch 1
/// assert_eq!(s.epoch_end(None)?, 0.001);  // after epoch 2
/// let json = serde_json::to_string(&s)?;
/// assert_eq!(serde_json::from_str::<Scheduler>(&json)?, s);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scheduler {
    schedule: LrSchedule,
    base_lr: f64,
    lr: f64,
    epoch: usize,
    /// PyTorch starts at +-inf, which JSON cannot hold as a number.
    #[serde(with = "nonfinite_f64")]
    best: f64,
    bad_epochs: usize,
}

impl Scheduler {
    /// A schedule starting at `base_lr`, before the first epoch.
    pub fn new(schedule: LrSchedule, base_lr: f64) -> Self {
        let best = match schedule {
            LrSchedule::Plateau {
                mode: PlateauMode::Max,
                ..
            } => f64::NEG_INFINITY,
            _ => f64::INFINITY,
        };
        Self {
            schedule,
            base_lr,
            lr: base_lr,
            epoch: 0,
            best,
            bad_epochs: 0,
        }
    }

    /// The learning rate for the coming epoch.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The base learning rate it started from.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// Epochs completed (calls to [`epoch_end`](Self::epoch_end)).
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// Call once at the end of each epoch with the monitored metric (ignored except by
    /// `Plateau`, which errors if it is `None`); returns the lr for the next epoch.
    pub fn epoch_end(&mut self, metric: Option<f64>) -> Result<f64> {
        match self.schedule {
            LrSchedule::Constant => {}
            LrSchedule::Step { step_size, gamma } => {
                if step_size == 0 {
                    return Err(Error::Invalid(
                        "lr schedule `step`: step size must be >= 1".to_string(),
                    ));
                }
                // Recursive like PyTorch's StepLR.get_lr, so the floats match its sequence.
                if (self.epoch + 1).is_multiple_of(step_size) {
                    self.lr *= gamma;
                }
            }
            LrSchedule::Plateau {
                mode,
                factor,
                patience,
                threshold,
                min_lr,
            } => {
                let current = metric.ok_or_else(|| {
                    Error::Invalid(format!(
                        "lr schedule `{}` needs the monitored metric at the end of each epoch",
                        self.schedule
                    ))
                })?;
                // PyTorch's `_is_better` for threshold_mode "rel" (NaN is never better).
                let better = match mode {
                    PlateauMode::Min => current < self.best * (1.0 - threshold),
                    PlateauMode::Max => current > self.best * (threshold + 1.0),
                };
                if better {
                    self.best = current;
                    self.bad_epochs = 0;
                } else {
                    self.bad_epochs += 1;
                }
                if self.bad_epochs > patience {
                    // PyTorch's `_reduce_lr` with its eps of 1e-8.
                    let new_lr = (self.lr * factor).max(min_lr);
                    if self.lr - new_lr > 1e-8 {
                        self.lr = new_lr;
                    }
                    self.bad_epochs = 0;
                }
            }
        }
        self.epoch += 1;
        Ok(self.lr)
    }
}

/// Serialises an f64 as a JSON number when finite and as a string (`"inf"`, `"-inf"`, `"NaN"`)
/// otherwise.
mod nonfinite_f64 {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_str(&v.to_string())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(f64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Num(v) => Ok(v),
            Repr::Str(s) => s
                .parse()
                .map_err(|_| D::Error::custom(format!("`{s}` is not a number"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- Schedules ------------------------------------------------------------------------
    //
    // Expected sequences generated once with torch 2.15.0 on this machine (lr before epoch 1,
    // then after each epoch):
    //
    // p = torch.nn.Parameter(torch.zeros(1)); opt = torch.optim.SGD([p], lr=0.01)
    // s = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    // for e in range(10): opt.step(); s.step()
    //
    // def plateau(mode, metrics, **kw):
    //     opt = torch.optim.SGD([p], lr=0.1)
    //     s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, threshold_mode="rel",
    //                                                    cooldown=0, **kw)
    //     for m in metrics: opt.step(); s.step(m)
    // plateau("max", MAX_METRICS, factor=0.5, patience=2, threshold=1e-4, min_lr=0.01)
    // plateau("min", MIN_METRICS, factor=0.1, patience=1, threshold=1e-4, min_lr=0.0)

    fn run_schedule(mut s: Scheduler, metrics: &[Option<f64>]) -> Vec<f64> {
        let mut out = vec![s.lr()];
        for m in metrics {
            out.push(s.epoch_end(*m).unwrap());
            assert_eq!(s.lr(), *out.last().unwrap());
        }
        out
    }

    #[test]
    fn step_schedule_matches_torch() {
        let s = Scheduler::new("step:3:0.1".parse().unwrap(), 0.01);
        let got = run_schedule(s, &[None; 10]);
        let want = [
            0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.0001, 0.0001, 0.0001, 1e-05, 1e-05,
        ];
        assert_eq!(got, want);
        let c = run_schedule(
            Scheduler::new(LrSchedule::Constant, 0.2),
            &[None, Some(1.0)],
        );
        assert_eq!(c, [0.2, 0.2, 0.2]);
    }

    const MAX_METRICS: [f64; 18] = [
        0.10, 0.20, 0.20, 0.20001, 0.19, 0.25, 0.24, 0.25, 0.25, 0.26, 0.26, 0.26, 0.26, 0.26,
        0.26, 0.26, 0.26, 0.26,
    ];
    const MIN_METRICS: [f64; 13] = [
        5.0, 4.0, 4.0, 3.9999, 3.5, 3.6, 3.5, 3.4999, 3.0, 3.1, 3.2, 3.3, 3.4,
    ];

    #[test]
    fn plateau_schedule_matches_torch() {
        let max = LrSchedule::Plateau {
            mode: PlateauMode::Max,
            factor: 0.5,
            patience: 2,
            threshold: 1e-4,
            min_lr: 0.01,
        };
        let got = run_schedule(Scheduler::new(max, 0.1), &MAX_METRICS.map(Some));
        let want = [
            0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.025, 0.0125,
            0.0125, 0.0125, 0.01, 0.01, 0.01,
        ];
        assert_eq!(got, want);

        let min: LrSchedule = "plateau:min:0.1:1".parse().unwrap();
        let got = run_schedule(Scheduler::new(min, 0.1), &MIN_METRICS.map(Some));
        let want = [
            0.1,
            0.1,
            0.1,
            0.1,
            0.010000000000000002,
            0.010000000000000002,
            0.010000000000000002,
            0.0010000000000000002,
            0.0010000000000000002,
            0.0010000000000000002,
            0.0010000000000000002,
            0.00010000000000000003,
            0.00010000000000000003,
            1.0000000000000004e-05,
        ];
        assert_eq!(got, want);

        let mut s = Scheduler::new("plateau:max:0.1:5".parse().unwrap(), 0.1);
        let e = s.epoch_end(None).unwrap_err().to_string();
        assert!(e.contains("plateau") && e.contains("metric"), "{e}");
    }

    #[test]
    fn scheduler_serde_round_trip() {
        // Fresh (best = -inf, which JSON cannot hold as a number), then mid-run.
        let mut s = Scheduler::new("plateau:max:0.5:2:0.0001:0.01".parse().unwrap(), 0.1);
        for round in 0..2 {
            let json = serde_json::to_string(&s).unwrap();
            let mut back: Scheduler = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s, "{json}");
            // Both continue identically.
            let mut cont = s.clone();
            for m in &MAX_METRICS[..6] {
                assert_eq!(
                    back.epoch_end(Some(*m)).unwrap(),
                    cont.epoch_end(Some(*m)).unwrap()
                );
            }
            assert_eq!(back, cont);
            if round == 0 {
                for m in &MAX_METRICS[..7] {
                    s.epoch_end(Some(*m)).unwrap();
                }
                assert_eq!(s.epoch(), 7);
            }
        }
        let step = Scheduler::new(
            LrSchedule::Step {
                step_size: 30,
                gamma: 0.1,
            },
            0.01,
        );
        let json = serde_json::to_string(&step).unwrap();
        assert_eq!(serde_json::from_str::<Scheduler>(&json).unwrap(), step);
    }

    #[test]
    fn schedule_parsing() {
        for s in [
            "constant",
            "step:30:0.1",
            "plateau:max:0.1:5",
            "plateau:min:0.5:0:0.001:1e-06",
        ] {
            let parsed: LrSchedule = s.parse().unwrap();
            let again: LrSchedule = parsed.to_string().parse().unwrap();
            assert_eq!(again, parsed, "{s}");
        }
        let bad = [
            ("cosine:10", "`cosine`"),
            ("step:30", "fields"),
            ("step:x:0.1", "step size `x`"),
            ("step:0:0.1", "step size `0`"),
            ("step:30:y", "gamma `y`"),
            ("step:30:-1", "gamma"),
            ("plateau:up:0.1:5", "mode `up`"),
            ("plateau:max:1.5:5", "factor `1.5`"),
            ("plateau:max:0.1:-5", "patience `-5`"),
            ("plateau:max:0.1:5:z", "threshold `z`"),
            ("plateau:max:0.1:5:0.1:q", "min_lr `q`"),
            ("plateau:max:0.1:5:0.1:0:9", "fields"),
            ("", "unknown schedule"),
        ];
        for (s, want) in bad {
            let e = s.parse::<LrSchedule>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
