//! A JPEG decoder for one job: a baseline photo decoded at 1/2, 1/4 or 1/8 of its size in the
//! DCT domain, on the calling thread, for the preprocessing that resizes it to ~256 pixels next.
//!
//! At those scales most of a block's 64 coefficients are only skipped, so the work is the
//! entropy decoding; this one resolves a whole coefficient (code and extra bits) per table
//! lookup, reads the stream eight bytes at a time, and writes a flat block (most blocks, at
//! 1/4 and 1/8) without a transform. `benches/NOTES.md` has its speed against PIL and
//! jpeg-decoder.
//!
//! It reads what cameras and encoders write for photos: sequential Huffman-coded 8-bit JPEG
//! (SOF0/SOF1), one interleaved scan, grey or YCbCr with 4:4:4, 4:2:2 or 4:2:0 sampling,
//! restart markers. Anything else (progressive or arithmetic coding, CMYK or Adobe RGB,
//! 12-bit samples, other sampling) gives `None`, as does data it cannot decode: the caller
//! falls back to a general decoder, which decodes the file or reports what is wrong with it.

mod huffman;
mod pixels;

use huffman::{decode_block, BitReader, Huffman, Slots};
use pixels::{Idct, Plane};

/// A parsed JPEG up to its first scan's entropy-coded data.
pub(crate) struct Jpeg<'a> {
    pub width: u32,
    pub height: u32,
    components: Vec<Component>,
    quant: [Option<Box<[u16; 64]>>; 4],
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    restart_interval: u32,
    /// The scan's entropy-coded data and what follows it.
    data: &'a [u8],
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant: usize,
    dc: usize,
    ac: usize,
}

impl<'a> Jpeg<'a> {
    /// Reads the markers up to the first scan. `None` for a file this decoder does not read.
    pub(crate) fn parse(bytes: &'a [u8]) -> Option<Self> {
        let mut jpeg = Jpeg {
            width: 0,
            height: 0,
            components: Vec::new(),
            quant: Default::default(),
            dc: Default::default(),
            ac: Default::default(),
            restart_interval: 0,
            data: &[],
        };
        if !bytes.starts_with(&[0xFF, 0xD8]) {
            return None;
        }
        let mut i = 2;
        loop {
            while *bytes.get(i)? != 0xFF {
                i += 1;
            }
            while *bytes.get(i)? == 0xFF {
                i += 1;
            }
            let marker = bytes[i];
            match marker {
                // The end of the image before any scan.
                0xD9 => return None,
                // Markers without a segment.
                0xD0..=0xD8 | 0x01 => {
                    i += 1;
                    continue;
                }
                _ => {}
            }
            let len = u16::from_be_bytes([*bytes.get(i + 1)?, *bytes.get(i + 2)?]) as usize;
            let segment = bytes.get(i + 3..i + 1 + len)?;
            i += 1 + len;
            match marker {
                0xC0 | 0xC1 => jpeg.frame(segment)?,
                // Other coding processes: progressive, lossless, arithmetic, hierarchical.
                0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
                0xC4 => jpeg.huffman(segment)?,
                0xDB => jpeg.quantisation(segment)?,
                0xDD => {
                    jpeg.restart_interval =
                        u16::from_be_bytes(segment.get(..2)?.try_into().ok()?) as u32
                }
                // Adobe's marker: its transform flag may say RGB or CMYK rather than YCbCr.
                0xEE if segment.starts_with(b"Adobe") => return None,
                0xDA => {
                    jpeg.scan(segment)?;
                    jpeg.data = &bytes[i..];
                    return Some(jpeg);
                }
                _ => {}
            }
        }
    }

    fn frame(&mut self, s: &[u8]) -> Option<()> {
        let (precision, n) = (*s.first()?, *s.get(5)? as usize);
        self.height = u16::from_be_bytes([s[1], s[2]]) as u32;
        self.width = u16::from_be_bytes([s[3], s[4]]) as u32;
        if precision != 8 || self.width == 0 || self.height == 0 || !(n == 1 || n == 3) {
            return None;
        }
        for c in s.get(6..6 + 3 * n)?.chunks_exact(3) {
            self.components.push(Component {
                id: c[0],
                h: (c[1] >> 4) as usize,
                v: (c[1] & 15) as usize,
                quant: c[2] as usize,
                dc: 0,
                ac: 0,
            });
        }
        if n == 1 {
            // A lone component's MCU is one block, whatever its sampling factors say.
            (self.components[0].h, self.components[0].v) = (1, 1);
        } else {
            let luma = (self.components[0].h, self.components[0].v);
            let chroma_whole = self.components[1..].iter().all(|c| (c.h, c.v) == (1, 1));
            // Component ids R, G, B mark an RGB file.
            let rgb = self.components.iter().map(|c| c.id).eq(*b"RGB");
            if !matches!(luma, (1, 1) | (2, 1) | (2, 2)) || !chroma_whole || rgb {
                return None;
            }
        }
        Some(())
    }

