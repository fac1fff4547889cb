//! Where [`AlexNet::extract`](super::AlexNet::extract) can stop: the taps.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A point in the network where [`AlexNet::extract`](super::AlexNet::extract) can stop and
/// return its output. Each learnable layer has the tap of its name at its output.
///
/// | tap | output | shape (published widths) |
/// |---|---|---|
/// | `Conv1`..`Conv5` | the conv after its ReLU, before LRN and pooling (Caffe's in-place `convN` blob) | `(N, C, H, W)` |
/// | `Pool5` | after the last max-pool (and torchvision's adaptive avg-pool) | `(N, 256, 6, 6)` |
/// | `Fc6`, `Fc7` | after their ReLU (torchvision's `classifier.2`/`.5`, Caffe's `fc6`/`fc7` blobs) | `(N, 4096)` |
/// | `Fc8` | the logits: the last layer, before softmax (`logits` parses to it too) | `(N, classes)` |
///
/// ```
/// use candle_zoo::models::alexnet::Tap;
/// assert_eq!("fc8".parse::<Tap>()?, Tap::Fc8);
/// assert_eq!("logits".parse::<Tap>()?, Tap::Fc8);
/// assert!(Tap::Conv5 < Tap::Pool5); // taps compare in network order
/// # Ok::<(), candle_zoo::Error>(())
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tap {
    Conv1,
    Conv2,
    Conv3,
    Conv4,
    Conv5,
    Pool5,
    Fc6,
    Fc7,
    #[serde(alias = "logits")]
    Fc8,
}

#[allow(non_upper_case_globals)]
impl Tap {
    /// The logits' old name.
    #[deprecated(since = "0.2.0", note = "renamed `Tap::Fc8`, after the layer")]
    pub const Logits: Tap = Tap::Fc8;
}

impl Tap {
    /// Every tap, in network order.
    pub const ALL: [Tap; 9] = [
        Tap::Conv1,
        Tap::Conv2,
        Tap::Conv3,
        Tap::Conv4,
        Tap::Conv5,
        Tap::Pool5,
        Tap::Fc6,
        Tap::Fc7,
        Tap::Fc8,
    ];

    /// The taps at the outputs of the learnable layers conv1..fc8, in network order.
    pub const LEARNABLE: [Tap; 8] = [
        Tap::Conv1,
        Tap::Conv2,
        Tap::Conv3,
        Tap::Conv4,
        Tap::Conv5,
        Tap::Fc6,
        Tap::Fc7,
        Tap::Fc8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tap::Conv1 => "conv1",
            Tap::Conv2 => "conv2",
            Tap::Conv3 => "conv3",
            Tap::Conv4 => "conv4",
            Tap::Conv5 => "conv5",
            Tap::Pool5 => "pool5",
            Tap::Fc6 => "fc6",
            Tap::Fc7 => "fc7",
            Tap::Fc8 => "fc8",
        }
    }
}

impl fmt::Display for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        if lower == "logits" {
            return Ok(Tap::Fc8);
        }
        Tap::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                Error::parse(
                    "layer",
                    s,
                    "one of conv1..conv5, pool5, fc6, fc7, fc8 (or logits)",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() -> Result<()> {
        for t in Tap::ALL {
            assert_eq!(t.name().parse::<Tap>()?, t);
        }
        assert!("fc9".parse::<Tap>().is_err());
        // A checkpoint written before the rename says `logits`.
        assert_eq!(serde_json::from_str::<Tap>("\"logits\"").unwrap(), Tap::Fc8);
        assert_eq!(serde_json::to_string(&Tap::Fc8).unwrap(), "\"fc8\"");
        Ok(())
    }
}
