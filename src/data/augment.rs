//! The paper's data augmentation: random crops of the resized image, horizontal mirrors, and PCA
//! lighting noise; and its test-time ten crops.
//!
//! Every random choice is drawn from a [`Rng`] that the caller passes in (the training loader
//! gives each sample its own stream), so an augmented image depends only on the seed. An image
//! draws, in this order: the crop's left and top offsets ([`Crop::Random`]), the mirror coin
//! (`flip`), and the three lighting alphas (`lighting > 0`); a disabled step draws nothing.
//!
//! ```
//! use candle_zoo::data::augment::Augment;
//! use candle_zoo::data::preprocess::Preprocess;
//! use candle_zoo::rng::Rng;
//!
//! let image = image::RgbImage::from_fn(320, 240, |x, y| image::Rgb([x as u8, y as u8, 128]));
//! let train = Augment::train(Preprocess::torchvision());
//! let x = train.apply(&image, &mut Rng::stream(0, &[0, 17]))?; // (seed, [epoch, sample])
//! assert_eq!(x.len(), 3 * 224 * 224);
//! // Evaluation is exactly the preprocessing pipeline.
//! let eval = Augment::eval(Preprocess::torchvision());
//! let p = &eval.preprocess;
//! assert_eq!(eval.apply(&image, &mut Rng::new(0))?, p.to_values(&p.resize_and_crop(&image)?));
//! # Ok::<(), candle_zoo::Error>(())
//! ```

use std::path::Path;

use image::RgbImage;

use super::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The ImageNet RGB covariance eigenvalues for PCA lighting, pixel values in `[0, 1]`
/// (fb.resnet.torch's constants, the paper's recipe).
pub const IMAGENET_EIGVAL: [f32; 3] = [0.2175, 0.0188, 0.0045];

/// The matching eigenvectors, as columns: `IMAGENET_EIGVEC[c][i]` is component `c` (R, G, B) of
/// eigenvector `i`.
pub const IMAGENET_EIGVEC: [[f32; 3]; 3] = [
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
];

/// Where the crop is taken from the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crop {
    /// Uniformly over all valid offsets.
    Random,
    /// The centre, as the preprocessing pipeline (torchvision's `CenterCrop` rounding).
    Center,
}

/// An augmentation pipeline: the model's [`Preprocess`] (resize rule, crop side, scale, channel
/// order, mean and std), with the crop placement, mirroring and lighting noise of training.
#[derive(Debug, Clone)]
pub struct Augment {
    /// Resize rule, crop side, scale, channel order and normalisation of the model.
    pub preprocess: Preprocess,
    /// Where the `preprocess.crop` square is taken.
    pub crop: Crop,
    /// Mirror horizontally with probability 0.5.
    pub flip: bool,
    /// Standard deviation of the PCA lighting alphas (paper: 0.1; 0 disables).
    pub lighting: f32,
}

impl Augment {
    /// Training: `preprocess`'s resize (torchvision: shorter side 256; Caffe: 256x256 warp), a
    /// random crop of `preprocess.crop`, random mirroring, PCA lighting with std 0.1.
    pub fn train(preprocess: Preprocess) -> Self {
        Self {
            preprocess,
            crop: Crop::Random,
            flip: true,
            lighting: 0.1,
        }
    }

    /// Evaluation: exactly `preprocess` (resize, centre crop), no randomness.
    pub fn eval(preprocess: Preprocess) -> Self {
        Self {
            preprocess,
            crop: Crop::Center,
            flip: false,
            lighting: 0.0,
        }
    }

    /// The side of the square images this produces.
    pub fn side(&self) -> usize {
        self.preprocess.crop as usize
    }

    /// A decoded RGB image to `3 * crop * crop` normalised values (channel-major, the model's
    /// channel order), drawing the crop, mirror and lighting from `rng`.
    ///
    /// Only the crop is resampled (not the whole resized image), with the same weights as
    /// [`Preprocess::resize_and_crop`]; the lighting is added in float after the crop.
    pub fn apply(&self, image: &RgbImage, rng: &mut Rng) -> Result<Vec<f32>> {
        self.apply_scaled(image, image.dimensions(), rng)
    }

