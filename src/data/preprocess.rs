//! Image loading and the input pipelines the pretrained weights expect.
//!
//! | preset | resize | crop | scale | channel order | mean | std |
//! |---|---|---|---|---|---|---|
//! | [`Preprocess::torchvision`] | shorter side to 256, bilinear | centre 224 | /255 | RGB | 0.485, 0.456, 0.406 | 0.229, 0.224, 0.225 |
//! | [`Preprocess::caffe`] | 256x256, bilinear | centre 227 | 0..255 | BGR | 104.007, 116.669, 122.679 | 1 |
//!
//! ```no_run
//! use candle_zoo::data::preprocess::Preprocess;
//! let x = Preprocess::torchvision().load("assets/chelsea.png", &candle_core::Device::Cpu)?;
//! assert_eq!(x.dims(), &[3, 224, 224]);
//! # Ok::<(), candle_zoo::Error>(())
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use fast_image_resize as fir;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::models::alexnet::Layout;

/// How an image is resized before the centre crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Scale so that the shorter side has this length, keeping the aspect ratio (torchvision's
    /// `Resize(int)`).
    ShorterSide(u32),
    /// Warp to exactly `(width, height)` (how Caffe's ImageNet LMDBs were made).
    Exact(u32, u32),
}

/// An image-to-tensor pipeline: resize, centre crop, scale, channel order, normalisation.
///
/// `mean` and `std` are given in the output channel order (BGR when `bgr` is set) and in the
/// units after `scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub resize: Resize,
    pub crop: u32,
    pub scale: f32,
    pub bgr: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Images whose shorter side is below this many pixels are refused rather than upscaled:
    /// they hold too little to classify.
    pub min_side: u32,
    /// Caffe's mean image, subtracted pixel by pixel instead of `mean` (see [`MeanImage`]).
    pub mean_image: Option<Arc<MeanImage>>,
    /// Decode a JPEG at least twice the resize target's size at a reduced scale in the DCT
    /// domain (1/2, 1/4 or 1/8 of each side, never below the target), as libjpeg's scaled
    /// decode and PIL's `draft()` do: much less work than a full decode on photos of 2 MP and
    /// more (`benches/NOTES.md`), at a small cost in fidelity to the full-resolution resize
    /// (fc7 cosine with torchvision's pipeline: see `tests/extract.rs`). On by default.
    pub dct_scaling: bool,
}

/// A per-pixel mean, as Caffe's `ilsvrc_2012_mean.binaryproto` (`3x256x256`, BGR): `(3, H, W)`
/// values in the pipeline's output channel order and units. Caffe subtracts it from the resized
/// image and crops both at the same centre offset; [`Preprocess::to_values`] does the same.
#[derive(Debug, Clone, PartialEq)]
pub struct MeanImage {
    pub height: usize,
    pub width: usize,
    /// `3 * height * width` values, channel-major.
    pub values: Vec<f32>,
}

impl MeanImage {
    /// The per-channel averages.
    pub fn channel_means(&self) -> [f32; 3] {
        let plane = self.height * self.width;
        let mut out = [0f32; 3];
        for (c, m) in out.iter_mut().enumerate() {
            let sum: f64 = self.values[c * plane..(c + 1) * plane]
                .iter()
                .map(|&v| v as f64)
                .sum();
            *m = (sum / plane.max(1) as f64) as f32;
        }
        out
    }
}

/// The named presets, for command lines and checkpoint metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    TorchVision,
    Caffe,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::TorchVision => "torchvision",
            Preset::Caffe => "caffe",
        }
    }

    /// The pipeline of this preset.
    pub fn pipeline(self) -> Preprocess {
        match self {
            Preset::TorchVision => Preprocess::torchvision(),
            Preset::Caffe => Preprocess::caffe(),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "torchvision" | "tv" | "pytorch" => Ok(Preset::TorchVision),
            "caffe" | "bgr" => Ok(Preset::Caffe),
            _ => Err(Error::parse(
                "preprocessing preset",
                s,
                "torchvision or caffe",
            )),
        }
    }
}

impl Preprocess {
    /// torchvision's `IMAGENET1K_V1` transforms: `Resize(256)`, `CenterCrop(224)`, `ToTensor()`,
    /// `Normalize(mean, std)`.
    pub fn torchvision() -> Self {
        Self {
            resize: Resize::ShorterSide(256),
            crop: 224,
            scale: 1.0 / 255.0,
            bgr: false,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            min_side: 16,
            mean_image: None,
            dct_scaling: true,
        }
    }

