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
            Self::Auto => Ok(first_that_opens(&[
                (candle_core::utils::cuda_is_available(), &|| {
                    Device::new_cuda(0)
                }),
                (candle_core::utils::metal_is_available(), &|| {
                    Device::new_metal(0)
                }),
            ])),
        }
    }
}

/// The first of the compiled-in backends (`(compiled, open)`) whose device opens, else the
/// CPU. candle's `cuda_is_available` says only whether the build has CUDA, so a CUDA build on a
/// machine without a GPU (or its driver) must try, and fall back.
fn first_that_opens(backends: &[(bool, &dyn Fn() -> candle_core::Result<Device>)]) -> Device {
    backends
        .iter()
        .filter(|(compiled, _)| *compiled)
        .find_map(|(_, open)| open().ok())
        .unwrap_or(Device::Cpu)
}

/// A short name for a device, for logs and metadata.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_the_cpu_when_a_compiled_in_device_does_not_open() {
        let missing = || -> candle_core::Result<Device> { candle_core::bail!("no CUDA driver") };
        assert!(first_that_opens(&[(true, &missing), (true, &missing)]).is_cpu());
        let never_tried = || -> candle_core::Result<Device> { panic!("not compiled in") };
        assert!(first_that_opens(&[(false, &never_tried)]).is_cpu());
        assert!(
            DeviceChoice::Auto.device().unwrap().is_cpu()
                || cfg!(any(feature = "cuda", feature = "metal"))
        );
    }
}