    /// [`Augment::apply`] of an image decoded at a reduced scale from one of size `full`.
    fn apply_scaled(&self, image: &RgbImage, full: (u32, u32), rng: &mut Rng) -> Result<Vec<f32>> {
        if !self.lighting.is_finite() || self.lighting < 0.0 {
            return Err(Error::Invalid(format!(
                "augmentation lighting std must be finite and >= 0, got {}",
                self.lighting
            )));
        }
        let side = self.preprocess.crop;
        let crop = self.crop;
        let mut resized = (0, 0);
        let (cropped, offset) =
            self.preprocess
                .resize_and_crop_scaled(image, full, |nw, nh, centre| {
                    resized = (nw, nh);
                    match crop {
                        Crop::Center => centre,
                        Crop::Random => (
                            rng.below((nw - side + 1) as usize) as u32,
                            rng.below((nh - side + 1) as usize) as u32,
                        ),
                    }
                })?;
        let mirror = self.flip && rng.uniform() < 0.5;
        let shift = if self.lighting > 0.0 {
            let alphas = [(); 3].map(|_| rng.normal() * self.lighting);
            lighting_rgb(alphas)
        } else {
            [0.0; 3]
        };
        self.values(&cropped, resized, offset, mirror, shift)
    }

    /// Decodes the file as the pipeline's `load` does (with its format and size checks, and its
    /// DCT-scaled decode of large JPEGs) and applies [`Augment::apply`].
    pub fn load(&self, path: &Path, rng: &mut Rng) -> Result<Vec<f32>> {
        let decoded = self.preprocess.decode(path, true)?;
        self.apply_scaled(&decoded.image, decoded.full, rng)
    }

    /// The ten crops of the paper's test time, each `3 * crop * crop` values: the top-left,
    /// top-right, bottom-left, bottom-right and centre crops of the resized image (torchvision's
    /// `TenCrop` order), then their mirrors in the same order. Uses only `preprocess`; no
    /// randomness, no lighting.
    ///
    /// ```
    /// use candle_zoo::data::augment::Augment;
    /// use candle_zoo::data::preprocess::Preprocess;
    /// let image = image::RgbImage::new(300, 256);
    /// let crops = Augment::eval(Preprocess::caffe()).ten_crop(&image)?;
    /// assert_eq!((crops.len(), crops[4].len()), (10, 3 * 227 * 227));
    /// # Ok::<(), candle_zoo::Error>(())
    /// ```
    pub fn ten_crop(&self, image: &RgbImage) -> Result<Vec<Vec<f32>>> {
        let side = self.preprocess.crop;
        let mut plain = Vec::with_capacity(10);
        let mut mirrored = Vec::with_capacity(5);
        for k in 0..5 {
            let mut resized = (0, 0);
            let (cropped, offset) = self.preprocess.resize_and_crop_at(image, |nw, nh, c| {
                resized = (nw, nh);
                let (right, bottom) = (nw - side, nh - side);
                match k {
                    0 => (0, 0),
                    1 => (right, 0),
                    2 => (0, bottom),
                    3 => (right, bottom),
                    _ => c,
                }
            })?;
            plain.push(self.values(&cropped, resized, offset, false, [0.0; 3])?);
            mirrored.push(self.values(&cropped, resized, offset, true, [0.0; 3])?);
        }
        plain.extend(mirrored);
        Ok(plain)
    }