    /// BVLC AlexNet and CaffeNet: 256x256 warp, centre 227 crop, BGR, 0..255, minus the
    /// per-channel mean of `ilsvrc_2012_mean.binaryproto` (B 104.007, G 116.669, R 122.679).
    pub fn caffe() -> Self {
        Self {
            resize: Resize::Exact(256, 256),
            crop: 227,
            scale: 1.0,
            bgr: true,
            mean: [104.00699, 116.66877, 122.67891],
            std: [1.0; 3],
            min_side: 16,
            mean_image: None,
            dct_scaling: true,
        }
    }

    /// The preset matching a layout's pretrained weights: Caffe's for the two-tower layouts,
    /// torchvision's otherwise. (A weights file can record other settings:
    /// [`crate::weights::Checkpoint::preprocess`] reads them.)
    pub fn for_layout(layout: Layout) -> Self {
        if layout.is_caffe() {
            Self::caffe()
        } else {
            Self::torchvision()
        }
    }

    /// The same pipeline for a model trained at another input size: the crop becomes `side`,
    /// and images are resized in the same proportion to it (torchvision: the shorter side to
    /// 256/224 of the crop; Caffe: a square warp to 256/227 of it). A mean image, which fits
    /// only its own size, gives way to its per-channel means.
    ///
    /// ```
    /// use candle_zoo::data::preprocess::{Preprocess, Resize};
    /// let p = Preprocess::torchvision().scaled_to(64);
    /// assert_eq!((p.resize, p.crop), (Resize::ShorterSide(73), 64));
    /// ```
    pub fn scaled_to(mut self, side: u32) -> Self {
        let base = self.crop as f64;
        let scale = |n: u32| (side as f64 * n as f64 / base).round() as u32;
        self.resize = match self.resize {
            Resize::ShorterSide(n) => Resize::ShorterSide(scale(n)),
            Resize::Exact(w, h) => Resize::Exact(scale(w), scale(h)),
        };
        self.crop = side;
        if let Some(m) = self.mean_image.take() {
            self.mean = m.channel_means();
        }
        self
    }

    /// The preset this pipeline's channel order implies: Caffe's for BGR, else torchvision's.
    pub fn preset(&self) -> Preset {
        if self.bgr {
            Preset::Caffe
        } else {
            Preset::TorchVision
        }
    }

