//! Device selection the way candle's examples do it: the best accelerator compiled in and
//! present, else the CPU, or whatever `--device` names.

use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// A device request, as written on a command line: `auto`, `cpu`, `cuda`, `cuda:N`, `metal`,
/// `metal:N`.
///
/// ```
/// use candle_zoo::device::DeviceChoice;
/// let choice: DeviceChoice = "cpu".parse()?;
/// assert!(choice.device()?.is_cpu());
/// assert!("tpu".parse::<DeviceChoice>().is_err());
/// # Ok::<(), candle_zoo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA if this build has it and a GPU is present, else Metal likewise, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let (kind, ordinal) = match lower.split_once(':') {
            Some((k, n)) => {
                let n = n.parse().map_err(|_| {
                    Error::Invalid(format!("device `{s}`: `{n}` is not a device number"))
                })?;
                (k.to_string(), n)
            }
            None => (lower, 0),
        };
        match kind.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(ordinal)),
            "metal" => Ok(Self::Metal(ordinal)),
            _ => Err(Error::parse(
                "device",
                s,
                "auto, cpu, cuda[:N] or metal[:N]",
            )),
        }
    }
}

impl DeviceChoice {
    /// Opens the device, with an error that says which cargo feature a missing backend needs.
    pub fn device(self) -> Result<Device> {
        let open = |name: &str, feature: &str, r: candle_core::Result<Device>| {
            r.map_err(|e| {
                Error::Invalid(format!(
                    "cannot open device {name}: {e} (this needs a build with the `{feature}` \
                     feature and a working {feature} driver; the CPU always works)"
                ))
            })
        };
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open(&format!("cuda:{n}"), "cuda", Device::new_cuda(n)),
            Self::Metal(n) => open(&format!("metal:{n}"), "metal", Device::new_metal(n)),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    open("cuda:0", "cuda", Device::new_cuda(0))
                } else if candle_core::utils::metal_is_available() {
                    open("metal:0", "metal", Device::new_metal(0))
                } else {
                    Ok(Device::Cpu)
                }
            }
        }
    }
}

/// A short name for a device, for logs and metadata.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
