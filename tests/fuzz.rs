//! Fuzzing of every parser that reads files from outside the crate: `.pth` (the file, and its
//! pickle inside a valid archive), `.caffemodel`, ONNX, `.binaryproto`, safetensors headers and
//! images. Each target mutates real seed files (the fixtures the other tests use) with proptest
//! strategies (bit flips, byte and 32-bit writes of edge values, insertions, deletions,
//! duplications, truncations) and runs the parser on the result. An error is a fine answer; a
//! panic fails the case (and proptest shrinks it to a minimal input), and a stack overflow or an
//! abort kills the test process, failing the run.
//!
//! The number of cases per target is `CANDLE_ZOO_FUZZ_CASES` (default 2000: a few seconds for all
//! targets in a debug build), so that CI runs it for a bounded time; each target prints how many
//! cases it ran and how many of them the parser accepted. A longer campaign:
//! `CANDLE_ZOO_FUZZ_CASES=100000 cargo test --release --test fuzz -- --nocapture`.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use candle_zoo::data::preprocess::Preprocess;
use candle_zoo::models::alexnet::{AlexNet, Layout};
use candle_zoo::weights::convert::{convert, read_mean_image, ConvertOptions, SourceFormat};
use candle_zoo::weights::{save_safetensors, Checkpoint};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn fixture(path: &str) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::read(root.join(path)).unwrap()
}

/// One change to a file's bytes; positions wrap around the file's length.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Byte {
        at: usize,
        value: u8,
    },
    /// A little-endian 32-bit value where lengths, counts and sizes live.
    Word {
        at: usize,
        value: u32,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    Duplicate {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let edge = prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7f),
        Just(0x80),
        Just(0xff),
        Just(0x7fff_ffff),
        Just(0x8000_0000),
        Just(u32::MAX),
        any::<u32>(),
    ];
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        2 => (any::<usize>(), edge).prop_map(|(at, value)| Mutation::Word { at, value }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// `seed` with `mutations` applied, each at a position inside `window` (a part of the file where
/// the structure lives, e.g. a safetensors header) when given.
fn mutate(seed: &[u8], mutations: &[Mutation], window: Option<usize>) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in mutations {
        let span = window.unwrap_or(b.len()).min(b.len()).max(1);
        let pos = |at: usize| at % span;
        match m {
            Mutation::Flip { at, bit } if !b.is_empty() => b[pos(*at)] ^= 1 << bit,
            Mutation::Byte { at, value } if !b.is_empty() => b[pos(*at)] = *value,
            Mutation::Word { at, value } if b.len() >= 4 => {
                let p = pos(*at).min(b.len() - 4);
                b[p..p + 4].copy_from_slice(&value.to_le_bytes());
            }
            Mutation::Insert { at, bytes } => {
                let p = pos(*at).min(b.len());
                b.splice(p..p, bytes.iter().copied());
            }
            Mutation::Remove { at, len } if !b.is_empty() => {
                let p = pos(*at);
                let end = (p + len).min(b.len());
                b.drain(p..end);
            }
            Mutation::Duplicate { at, len } if !b.is_empty() => {
                let p = pos(*at);
                let chunk = b[p..(p + len).min(b.len())].to_vec();
                b.splice(p..p, chunk);
            }
            Mutation::Truncate { at } => b.truncate(pos(*at)),
            _ => {}
        }
    }
    b
}