    fn huffman(&mut self, mut s: &[u8]) -> Option<()> {
        while let Some(&class_id) = s.first() {
            let counts: &[u8; 16] = s.get(1..17)?.try_into().ok()?;
            let n: usize = counts.iter().map(|&c| c as usize).sum();
            let class = class_id >> 4;
            let table = Huffman::new(counts, s.get(17..17 + n)?, class == 0)?;
            let id = (class_id & 15) as usize;
            match class {
                0 => *self.dc.get_mut(id)? = Some(table),
                1 => *self.ac.get_mut(id)? = Some(table),
                _ => return None,
            }
            s = &s[17 + n..];
        }
        Some(())
    }

    fn quantisation(&mut self, mut s: &[u8]) -> Option<()> {
        while let Some(&precision_id) = s.first() {
            let mut table = Box::new([0u16; 64]);
            let wide = precision_id >> 4 == 1;
            let size = if wide { 128 } else { 64 };
            let values = s.get(1..1 + size)?;
            for (q, v) in table.iter_mut().zip(values.chunks(size / 64)) {
                *q = if wide {
                    u16::from_be_bytes([v[0], v[1]])
                } else {
                    v[0] as u16
                };
            }
            *self.quant.get_mut((precision_id & 15) as usize)? = Some(table);
            s = &s[1 + size..];
        }
        Some(())
    }

    fn scan(&mut self, s: &[u8]) -> Option<()> {
        let n = *s.first()? as usize;
        // One scan with every component, all 64 coefficients, no successive approximation.
        if self.components.is_empty()
            || n != self.components.len()
            || s.get(1 + 2 * n..4 + 2 * n)? != [0, 63, 0]
        {
            return None;
        }
        for (c, sel) in self.components.iter_mut().zip(s[1..].chunks_exact(2)) {
            if c.id != sel[0] {
                return None;
            }
            (c.dc, c.ac) = ((sel[1] >> 4) as usize, (sel[1] & 15) as usize);
        }
        Some(())
    }

    /// The image decoded at `1 / denom` of each side (`denom` 2, 4 or 8), as RGB:
    /// `ceil(width / denom) x ceil(height / denom)` pixels. `None` for data that do not decode.
    pub(crate) fn decode(&self, denom: u32) -> Option<(u32, u32, Vec<u8>)> {
        // Beyond 256 MP (a 16k x 16k photo) the general decoder's allocation limits decide.
        if self.width as u64 * self.height as u64 > 1 << 28 {
            return None;
        }
        let planes = match denom {
            2 => self.planes::<4>()?,
            4 => self.planes::<2>()?,
            8 => self.planes::<1>()?,
            _ => return None,
        };
        let (hmax, vmax) = (self.components[0].h, self.components[0].v);
        let (w, h) = (self.width.div_ceil(denom), self.height.div_ceil(denom));
        let rgb = match planes.as_slice() {
            [y] => pixels::grey_to_rgb(y, w as usize, h as usize),
            [y, cb, cr] if (hmax, vmax) == (1, 1) => {
                pixels::ycbcr_to_rgb(y, cb, cr, w as usize, h as usize)
            }
            [y, cb, cr] => {
                let (cb, cr) = (pixels::upsample(cb, vmax), pixels::upsample(cr, vmax));
                pixels::ycbcr_to_rgb(y, &cb, &cr, w as usize, h as usize)
            }
            _ => return None,
        };
        Some((w, h, rgb))
    }

