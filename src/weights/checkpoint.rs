//! A weights file on disk: safetensors (memory-mapped) or PyTorch `.pth`, checked before any
//! tensor is read, and the [`AlexNet`] and input pipeline it holds.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::metadata;
use crate::data::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::io::safetensors::{parse_header, MAX_HEADER};
use crate::models::alexnet::{AlexNet, Config, Layout};

/// The on-disk format of a checkpoint, told by its first bytes rather than its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// PyTorch's zip format (`torch.save` since 1.6), as torchvision's `.pth` files.
    Pth,
}

/// A checked, not yet loaded, weights file.
///
/// [`Checkpoint::open`] reads the header; then [`load`](Checkpoint::load) builds the model and
/// [`preprocess`](Checkpoint::preprocess) the input pipeline the file records. Both follow
/// [`layout`](Checkpoint::layout): the layout the file's metadata names, else the one its keys
/// imply, unless [`with_layout`](Checkpoint::with_layout) says otherwise (for CaffeNet weights
/// saved without metadata, whose keys are those of BVLC AlexNet).
///
/// ```no_run
/// use candle_zoo::weights::Checkpoint;
/// let ckpt = Checkpoint::open("alexnet-owt-7be5be79.pth")?;
/// let model = ckpt.load(&candle_core::Device::Cpu)?;
/// let preprocess = ckpt.preprocess()?;
/// # Ok::<(), candle_zoo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    keys: Vec<String>,
    metadata: BTreeMap<String, String>,
    /// Set by `with_layout`.
    layout: Option<Layout>,
}