    /// Decodes an image file (any supported format, whatever its extension) as RGB, at full
    /// resolution.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<RgbImage> {
        Ok(self.decode(path.as_ref(), false)?.image)
    }

    /// Decodes an image file for this pipeline: at a reduced scale where [`Preprocess::dct_scaling`]
    /// allows it (see there), else whole. Refuses a file that is not an image, a JPEG cut short,
    /// and an image smaller than [`Preprocess::min_side`].
    pub(crate) fn decode(&self, path: &Path, scaled: bool) -> Result<Decoded> {
        let image_err = |reason: String| Error::Image {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))?;
        let jpeg = match reader.format() {
            None => return Err(image_err("unrecognised file format".into())),
            // The JPEG decoder fills what a cut file lacks with grey: refuse it first, as PIL
            // does ("image file is truncated").
            Some(image::ImageFormat::Jpeg) => {
                jpeg_is_whole(&bytes).map_err(image_err)?;
                true
            }
            Some(_) => false,
        };
        let scaled = (jpeg && scaled && self.dct_scaling)
            .then(|| self.decode_jpeg_scaled(&bytes))
            .flatten();
        let decoded = match scaled {
            Some(d) => d,
            None => {
                let image = reader.decode().map_err(|e| image_err(e.to_string()))?;
                let full = (image.width(), image.height());
                Decoded {
                    image: image.to_rgb8(),
                    full,
                }
            }
        };
        let (width, height) = decoded.full;
        if width.min(height) < self.min_side {
            return Err(Error::ImageTooSmall {
                path: path.to_path_buf(),
                width,
                height,
                min: self.min_side,
            });
        }
        Ok(decoded)
    }

    /// A JPEG decoded at the smallest DCT scale that keeps it at least as large as the resize
    /// target, or `None` where no scale below 1 does (or the decoder cannot: the full decode
    /// then runs, and reports what is wrong).
    ///
    /// Baseline photos go to the crate's own scaled decoder ([`super::jpeg`]), single-threaded
    /// and 1.5-2x less CPU than jpeg-decoder's; the files it does not read (progressive ones, CMYK,
    /// odd sampling) to jpeg-decoder's scaled decode.
    fn decode_jpeg_scaled(&self, bytes: &[u8]) -> Option<Decoded> {
        // The smallest scale that keeps both sides at or above the target.
        let denominator = |(w, h): (u32, u32)| {
            let (nw, nh) = self.resized_size((w, h));
            [8, 4, 2]
                .into_iter()
                .find(|&d| w.div_ceil(d) >= nw && h.div_ceil(d) >= nh)
        };
        if let Some(jpeg) = super::jpeg::Jpeg::parse(bytes) {
            let full = (jpeg.width, jpeg.height);
            let denom = denominator(full)?;
            if let Some((w, h, rgb)) = jpeg.decode(denom) {
                let image = RgbImage::from_raw(w, h, rgb)?;
                return Some(Decoded { image, full });
            }
        }
        let mut d = jpeg_decoder::Decoder::new(std::io::Cursor::new(bytes));
        d.read_info().ok()?;
        let info = d.info()?;
        let (w, h) = (info.width as u32, info.height as u32);
        let denom = denominator((w, h))?;
        // jpeg-decoder's own choice of scale is satisfied by either side alone, so it is given
        // the exact scaled size.
        let (sw, sh) = d
            .scale(w.div_ceil(denom) as u16, h.div_ceil(denom) as u16)
            .ok()?;
        let pixels = d.decode().ok()?;
        let image = match d.info()?.pixel_format {
            jpeg_decoder::PixelFormat::RGB24 => RgbImage::from_raw(sw as u32, sh as u32, pixels)?,
            jpeg_decoder::PixelFormat::L8 => {
                let grey = image::GrayImage::from_raw(sw as u32, sh as u32, pixels)?;
                image::DynamicImage::ImageLuma8(grey).to_rgb8()
            }
            _ => return None,
        };
        Some(Decoded {
            image,
            full: (w, h),
        })
    }

    /// The size an image of size `full` is resized to before the crop.
    fn resized_size(&self, (w, h): (u32, u32)) -> (u32, u32) {
        match self.resize {
            Resize::ShorterSide(s) if w <= h => (s, (s as u64 * h as u64 / w as u64) as u32),
            Resize::ShorterSide(s) => ((s as u64 * w as u64 / h as u64) as u32, s),
            Resize::Exact(rw, rh) => (rw, rh),
        }
    }

    /// Resizes and crops a decoded image to the `crop x crop` RGB image the model sees.
    ///
    /// Resampling is Pillow's bilinear filter (what torchvision's `Resize` runs on PIL images),
    /// from `fast_image_resize`, computed for the crop only: with Pillow's box semantics the
    /// crop's pixels have the same sampling positions and weights as in the whole resized image,
    /// and the rest is never computed.
    pub fn resize_and_crop(&self, image: &RgbImage) -> Result<RgbImage> {
        Ok(self.resize_and_crop_at(image, |_, _, centre| centre)?.0)
    }

    /// [`Preprocess::resize_and_crop`] with the crop placed by `place(resized_width,
    /// resized_height, centre_offset)`, which returns the crop's `(left, top)` in the resized
    /// image; gives the crop and that offset. Used by the training augmentation (random and
    /// corner crops), which must resample exactly as evaluation does.
    pub(crate) fn resize_and_crop_at(
        &self,
        image: &RgbImage,
        place: impl FnOnce(u32, u32, (u32, u32)) -> (u32, u32),
    ) -> Result<(RgbImage, (u32, u32))> {
        self.resize_and_crop_scaled(image, image.dimensions(), place)
    }

    /// [`Preprocess::resize_and_crop_at`] of an image decoded at a reduced scale from one of
    /// size `full`: the resize, the crop's place and the sampling positions are those of the
    /// full-size image, mapped onto the decoded one.
    pub(crate) fn resize_and_crop_scaled(
        &self,
        image: &RgbImage,
        full: (u32, u32),
        place: impl FnOnce(u32, u32, (u32, u32)) -> (u32, u32),
    ) -> Result<(RgbImage, (u32, u32))> {
        let (w, h) = image.dimensions();
        let (nw, nh) = self.resized_size(full);
        if nw < self.crop || nh < self.crop {
            return Err(Error::Invalid(format!(
                "resize to {nw}x{nh} is smaller than the {} crop",
                self.crop
            )));
        }
        let centre = (centre_offset(nw, self.crop), centre_offset(nh, self.crop));
        let (left, top) = place(nw, nh, centre);
        if left > nw - self.crop || top > nh - self.crop {
            return Err(Error::Invalid(format!(
                "a {} crop at ({left}, {top}) does not fit in the {nw}x{nh} resized image",
                self.crop
            )));
        }
        if (nw, nh) == (w, h) && full == (w, h) {
            let crop = image::imageops::crop_imm(image, left, top, self.crop, self.crop);
            return Ok((crop.to_image(), (left, top)));
        }
        // A scaled decode holds full-size pixels `f * i .. f * (i + 1)` in its pixel `i`.
        let f = (full.0 as f64 / w as f64).round().max(1.0);
        let (fw, fh) = (full.0 as f64, full.1 as f64);
        let (sx, sy) = (fw / nw as f64 / f, fh / nh as f64 / f);
        let crop = self.crop as f64;
        let (x0, y0) = (left as f64 * sx, top as f64 * sy);
        // A crop flush with the right or bottom edge can overshoot the source by an ulp.
        let (cw, ch) = (
            (crop * sx).min(w as f64 - x0),
            (crop * sy).min(h as f64 - y0),
        );
        let resize_err = |e: String| Error::Invalid(format!("resizing a {w}x{h} image: {e}"));
        let src = fir::images::ImageRef::new(w, h, image.as_raw(), fir::PixelType::U8x3)
            .map_err(|e| resize_err(e.to_string()))?;
        let mut dst = fir::images::Image::new(self.crop, self.crop, fir::PixelType::U8x3);
        let options = fir::ResizeOptions::new()
            .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
            .crop(x0, y0, cw, ch);
        fir::Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|e| resize_err(e.to_string()))?;
        let out = RgbImage::from_raw(self.crop, self.crop, dst.into_vec())
            .ok_or_else(|| resize_err("unexpected buffer size".into()))?;
        Ok((out, (left, top)))
    }

    /// Scales, reorders and normalises an RGB image into a `(3, H, W)` f32 tensor.
    pub fn to_tensor(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = image.dimensions();
        let data = self.to_values(image);
        Ok(Tensor::from_vec(data, (3, h as usize, w as usize), device)?)
    }

    /// [`Preprocess::to_tensor`]'s values, channel-major, without making a tensor.
    pub fn to_values(&self, image: &RgbImage) -> Vec<f32> {
        let (w, h) = image.dimensions();
        let (w, h) = (w as usize, h as usize);
        let plane = w * h;
        // With a mean image, the crop sits at the same centre offset in it as in the resized
        // image (Caffe's data layer).
        let offsets = self.mean_image.as_ref().map(|m| {
            (
                centre_offset(m.height as u32, h as u32) as usize,
                centre_offset(m.width as u32, w as u32) as usize,
            )
        });
        let mean_at = |c: usize, i: usize| -> f32 {
            match (&self.mean_image, offsets) {
                (Some(m), Some((top, left))) => {
                    let (y, x) = (i / w, i % w);
                    m.values[c * m.height * m.width + (y + top) * m.width + left + x]
                }
                _ => self.mean[c],
            }
        };
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in image.pixels().enumerate() {
            for c in 0..3 {
                let src = if self.bgr { 2 - c } else { c };
                data[c * plane + i] = (px[src] as f32 * self.scale - mean_at(c, i)) / self.std[c];
            }
        }
        data
    }

    /// Subtracts `mean` pixel by pixel instead of the per-channel mean. The mean image must
    /// have the size images are resized to (an exact resize), as Caffe's does.
    pub fn with_mean_image(mut self, mean: MeanImage) -> Result<Self> {
        let fits = match self.resize {
            Resize::Exact(w, h) => (w as usize, h as usize) == (mean.width, mean.height),
            Resize::ShorterSide(_) => false,
        };
        let len = mean
            .height
            .checked_mul(mean.width)
            .and_then(|n| n.checked_mul(3));
        if !fits || len != Some(mean.values.len()) {
            return Err(Error::Invalid(format!(
                "a {}x{} mean image needs images resized to exactly that size; this pipeline \
                 resizes to {:?}",
                mean.width, mean.height, self.resize
            )));
        }
        self.mean_image = Some(Arc::new(mean));
        Ok(self)
    }

    /// Opens, resizes, crops and normalises one image into `3 * crop * crop` values
    /// (channel-major): [`Preprocess::load`] without the tensor, for worker threads.
    pub fn load_pixels(&self, path: impl AsRef<Path>) -> Result<Vec<f32>> {
        let decoded = self.decode(path.as_ref(), true)?;
        let (crop, _) =
            self.resize_and_crop_scaled(&decoded.image, decoded.full, |_, _, centre| centre)?;
        Ok(self.to_values(&crop))
    }

    /// Opens, resizes, crops and normalises one image into a `(3, crop, crop)` tensor.
    pub fn load(&self, path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
        let crop = self.load_pixels(path)?;
        let side = self.crop as usize;
        Ok(Tensor::from_vec(crop, (3, side, side), device)?)
    }

    /// Loads several images into one `(N, 3, crop, crop)` batch.
    pub fn load_batch<P: AsRef<Path>>(&self, paths: &[P], device: &Device) -> Result<Tensor> {
        let images = paths
            .iter()
            .map(|p| self.load(p, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&images, 0)?)
    }
}