    /// The crop's values in the model's units, order and normalisation, with `shift` (RGB, in
    /// `[0, 1]` pixel units) added to every pixel and the result mirrored if asked.
    ///
    /// Bit for bit [`Preprocess::to_values`] when there is no shift or mirror: a `+ 0.0` is
    /// exact. A mean image is indexed at the crop's `offset` in the `resized` image and mirrored
    /// with the crop, as Caffe's data layer does (it subtracts, then mirrors).
    pub(crate) fn values(
        &self,
        crop: &RgbImage,
        resized: (u32, u32),
        offset: (u32, u32),
        mirror: bool,
        shift: [f32; 3],
    ) -> Result<Vec<f32>> {
        let p = &self.preprocess;
        let (w, h) = crop.dimensions();
        let (w, h) = (w as usize, h as usize);
        let (left, top) = (offset.0 as usize, offset.1 as usize);
        if let Some(m) = &p.mean_image {
            if (m.width, m.height) != (resized.0 as usize, resized.1 as usize)
                || m.values.len() != 3 * m.width * m.height
            {
                return Err(Error::Invalid(format!(
                    "the {}x{} mean image does not match the {}x{} resized image; build the \
                     pipeline with Preprocess::with_mean_image",
                    m.width, m.height, resized.0, resized.1
                )));
            }
        }
        let plane = w * h;
        let raw = crop.as_raw();
        // Model units per [0, 1] unit: 1 for torchvision's /255, 255 for Caffe's 0..255.
        let unit = 255.0 * p.scale;
        let mut data = vec![0f32; 3 * plane];
        for (c, out) in data.chunks_exact_mut(plane.max(1)).enumerate().take(3) {
            let src = if p.bgr { 2 - c } else { c };
            let add = shift[src] * unit;
            let (mean, std) = (p.mean[c], p.std[c]);
            for y in 0..h {
                let row = &raw[3 * y * w..3 * (y + 1) * w];
                let mean_row = p.mean_image.as_ref().map(|m| {
                    let start = c * m.height * m.width + (top + y) * m.width + left;
                    &m.values[start..start + w]
                });
                let out_row = &mut out[y * w..(y + 1) * w];
                for x in 0..w {
                    let mean = mean_row.map_or(mean, |m| m[x]);
                    let v = (row[3 * x + src] as f32 * p.scale + add - mean) / std;
                    out_row[if mirror { w - 1 - x } else { x }] = v;
                }
            }
        }
        Ok(data)
    }
}