fn cases() -> u32 {
    std::env::var("CANDLE_ZOO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Runs `parse` on mutations of `seeds` (`(file name, bytes)`; the name's extension is the one
/// the parser sees), reporting the cases run and accepted.
fn fuzz(
    target: &str,
    seeds: Vec<(&str, Vec<u8>)>,
    window: Option<usize>,
    parse: fn(&Path) -> bool,
) {
    let dir = tempfile::tempdir().unwrap();
    let accepted = AtomicUsize::new(0);
    let runs = AtomicUsize::new(0);
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let seed_count = seeds.len();
    let strategy = (0..seed_count, proptest::collection::vec(mutation(), 1..6));
    let result = TestRunner::new(config).run(&strategy, |(i, mutations)| {
        let (name, seed) = &seeds[i];
        let path = dir.path().join(name);
        std::fs::write(&path, mutate(seed, &mutations, window)).unwrap();
        runs.fetch_add(1, Ordering::Relaxed);
        if parse(&path) {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    eprintln!(
        "fuzz {target}: {} cases over {seed_count} seeds, {} accepted, no panic",
        runs.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("fuzz {target}: {e}");
    }
}

/// A weights file read in full: the header, every tensor, and the model if it is one.
fn read_weights(path: &Path) -> bool {
    let Ok(ckpt) = Checkpoint::open(path) else {
        return false;
    };
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    let model = ckpt.load(&Device::Cpu);
    let _ = ckpt.preprocess();
    vb.is_ok() && model.is_ok()
}

#[test]
fn fuzz_pth_files() {
    fuzz(
        "pth (file)",
        vec![
            ("tv_small.pth", fixture("tv_small.pth")),
            ("caffenet_port.pth", fixture("convert/caffenet_port.pth")),
            ("legacy.pth", fixture("legacy.pth")),
        ],
        // The archive's directory is at its end: mutate anywhere.
        None,
        read_weights,
    );
}

/// A `.pth` archive's pickle, and its other entries by name.
type PthEntries = (Vec<u8>, Vec<(String, Vec<u8>)>);

/// The entries of the `.pth` fixtures.
fn pth_entries(path: &str) -> &'static PthEntries {
    static ENTRIES: OnceLock<HashMap<String, PthEntries>> = OnceLock::new();
    let all = ENTRIES.get_or_init(|| {
        ["tv_small.pth", "convert/caffenet_port.pth"]
            .into_iter()
            .map(|p| {
                let bytes = fixture(p);
                let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
                let mut pickle = Vec::new();
                let mut others = Vec::new();
                for i in 0..zip.len() {
                    let mut f = zip.by_index(i).unwrap();
                    let name = f.name().unwrap().into_owned();
                    let mut data = Vec::new();
                    f.read_to_end(&mut data).unwrap();
                    if name.ends_with("data.pkl") {
                        pickle = data;
                    } else {
                        others.push((name, data));
                    }
                }
                (p.to_string(), (pickle, others))
            })
            .collect()
    });
    &all[path]
}

/// A `.pth` archive of the fixture `of`'s entries with `pickle` as its `data.pkl`.
fn repack(of: &str, pickle: &[u8], to: &Path) {
    let (_, others) = pth_entries(of);
    let prefix = others[0].0.split('/').next().unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(to).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file(format!("{prefix}/data.pkl"), stored)
        .unwrap();
    zip.write_all(pickle).unwrap();
    for (name, data) in others {
        zip.start_file(name.as_str(), stored).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn fuzz_pth_pickles() {
    // Mutated pickles inside otherwise valid archives, so that the pickle machine itself is hit.
    fn parse(path: &Path) -> bool {
        let of = if path.ends_with("tv.pkl") {
            "tv_small.pth"
        } else {
            "convert/caffenet_port.pth"
        };
        let pickle = std::fs::read(path).unwrap();
        let pth = path.with_extension("pth");
        repack(of, &pickle, &pth);
        read_weights(&pth)
    }
    fuzz(
        "pth (pickle)",
        vec![
            ("tv.pkl", pth_entries("tv_small.pth").0.clone()),
            (
                "caffenet.pkl",
                pth_entries("convert/caffenet_port.pth").0.clone(),
            ),
        ],
        None,
        parse,
    );
}

fn converts(path: &Path, format: SourceFormat) -> bool {
    let options = ConvertOptions {
        format: Some(format),
        ..Default::default()
    };
    convert(path, &options).is_ok()
}

#[test]
fn fuzz_caffemodels() {
    fuzz(
        "caffemodel",
        vec![
            ("a.caffemodel", fixture("convert/alexnet.caffemodel")),
            ("v1.caffemodel", fixture("convert/caffenet_v1.caffemodel")),
            ("v0.caffemodel", fixture("convert/alexnet_v0.caffemodel")),
        ],
        None,
        |p| converts(p, SourceFormat::Caffe),
    );
}

#[test]
fn fuzz_onnx() {
    fuzz(
        "onnx",
        vec![("a.onnx", fixture("convert/alexnet.onnx"))],
        None,
        |p| converts(p, SourceFormat::Onnx),
    );
}

#[test]
fn fuzz_binaryproto() {
    fuzz(
        "binaryproto",
        vec![("mean.binaryproto", fixture("convert/mean.binaryproto"))],
        None,
        |p| {
            read_mean_image(p).is_ok_and(|m| {
                // What a mean image is used for: its means, and a pipeline that takes it.
                let _ = m.channel_means();
                let p = Preprocess {
                    resize: candle_zoo::data::preprocess::Resize::Exact(
                        m.width as u32,
                        m.height as u32,
                    ),
                    ..Preprocess::caffe()
                };
                let _ = p.with_mean_image(m);
                true
            })
        },
    );
}

/// A small torchvision checkpoint as safetensors, with metadata, and the length of its header.
fn safetensors_seed() -> (Vec<u8>, usize) {
    let model =
        AlexNet::load(common::det_var_builder(&common::small(Layout::TorchVision))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("m.safetensors");
    let meta = std::collections::BTreeMap::from([
        ("layout".to_string(), "torchvision".to_string()),
        ("preprocess.crop".to_string(), "64".to_string()),
    ]);
    save_safetensors(&path, &model.named_tensors(), &meta).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (bytes, 8 + header)
}

#[test]
fn fuzz_safetensors_headers() {
    let (seed, header) = safetensors_seed();
    fuzz(
        "safetensors (header)",
        vec![("m.safetensors", seed)],
        Some(header),
        read_weights,
    );
}

/// Small real images: a PNG and a JPEG of a gradient.
fn image_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let image = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
    let mut out = Vec::new();
    for (name, format) in [
        ("g.png", image::ImageFormat::Png),
        ("g.jpg", image::ImageFormat::Jpeg),
    ] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        out.push((name, bytes.into_inner()));
    }
    out
}

#[test]
fn fuzz_image_decode() {
    fuzz("image decode", image_seeds(), None, |p| {
        let pre = Preprocess {
            min_side: 1,
            ..Preprocess::torchvision()
        };
        pre.load(p, &Device::Cpu).is_ok()
    });
}