/// The pipeline in one line, as feature files record it: `caffe (resize Exact(256, 256), crop
/// 227, BGR, mean [104.00699, 116.66877, 122.67891], std [1.0, 1.0, 1.0], DCT-scaled JPEG
/// decode)`.
impl fmt::Display for Preprocess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = if self.bgr { "BGR" } else { "RGB" };
        write!(
            f,
            "{} (resize {:?}, crop {}, {order}, ",
            self.preset(),
            self.resize,
            self.crop
        )?;
        match &self.mean_image {
            Some(m) => write!(f, "{}x{} mean image", m.width, m.height)?,
            None => write!(f, "mean {:?}", self.mean)?,
        }
        write!(f, ", std {:?}", self.std)?;
        // Part of a feature file's fingerprint: a scaled decode gives slightly different pixels.
        if self.dct_scaling {
            write!(f, ", DCT-scaled JPEG decode")?;
        }
        write!(f, ")")
    }
}

/// Whether a JPEG's bytes hold every segment and scan up to its end-of-image marker: a file cut
/// short (a download or copy that stopped) ends inside a segment or a scan instead.
fn jpeg_is_whole(b: &[u8]) -> std::result::Result<(), String> {
    let cut = |at: &str| format!("the file is truncated ({at}, no end-of-image marker)");
    if !b.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG: no start-of-image marker".into());
    }
    let mut i = 2;
    loop {
        // The next marker: 0xFF (and fill bytes) then its code; stray bytes are skipped, as
        // decoders do.
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else {
            return Err(cut("after the last segment"));
        };
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            // Restart markers and TEM have no length.
            0xD0..=0xD7 | 0x01 => {}
            _ => {
                let len = match b.get(i..i + 2) {
                    Some(l) => u16::from_be_bytes([l[0], l[1]]) as usize,
                    None => return Err(cut("in a segment's length")),
                };
                if len < 2 || i + len > b.len() {
                    return Err(cut(&format!("in the segment of marker 0x{marker:02X}")));
                }
                i += len;
                if marker == 0xDA {
                    // A scan's entropy-coded data runs to the next marker other than a
                    // stuffed 0xFF00 or a restart marker.
                    loop {
                        match (b.get(i), b.get(i + 1)) {
                            (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => i += 2,
                            (Some(0xFF), Some(_)) => break,
                            (Some(_), _) => i += 1,
                            (None, _) => return Err(cut("in a scan")),
                        }
                    }
                }
            }
        }
    }
}