impl Checkpoint {
    /// Opens and validates a checkpoint: the format, the header, and (for safetensors) that the
    /// file holds every byte its header promises.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut magic = [0u8; 8];
        let got = read_up_to(&mut file, &mut magic).map_err(|e| Error::io(&path, e))?;
        let opened = |format, keys, metadata| Self {
            path: path.clone(),
            format,
            keys,
            metadata,
            layout: None,
        };
        if got >= 4 && magic[..4] == *b"PK\x03\x04" {
            let keys = super::pth::Pth::open(&path)?.keys();
            return Ok(opened(Format::Pth, keys, BTreeMap::new()));
        }
        if got >= 2 && magic[0] == 0x80 && magic[1] <= 5 {
            return Err(Error::checkpoint(
                &path,
                "legacy (pre-1.6, non-zip) PyTorch serialization, which candle cannot read; \
                 re-save it with `torch.save(torch.load(path), new_path)` in PyTorch >= 1.6",
            ));
        }
        if got < 8 {
            return Err(Error::checkpoint(
                &path,
                format!("{len} bytes is too short for a checkpoint"),
            ));
        }
        let header_len = u64::from_le_bytes(magic);
        if header_len == 0 || header_len > MAX_HEADER || 8 + header_len > len {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "neither safetensors nor a PyTorch zip checkpoint (a safetensors header of \
                     {header_len} bytes cannot fit in a {len}-byte file)"
                ),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(&path, e))?;
        let header = parse_header(&header).map_err(|reason| {
            Error::checkpoint(&path, format!("corrupt safetensors header: {reason}"))
        })?;
        let available = len - 8 - header_len;
        if header.data_len > available {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "truncated safetensors file: the header describes {} bytes of tensor data \
                     but only {available} follow it",
                    header.data_len
                ),
            ));
        }
        Ok(opened(Format::Safetensors, header.keys, header.metadata))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The safetensors `__metadata__` (empty for `.pth`); [`super::metadata`] says what each
    /// key means.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The same file, loaded as `layout` whatever its metadata says. The layout must be of the
    /// keys' family: a Caffe layout for Caffe keys, torchvision for torchvision keys.
    pub fn with_layout(mut self, layout: Layout) -> Result<Self> {
        let keys = self.key_layout()?;
        if layout.is_caffe() != keys.is_caffe() {
            return Err(Error::checkpoint(
                &self.path,
                format!("layout `{layout}` was asked for, but the keys are those of `{keys}`"),
            ));
        }
        self.layout = Some(layout);
        Ok(self)
    }

    /// The layout the weights load as: the one [`with_layout`](Checkpoint::with_layout) set,
    /// else the one the metadata names (checked against the keys), else the one the keys imply
    /// ([`Layout::BvlcAlexNet`] for Caffe keys).
    pub fn layout(&self) -> Result<Layout> {
        if let Some(layout) = self.layout {
            return Ok(layout);
        }
        let keys = self.key_layout()?;
        match metadata::layout(&self.metadata).map_err(|e| self.error(e))? {
            Some(named) if named.is_caffe() != keys.is_caffe() => Err(Error::checkpoint(
                &self.path,
                format!("metadata says layout `{named}` but the keys are those of `{keys}`"),
            )),
            Some(named) => Ok(named),
            None => Ok(keys),
        }
    }

    /// The layout family the keys imply: torchvision, or BVLC AlexNet for Caffe keys.
    fn key_layout(&self) -> Result<Layout> {
        let has = |k: &str| self.keys.iter().any(|key| key == k);
        if has("features.0.weight") {
            Ok(Layout::TorchVision)
        } else if has("conv1.weight") {
            Ok(Layout::BvlcAlexNet)
        } else {
            Err(Error::UnknownLayout {
                found: format!("{} in {}", preview(&self.keys), self.path.display()),
            })
        }
    }

    /// A [`VarBuilder`] over the file's tensors (memory-mapped for safetensors).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let err = |e: candle_core::Error| Error::checkpoint(&self.path, e);
        match self.format {
            // SAFETY: the file is mapped read-only; as with every mmap, it must not be truncated
            // while the model is alive.
            Format::Safetensors => unsafe {
                VarBuilder::from_mmaped_safetensors(&[&self.path], dtype, device).map_err(err)
            },
            // Read whole and checked by this crate's bounded reader (see `pth.rs`), not candle's.
            Format::Pth => Ok(VarBuilder::from_tensors(
                super::pth::tensors(&self.path)?,
                dtype,
                device,
            )),
        }
    }

    /// The model config: widths and classes from the weights' shapes, in
    /// [`layout`](Checkpoint::layout).
    pub fn config(&self) -> Result<Config> {
        self.config_of(&self.var_builder(DType::F32, &Device::Cpu)?)
    }

    fn config_of(&self, vb: &VarBuilder) -> Result<Config> {
        let layout = self.layout()?;
        let config = Config::from_checkpoint(vb).map_err(|e| self.error(e))?;
        let config = config.with_layout(layout);
        let config = metadata::variant(&self.metadata, config).map_err(|e| self.error(e))?;
        match metadata::dropout(&self.metadata).map_err(|e| self.error(e))? {
            Some(p) => Ok(config.with_dropout(p)),
            None => Ok(config),
        }
    }

    /// Loads the model in f32 on `device`.
    pub fn load(&self, device: &Device) -> Result<AlexNet> {
        let vb = self.var_builder(DType::F32, device)?;
        let config = self.config_of(&vb)?;
        AlexNet::new(&config, vb).map_err(|e| self.error(e))
    }

    /// Loads the model in f32 on `device` as `layout`, or as the file says when `None`.
    #[deprecated(
        since = "0.2.0",
        note = "use `Checkpoint::with_layout(layout)?.load(device)`"
    )]
    pub fn load_as(&self, layout: Option<Layout>, device: &Device) -> Result<AlexNet> {
        match layout {
            Some(layout) => self.clone().with_layout(layout)?.load(device),
            None => self.load(device),
        }
    }

    /// The input pipeline the weights expect: what the metadata records (see
    /// [`metadata::preprocess`]), else the preset of the [`layout`](Checkpoint::layout). Bad
    /// metadata is an error naming the file and key, never a silent default.
    pub fn preprocess(&self) -> Result<Preprocess> {
        let layout = self.layout()?;
        let mean_image = if self.keys.iter().any(|k| k == metadata::MEAN_IMAGE) {
            let t = self
                .var_builder(DType::F32, &Device::Cpu)?
                .get_unchecked(metadata::MEAN_IMAGE)
                .map_err(|e| Error::checkpoint(&self.path, e))?;
            Some(t)
        } else {
            None
        };
        metadata::preprocess(&self.metadata, layout, mean_image.as_ref()).map_err(|e| self.error(e))
    }

    /// Names the file in an error that does not already.
    fn error(&self, e: Error) -> Error {
        match e {
            Error::MissingKey { key, .. } => Error::MissingKey {
                key,
                hint: format!("{}; it has {}", self.path.display(), preview(&self.keys)),
            },
            Error::Checkpoint { .. } | Error::Io { .. } => e,
            e => Error::checkpoint(&self.path, e),
        }
    }
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The first few of a list of keys, for error messages.
fn preview(keys: &[String]) -> String {
    const SHOWN: usize = 6;
    if keys.is_empty() {
        return "no tensors".into();
    }
    let head: Vec<&str> = keys.iter().take(SHOWN).map(|s| s.as_str()).collect();
    let more = keys.len().saturating_sub(SHOWN);
    if more > 0 {
        format!("[{}, ... {more} more]", head.join(", "))
    } else {
        format!("[{}]", head.join(", "))
    }
}
