//! Image loading: real photos in both presets, and the errors for files that are not images or
//! are too small.

mod common;

use std::path::Path;

use candle_core::Device;
use candle_zoo::data::preprocess::{Preprocess, Preset};
use candle_zoo::Error;

fn asset(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name)
}

#[test]
fn bundled_photos_load_in_both_presets() {
    let paths = [asset("chelsea.png"), asset("coffee.png")];
    let tv = Preprocess::torchvision()
        .load_batch(&paths, &Device::Cpu)
        .unwrap();
    assert_eq!(tv.dims(), &[2, 3, 224, 224]);
    // Normalised: roughly zero-mean, unit-scale values.
    let mean = tv.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(mean.abs() < 1.5, "{mean}");
    let caffe = Preset::Caffe
        .pipeline()
        .load(&paths[0], &Device::Cpu)
        .unwrap();
    assert_eq!(caffe.dims(), &[3, 227, 227]);
    let max = caffe
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        max > 50.0 && max <= 256.0,
        "Caffe inputs are 0..255 minus the mean, got max {max}"
    );
}

/// torchvision's pipeline (PIL, Resize(256), CenterCrop(224), ToTensor, Normalize) on the same
/// photos, from `scripts/make_fixtures.py`. Both resample with Pillow's bilinear filter, but round
/// differently in the last bit, so the bound is on pixel values: at most 0.03 after
/// normalisation (about 1.7 levels of 255), 0.005 on average. `tests/extract.rs` checks the
/// whole crops (at most 1 level apart on these PNGs) and the resulting fc7 features.
#[test]
fn torchvision_preset_matches_torchvision_transforms() {
    let fx = common::parity_tensors();
    for photo in ["chelsea.png", "coffee.png"] {
        let x = Preprocess::torchvision()
            .load(asset(photo), &Device::Cpu)
            .unwrap();
        let want = fx[&format!("preprocess/{photo}.sample")]
            .to_vec1::<f32>()
            .unwrap();
        let got = common::sample(&x, 2048);
        let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().cloned().fold(0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        assert!(
            max <= 0.03 && mean <= 0.005,
            "{photo}: max {max}, mean {mean}"
        );
    }
}

#[test]
fn not_an_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.jpg");
    std::fs::write(&path, "definitely not a jpeg").unwrap();
    let err = Preprocess::torchvision()
        .load(&path, &Device::Cpu)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Image { .. }), "{msg}");
    assert!(
        msg.contains("photo.jpg") && msg.contains("not a readable image"),
        "{msg}"
    );

    // A PNG signature with nothing valid after it.
    let path = dir.path().join("broken.png");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    let msg = Preprocess::torchvision()
        .load(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("broken.png") && msg.contains("not a readable image"),
        "{msg}"
    );

    let msg = Preprocess::torchvision()
        .load(dir.path().join("absent.png"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.png"), "{msg}");
}

#[test]
fn too_small_an_image_is_named_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.png");
    image::RgbImage::new(12, 40).save(&path).unwrap();
    let err = Preprocess::torchvision()
        .load(&path, &Device::Cpu)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ImageTooSmall { .. }), "{msg}");
    assert!(msg.contains("tiny.png") && msg.contains("12x40"), "{msg}");
}

#[test]
fn grayscale_and_alpha_images_become_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let gray = dir.path().join("gray.png");
    image::GrayImage::from_pixel(64, 48, image::Luma([128]))
        .save(&gray)
        .unwrap();
    let rgba = dir.path().join("rgba.png");
    image::RgbaImage::from_pixel(50, 70, image::Rgba([10, 20, 30, 0]))
        .save(&rgba)
        .unwrap();
    let t = Preprocess::torchvision()
        .load_batch(&[gray, rgba], &Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[2, 3, 224, 224]);
}

/// A cut file is a failure, not a grey-filled image: JPEG (whose decoder fills what is missing)
/// and PNG, cut at many points.
#[test]
fn truncated_images_are_failures() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    for name in ["rocket.jpg", "chelsea.png"] {
        let bytes = std::fs::read(root.join(name)).unwrap();
        for fraction in [0.05, 0.25, 0.5, 0.9, 0.999] {
            let cut = (bytes.len() as f64 * fraction) as usize;
            let path = dir.path().join(format!("cut-{cut}-{name}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = Preprocess::torchvision()
                .load(&path, &Device::Cpu)
                .expect_err(&format!("{name} cut at {cut} of {} bytes", bytes.len()))
                .to_string();
            assert!(err.contains(&format!("cut-{cut}-{name}")), "{err}");
        }
    }
    let jpeg = std::fs::read(root.join("rocket.jpg")).unwrap();
    let half = dir.path().join("half.jpg");
    std::fs::write(&half, &jpeg[..jpeg.len() / 2]).unwrap();
    let err = Preprocess::torchvision()
        .load(&half, &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}