/// An image as decoded for a pipeline: possibly at a reduced scale, with the size of the image
/// in the file.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    pub image: RgbImage,
    pub full: (u32, u32),
}

/// torchvision's `CenterCrop` offset: `round((size - crop) / 2)`, with Python's round-half-even.
fn centre_offset(size: u32, crop: u32) -> u32 {
    let d = size - crop;
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cut anywhere, a JPEG is refused; whole, it passes (the committed photo, and the same with
    /// bytes after its end).
    #[test]
    fn truncated_jpegs_are_refused() {
        let jpeg =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/rocket.jpg")).unwrap();
        jpeg_is_whole(&jpeg).unwrap();
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"trailing bytes");
        jpeg_is_whole(&trailing).unwrap();
        for cut in [3, 20, 600, jpeg.len() / 2, jpeg.len() - 3] {
            let err = jpeg_is_whole(&jpeg[..cut]).unwrap_err();
            assert!(err.contains("truncated"), "{cut}: {err}");
        }
    }

    /// A smooth JPEG of `w` x `h` pixels.
    fn big_jpeg(dir: &Path, w: u32, h: u32) -> std::path::PathBuf {
        let image = RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            image::Rgb([
                (255.0 * fx) as u8,
                (255.0 * fy) as u8,
                (128.0 + 100.0 * (12.0 * fx).sin() * (9.0 * fy).cos()) as u8,
            ])
        });
        let path = dir.join(format!("{w}x{h}.jpg"));
        image.save(&path).unwrap();
        path
    }

    /// The scaled decode stays at or above the resize target in both presets (shorter-side and
    /// exact resizes), and its crops, centred or placed, are those of the full decode within a
    /// few levels on a smooth image.
    #[test]
    fn dct_scaled_decode_keeps_the_target_size_and_the_crops_place() {
        let dir = tempfile::tempdir().unwrap();
        for (w, h, factor) in [(1200, 800, 2), (3100, 2100, 8)] {
            let path = big_jpeg(dir.path(), w, h);
            for p in [Preprocess::torchvision(), Preprocess::caffe()] {
                let decoded = p.decode(&path, true).unwrap();
                let (dw, dh) = decoded.image.dimensions();
                let (nw, nh) = p.resized_size((w, h));
                assert_eq!(decoded.full, (w, h));
                assert!(dw >= nw && dh >= nh, "{dw}x{dh} below the {nw}x{nh} target");
                // Both targets (shorter side 256, exact 256x256) allow the same scale here.
                assert_eq!(w.div_ceil(dw), factor, "{w}x{h} decoded at {dw}x{dh}");
                let whole = p.open(&path).unwrap();
                for place in [None, Some((0, 0)), Some((nw - p.crop, nh - p.crop))] {
                    let at = |_, _, centre| place.unwrap_or(centre);
                    let (a, pa) = p
                        .resize_and_crop_scaled(&decoded.image, decoded.full, at)
                        .unwrap();
                    let (b, pb) = p.resize_and_crop_scaled(&whole, (w, h), at).unwrap();
                    assert_eq!(pa, pb);
                    let mean = a
                        .as_raw()
                        .iter()
                        .zip(b.as_raw())
                        .map(|(x, y)| x.abs_diff(*y) as f64)
                        .sum::<f64>()
                        / a.as_raw().len() as f64;
                    assert!(mean < 2.0, "{w}x{h} {place:?}: mean difference {mean}");
                }
            }
            let full = Preprocess {
                dct_scaling: false,
                ..Preprocess::torchvision()
            };
            assert_eq!(full.decode(&path, true).unwrap().image.dimensions(), (w, h));
        }
    }

    #[test]
    fn centre_offset_rounds_half_to_even_like_python() {
        assert_eq!(centre_offset(256, 224), 16);
        assert_eq!(centre_offset(341, 224), 58); // round(58.5) == 58
        assert_eq!(centre_offset(343, 224), 60); // round(59.5) == 60
    }

    #[test]
    fn shorter_side_resize_keeps_aspect_like_torchvision() -> Result<()> {
        let image = RgbImage::new(451, 300);
        let out = Preprocess::torchvision().resize_and_crop(&image)?;
        assert_eq!(out.dimensions(), (224, 224));
        Ok(())
    }

    #[test]
    fn caffe_preset_is_bgr_minus_mean() -> Result<()> {
        let mut image = RgbImage::new(227, 227);
        for px in image.pixels_mut() {
            *px = image::Rgb([200, 100, 50]);
        }
        let p = Preprocess {
            resize: Resize::Exact(227, 227),
            ..Preprocess::caffe()
        };
        let t = p.to_tensor(&p.resize_and_crop(&image)?, &Device::Cpu)?;
        let first: Vec<f32> = (0..3)
            .map(|c| t.get(c)?.get(0)?.get(0)?.to_scalar::<f32>())
            .collect::<candle_core::Result<_>>()?;
        assert_eq!(
            first,
            vec![50.0 - 104.00699, 100.0 - 116.66877, 200.0 - 122.67891]
        );
        Ok(())
    }
}