/// The PCA lighting shift `sum_i alpha_i * lambda_i * v_i` (RGB, pixel values in `[0, 1]`) for
/// the given alphas.
pub(crate) fn lighting_rgb(alphas: [f32; 3]) -> [f32; 3] {
    let mut rgb = [0f32; 3];
    for (c, out) in rgb.iter_mut().enumerate() {
        *out = (0..3)
            .map(|i| IMAGENET_EIGVEC[c][i] * alphas[i] * IMAGENET_EIGVAL[i])
            .sum();
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::{MeanImage, Resize};

    /// A deterministic, textured test image.
    fn textured(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                (x * x + 5 * y) as u8,
                ((x ^ y) * 11) as u8,
            ])
        })
    }

    /// Pixel (x, y) is (10x, 10y, 0): a crop's first values give its offset.
    fn positions(side: u32) -> RgbImage {
        RgbImage::from_fn(side, side, |x, y| {
            image::Rgb([(10 * x) as u8, (10 * y) as u8, 0])
        })
    }

    /// Identity units: values are the raw RGB bytes.
    fn raw_pipeline(resize: u32, crop: u32) -> Preprocess {
        Preprocess {
            resize: Resize::Exact(resize, resize),
            crop,
            scale: 1.0,
            bgr: false,
            mean: [0.0; 3],
            std: [1.0; 3],
            min_side: 1,
            mean_image: None,
            dct_scaling: false,
        }
    }

    fn mirror(values: &[f32], side: usize) -> Vec<f32> {
        values
            .chunks(side)
            .flat_map(|row| row.iter().rev().copied())
            .collect()
    }

    fn caffe_with_mean_image() -> Result<Preprocess> {
        let values = (0..3 * 256 * 256)
            .map(|i| 100.0 + (i % 97) as f32)
            .collect();
        Preprocess::caffe().with_mean_image(MeanImage {
            height: 256,
            width: 256,
            values,
        })
    }

    #[test]
    fn eval_is_exactly_the_preprocessing() -> Result<()> {
        for p in [
            Preprocess::torchvision(),
            Preprocess::caffe(),
            caffe_with_mean_image()?,
        ] {
            let eval = Augment::eval(p.clone());
            // 451x300: resized and cropped; 256x256: the crop-only path for the Caffe warp.
            for image in [textured(451, 300), textured(256, 256), textured(300, 451)] {
                let want = p.to_values(&p.resize_and_crop(&image)?);
                let got = eval.apply(&image, &mut Rng::new(1))?;
                assert!(want == got, "eval differs from preprocess for {p:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn random_crop_resamples_like_the_whole_resize() -> Result<()> {
        // The crop-only resize must equal the same window of the full resized image.
        let image = textured(451, 300);
        let p = Preprocess::torchvision();
        let (nw, nh) = (384, 256);
        let src = fast_image_resize::images::ImageRef::new(
            451,
            300,
            image.as_raw(),
            fast_image_resize::PixelType::U8x3,
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let mut full =
            fast_image_resize::images::Image::new(nw, nh, fast_image_resize::PixelType::U8x3);
        let options = fast_image_resize::ResizeOptions::new().resize_alg(
            fast_image_resize::ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear),
        );
        fast_image_resize::Resizer::new()
            .resize(&src, &mut full, &options)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let full = RgbImage::from_raw(nw, nh, full.into_vec()).expect("buffer size");
        let mut worst = 0i32;
        for (left, top) in [(0, 0), (160, 32), (77, 5), (159, 31)] {
            let (crop, _) = p.resize_and_crop_at(&image, |_, _, _| (left, top))?;
            let window = image::imageops::crop_imm(&full, left, top, 224, 224).to_image();
            for (a, b) in crop.as_raw().iter().zip(window.as_raw()) {
                worst = worst.max((*a as i32 - *b as i32).abs());
            }
        }
        assert_eq!(worst, 0, "crop-only resampling differs by up to {worst}");
        assert!(p.resize_and_crop_at(&image, |_, _, _| (161, 0)).is_err());
        Ok(())
    }

    #[test]
    fn random_offsets_cover_all_positions_uniformly() -> Result<()> {
        let aug = Augment {
            flip: false,
            lighting: 0.0,
            ..Augment::train(raw_pipeline(12, 8))
        };
        let image = positions(12);
        let mut counts = [[0usize; 5]; 5];
        let mut rng = Rng::new(5);
        for _ in 0..5000 {
            let v = aug.apply(&image, &mut rng)?;
            let (left, top) = ((v[0] / 10.0) as usize, (v[64] / 10.0) as usize);
            counts[top][left] += 1;
        }
        for c in counts.iter().flatten() {
            assert!((150..250).contains(c), "{counts:?}");
        }
        Ok(())
    }

    #[test]
    fn flips_mirror_the_crop() -> Result<()> {
        let image = textured(300, 256);
        let plain = Augment {
            crop: Crop::Center,
            lighting: 0.0,
            flip: false,
            ..Augment::train(Preprocess::torchvision())
        };
        let flipping = Augment {
            flip: true,
            ..plain.clone()
        };
        let want = plain.apply(&image, &mut Rng::new(0))?;
        let mirrored = mirror(&want, 224);
        let mut seen = [0; 2];
        for seed in 0..40 {
            assert_eq!(plain.apply(&image, &mut Rng::new(seed))?, want);
            let got = flipping.apply(&image, &mut Rng::new(seed))?;
            if got == want {
                seen[0] += 1;
            } else {
                assert!(got == mirrored, "neither the crop nor its mirror");
                seen[1] += 1;
            }
        }
        assert!(seen[0] > 5 && seen[1] > 5, "{seen:?}");
        // Forced: the mirror of the Caffe crop with its mean image mirrors the mean too.
        let p = caffe_with_mean_image()?;
        let aug = Augment::eval(p.clone());
        let (crop, offset) = p.resize_and_crop_at(&image, |_, _, c| c)?;
        let straight = aug.values(&crop, (256, 256), offset, false, [0.0; 3])?;
        let flipped = aug.values(&crop, (256, 256), offset, true, [0.0; 3])?;
        assert_eq!(flipped, mirror(&straight, 227));
        Ok(())
    }

    #[test]
    fn same_seed_same_output() -> Result<()> {
        let image = textured(451, 300);
        let aug = Augment::train(Preprocess::torchvision());
        let a = aug.apply(&image, &mut Rng::stream(3, &[0, 1]))?;
        assert_eq!(a, aug.apply(&image, &mut Rng::stream(3, &[0, 1]))?);
        assert_ne!(a, aug.apply(&image, &mut Rng::stream(3, &[0, 2]))?);
        assert!(a.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn lighting_shifts_the_colour_by_the_pca_vector() -> Result<()> {
        // alpha = (1, 0, 0) shifts along the first eigenvector, scaled by its eigenvalue.
        let rgb = lighting_rgb([1.0, 0.0, 0.0]);
        let want = [-0.5675 * 0.2175, -0.5808 * 0.2175, -0.5836 * 0.2175];
        for c in 0..3 {
            assert!((rgb[c] - want[c]).abs() < 1e-7);
        }
        let alphas = [0.3, -1.2, 2.0];
        let rgb = lighting_rgb(alphas);
        let image = textured(300, 256);
        for p in [Preprocess::torchvision(), Preprocess::caffe()] {
            let aug = Augment::eval(p.clone());
            let (crop, offset) = p.resize_and_crop_at(&image, |_, _, c| c)?;
            let base = aug.values(&crop, (0, 0), offset, false, [0.0; 3])?;
            let lit = aug.values(&crop, (0, 0), offset, false, rgb)?;
            let plane = base.len() / 3;
            for c in 0..3 {
                let src = if p.bgr { 2 - c } else { c };
                let want = rgb[src] * 255.0 * p.scale / p.std[c];
                let diff: f64 = (c * plane..(c + 1) * plane)
                    .map(|i| (lit[i] - base[i]) as f64)
                    .sum::<f64>()
                    / plane as f64;
                assert!((diff - want as f64).abs() < 1e-4, "{p:?} channel {c}");
            }
        }
        // Drawn: with the same stream the crop and flip match, and lighting adds one colour.
        let image = textured(451, 300);
        let lit = Augment::train(Preprocess::torchvision());
        let unlit = Augment {
            lighting: 0.0,
            ..lit.clone()
        };
        let a = lit.apply(&image, &mut Rng::new(8))?;
        let b = unlit.apply(&image, &mut Rng::new(8))?;
        let plane = 224 * 224;
        for c in 0..3 {
            let d0 = a[c * plane] - b[c * plane];
            assert!(d0.abs() > 1e-4, "lighting changed nothing in channel {c}");
            for i in (c * plane..(c + 1) * plane).step_by(97) {
                assert!((a[i] - b[i] - d0).abs() < 1e-4);
            }
        }
        Ok(())
    }

    #[test]
    fn ten_crop_takes_corners_centre_and_mirrors() -> Result<()> {
        let aug = Augment::eval(raw_pipeline(12, 8));
        let crops = aug.ten_crop(&positions(12))?;
        assert_eq!(crops.len(), 10);
        assert!(crops.iter().all(|c| c.len() == 3 * 64));
        let offset = |v: &[f32]| (v[0] / 10.0, v[64] / 10.0);
        let got: Vec<_> = crops[..5].iter().map(|c| offset(c)).collect();
        assert_eq!(
            got,
            [(0.0, 0.0), (4.0, 0.0), (0.0, 4.0), (4.0, 4.0), (2.0, 2.0)]
        );
        for k in 0..5 {
            assert_eq!(crops[k + 5], mirror(&crops[k], 8));
        }
        // The centre crop is the evaluation crop, on a real pipeline too.
        let image = textured(451, 300);
        for p in [Preprocess::torchvision(), caffe_with_mean_image()?] {
            let aug = Augment::eval(p);
            let crops = aug.ten_crop(&image)?;
            assert_eq!(crops[4], aug.apply(&image, &mut Rng::new(0))?);
            assert_eq!(crops[3].len(), 3 * aug.side() * aug.side());
        }
        Ok(())
    }

    #[test]
    fn bad_settings_are_errors() {
        let image = textured(64, 64);
        let mut aug = Augment::train(raw_pipeline(32, 16));
        aug.lighting = f32::NAN;
        assert!(matches!(
            aug.apply(&image, &mut Rng::new(0)),
            Err(Error::Invalid(_))
        ));
        let aug = Augment::train(raw_pipeline(32, 40));
        assert!(aug.apply(&image, &mut Rng::new(0)).is_err());
    }
}