    /// Each component's samples at `N/8` scale, padded to whole MCUs.
    fn planes<const N: usize>(&self) -> Option<Vec<Plane>> {
        let (hmax, vmax) = (self.components[0].h, self.components[0].v);
        let mcus_x = (self.width as usize).div_ceil(8 * hmax);
        let mcus_y = (self.height as usize).div_ceil(8 * vmax);
        let mut planes: Vec<Plane> = self
            .components
            .iter()
            .map(|c| Plane::new(mcus_x * c.h * N, mcus_y * c.v * N))
            .collect();
        let tables = self
            .components
            .iter()
            .map(|c| {
                let q = self.quant.get(c.quant)?.as_deref()?;
                Some((
                    self.dc.get(c.dc)?.as_ref()?,
                    self.ac.get(c.ac)?.as_ref()?,
                    q,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let (idct, slots) = (Idct::<N>::new(), Slots::new(N));
        let mut reader = BitReader::new(self.data);
        let mut predictors = vec![0i32; self.components.len()];
        let mut block = [0i32; 16];
        let (mut done, mut restarts) = (0u32, 0u32);
        for my in 0..mcus_y {
            for mx in 0..mcus_x {
                if self.restart_interval > 0 && done > 0 && done % self.restart_interval == 0 {
                    reader = reader.restart(restarts)?;
                    restarts += 1;
                    predictors.fill(0);
                }
                done += 1;
                for (ci, c) in self.components.iter().enumerate() {
                    let (dc, ac, q) = tables[ci];
                    for by in 0..c.v {
                        for bx in 0..c.h {
                            block[..N * N].fill(0);
                            let flat = decode_block(
                                &mut reader,
                                dc,
                                ac,
                                &mut predictors[ci],
                                q,
                                &slots,
                                &mut block,
                            )?;
                            let at = ((mx * c.h + bx) * N, (my * c.v + by) * N);
                            idct.write(&block, flat, &mut planes[ci], at);
                        }
                    }
                }
            }
        }
        (!reader.overread()).then_some(planes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    /// jpeg-decoder's scaled decode (libjpeg's reduced IDCT and upsampling, in integers), RGB.
    fn reference(bytes: &[u8], denom: u32) -> (u32, u32, Vec<u8>) {
        let mut d = jpeg_decoder::Decoder::new(bytes);
        d.read_info().unwrap();
        let info = d.info().unwrap();
        let (w, h) = (info.width as u32, info.height as u32);
        let (sw, sh) = d
            .scale(w.div_ceil(denom) as u16, h.div_ceil(denom) as u16)
            .unwrap();
        let pixels = d.decode().unwrap();
        let rgb = match d.info().unwrap().pixel_format {
            jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&l| [l, l, l]).collect(),
            _ => pixels,
        };
        (sw as u32, sh as u32, rgb)
    }

    /// Every layout this decoder reads gives jpeg-decoder's scaled pixels to within rounding:
    /// same size, mean difference under 0.15 of a level, none over 3 levels (float
    /// against integer transforms). At 1/8 jpeg-decoder truncates the block mean where libjpeg
    /// (and this decoder) round it, half a level of luma lower on average.
    #[test]
    fn scaled_decodes_match_jpeg_decoders() {
        for name in [
            "444.jpg",
            "422.jpg",
            "420.jpg",
            "420-restarts.jpg",
            "grey.jpg",
        ] {
            let bytes = fixture(name);
            let jpeg = Jpeg::parse(&bytes).unwrap_or_else(|| panic!("{name}: not read"));
            assert_eq!((jpeg.width, jpeg.height), (333, 250));
            for denom in [2, 4, 8] {
                let (w, h, got) = jpeg
                    .decode(denom)
                    .unwrap_or_else(|| panic!("{name} 1/{denom}"));
                let (rw, rh, want) = reference(&bytes, denom);
                assert_eq!((w, h), (rw, rh), "{name} at 1/{denom}");
                let diffs: Vec<i32> = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (a as i32 - b as i32).abs())
                    .collect();
                let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
                let max = *diffs.iter().max().unwrap();
                let bound = if denom == 8 { 1.0 } else { 0.15 };
                assert!(
                    mean < bound && max <= 3,
                    "{name} at 1/{denom}: mean {mean:.3}, max {max}"
                );
            }
        }
    }

    #[test]
    fn other_coding_processes_are_left_to_the_general_decoder() {
        assert!(Jpeg::parse(&fixture("progressive.jpg")).is_none());
        assert!(Jpeg::parse(b"\x89PNG\r\n\x1a\n").is_none());
    }

    /// A scan cut short, or damaged anywhere, gives `None` or an image, never a panic; a cut
    /// scan is never decoded from padding.
    #[test]
    fn damaged_scans_are_refused_without_panicking() {
        for name in ["420.jpg", "420-restarts.jpg", "444.jpg"] {
            let bytes = fixture(name);
            let scan = bytes.len() - Jpeg::parse(&bytes).unwrap().data.len();
            for cut in [scan + 1, (scan + bytes.len()) / 2, bytes.len() - 40] {
                let jpeg = Jpeg::parse(&bytes[..cut]).unwrap();
                assert!(jpeg.decode(8).is_none(), "{name} cut at {cut}");
            }
            let mut state = 0x2545_f491_4f6c_dd1du64;
            for _ in 0..200 {
                let mut damaged = bytes.clone();
                for _ in 0..4 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let at = scan + (state as usize) % (bytes.len() - scan);
                    damaged[at] = (state >> 32) as u8;
                }
                if let Some(jpeg) = Jpeg::parse(&damaged) {
                    for denom in [2, 8] {
                        let _ = jpeg.decode(denom);
                    }
                }
            }
        }
    }
}
