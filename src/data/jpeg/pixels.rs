//! From coefficients to RGB: the reduced inverse DCT, chroma upsampling and colour conversion,
//! each as libjpeg defines it (so the pixels stay within a level or two of libjpeg-derived
//! decoders').

/// One component's samples, padded to whole MCUs.
pub(super) struct Plane {
    pub width: usize,
    pub height: usize,
    pub samples: Vec<u8>,
}

impl Plane {
    pub(super) fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            samples: vec![0; width * height],
        }
    }
}

/// The `N`-point inverse DCT of an 8x8 block's `N x N` lowest frequencies (`N` = 1, 2 or 4),
/// with the 8-point transform's normalisation: libjpeg's reduced IDCT, which gives each output
/// sample roughly the mean of the `8/N x 8/N` full-size pixels it stands for.
pub(super) struct Idct<const N: usize> {
    /// `basis[x][u] = c(u) / 2 * cos((2x + 1) u pi / 2N)`, `c(0) = 1/sqrt(2)`, else 1.
    basis: [[f32; N]; N],
}

impl<const N: usize> Idct<N> {
    pub(super) fn new() -> Self {
        let mut basis = [[0.0; N]; N];
        for (x, row) in basis.iter_mut().enumerate() {
            for (u, b) in row.iter_mut().enumerate() {
                let c = if u == 0 {
                    std::f64::consts::FRAC_1_SQRT_2
                } else {
                    1.0
                };
                let angle = (2 * x + 1) as f64 * u as f64 * std::f64::consts::PI / (2 * N) as f64;
                *b = (c / 2.0 * angle.cos()) as f32;
            }
        }
        Self { basis }
    }

    /// Writes the block's `N x N` samples (level-shifted, rounded, clamped) at `at` in `plane`.
    /// `block` holds the dequantized coefficients row-major; `flat` says all but the DC are 0.
    #[inline]
    pub(super) fn write(
        &self,
        block: &[i32; 16],
        flat: bool,
        plane: &mut Plane,
        (x0, y0): (usize, usize),
    ) {
        let stride = plane.width;
        let out = &mut plane.samples[y0 * stride + x0..];
        let mut rows = out.chunks_mut(stride);
        if flat || N == 1 {
            // The block's mean: most blocks at 1/4 and 1/8 scale.
            let v = (((block[0] as i64 + 4) >> 3) + 128).clamp(0, 255) as u8;
            for row in rows.by_ref().take(N) {
                row[..N].fill(v);
            }
            return;
        }
        if N == 2 {
            // Every basis value is +-1/(2 sqrt 2): the transform is exact in integers.
            // (i64: damaged data can put anything in the DC.)
            let [dc, u, v, uv] = [block[0], block[1], block[2], block[3]].map(i64::from);
            let sample = |s: i64| (((s + 4) >> 3) + 128).clamp(0, 255) as u8;
            for (y, row) in rows.take(2).enumerate() {
                let (v, uv) = if y == 0 { (v, uv) } else { (-v, -uv) };
                row[0] = sample(dc + u + v + uv);
                row[1] = sample(dc - u + v - uv);
            }
            return;
        }
        let b = &self.basis;
        // Each row of coefficients (vertical frequency v) to a row of horizontal samples, then
        // each column of those to the output column.
        let mut across = [[0f32; N]; N];
        for (v, samples) in across.iter_mut().enumerate() {
            for (x, s) in samples.iter_mut().enumerate() {
                *s = (0..N).map(|u| b[x][u] * block[v * N + u] as f32).sum();
            }
        }
        for (y, row) in rows.take(N).enumerate() {
            for (x, sample) in row[..N].iter_mut().enumerate() {
                let s: f32 = (0..N).map(|v| b[y][v] * across[v][x]).sum();
                // Truncation rounds: below -128.5 is clamped anyway.
                *sample = ((s + 128.5) as i32).clamp(0, 255) as u8;
            }
        }
    }
}

/// `out[2i]` and `out[2i + 1]`: `3 * row[i]` plus its left and right neighbour (the sample
/// itself at the edges), the weights of libjpeg's "fancy" (triangle-filter) upsampling.
fn double_row(row: &[u16], out: &mut [u16]) {
    let last = row.len() - 1;
    for i in 0..=last {
        let near = 3 * row[i];
        out[2 * i] = near + row[i.saturating_sub(1)];
        out[2 * i + 1] = near + row[(i + 1).min(last)];
    }
}

/// Chroma doubled across (4:2:2, `v` = 1) or both ways (4:2:0, `v` = 2) to the luma plane's
/// size, by libjpeg's fancy upsampling, rounding as it does.
pub(super) fn upsample(chroma: &Plane, v: usize) -> Plane {
    let (w, ch) = (chroma.width, chroma.height);
    let mut out = Plane::new(w * 2, ch * v);
    let mut column = vec![0u16; w];
    let mut doubled = vec![0u16; 2 * w];
    let row = |y: usize| &chroma.samples[y * w..(y + 1) * w];
    // Across only: (3 near + far + 1 or 2) / 4. Both ways: the same vertically first, then
    // (3 near + far + 8 or 7) / 16 over the column sums.
    let (even, odd, shift) = if v == 2 { (8, 7, 4) } else { (1, 2, 2) };
    for (y, dst) in out.samples.chunks_exact_mut(2 * w).enumerate() {
        let cy = y / v;
        if v == 2 {
            let far = if y % 2 == 0 {
                cy.saturating_sub(1)
            } else {
                (cy + 1).min(ch - 1)
            };
            for ((c, &a), &b) in column.iter_mut().zip(row(cy)).zip(row(far)) {
                *c = 3 * a as u16 + b as u16;
            }
        } else {
            for (c, &a) in column.iter_mut().zip(row(cy)) {
                *c = a as u16;
            }
        }
        double_row(&column, &mut doubled);
        for (pair, d) in dst.chunks_exact_mut(2).zip(doubled.chunks_exact(2)) {
            pair[0] = ((d[0] + even) >> shift) as u8;
            pair[1] = ((d[1] + odd) >> shift) as u8;
        }
    }
    out
}

/// JFIF's YCbCr to RGB in libjpeg's 16-bit fixed point, cropped to `width x height`.
pub(super) fn ycbcr_to_rgb(
    y: &Plane,
    cb: &Plane,
    cr: &Plane,
    width: usize,
    height: usize,
) -> Vec<u8> {
    const ONE_HALF: i32 = 1 << 15;
    let fix = |x: f64| (x * 65536.0 + 0.5) as i32;
    let (r_cr, g_cb, g_cr, b_cb) = (fix(1.402), fix(0.34414), fix(0.71414), fix(1.772));
    let mut rgb = vec![0u8; width * height * 3];
    for (row, out) in rgb.chunks_exact_mut(width * 3).enumerate() {
        let at = row * y.width;
        let (ys, cbs, crs) = (
            &y.samples[at..at + width],
            &cb.samples[at..at + width],
            &cr.samples[at..at + width],
        );
        for (((px, &l), &b), &r) in out.chunks_exact_mut(3).zip(ys).zip(cbs).zip(crs) {
            let (l, b, r) = (l as i32, b as i32 - 128, r as i32 - 128);
            px[0] = (l + ((r_cr * r + ONE_HALF) >> 16)).clamp(0, 255) as u8;
            px[1] = (l + ((-g_cb * b - g_cr * r + ONE_HALF) >> 16)).clamp(0, 255) as u8;
            px[2] = (l + ((b_cb * b + ONE_HALF) >> 16)).clamp(0, 255) as u8;
        }
    }
    rgb
}

/// A grey plane as RGB, cropped to `width x height`.
pub(super) fn grey_to_rgb(y: &Plane, width: usize, height: usize) -> Vec<u8> {
    let mut rgb = vec![0u8; width * height * 3];
    for (row, out) in rgb.chunks_exact_mut(width * 3).enumerate() {
        let at = row * y.width;
        for (px, &l) in out.chunks_exact_mut(3).zip(&y.samples[at..at + width]) {
            px.fill(l);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reduced IDCT of a block with one frequency equals the formula computed in f64.
    #[test]
    fn the_reduced_idct_is_the_n_point_transform() {
        fn check<const N: usize>() {
            let n = N;
            let idct = Idct::<N>::new();
            for k in 0..n * n {
                let mut block = [0i32; 16];
                block[0] = 40;
                block[k] -= 100;
                let mut plane = Plane::new(n, n);
                idct.write(&block, k == 0, &mut plane, (0, 0));
                for y in 0..n {
                    for x in 0..n {
                        let c = |u: usize| if u == 0 { 0.5f64.sqrt() } else { 1.0 };
                        let mut s = 0.0;
                        for v in 0..n {
                            for u in 0..n {
                                let cos = |p: usize, f: usize| {
                                    ((2 * p + 1) as f64 * f as f64 * std::f64::consts::PI
                                        / (2 * n) as f64)
                                        .cos()
                                };
                                s += c(u) * c(v) / 4.0
                                    * block[v * n + u] as f64
                                    * cos(x, u)
                                    * cos(y, v);
                            }
                        }
                        let want = (s + 128.0).round().clamp(0.0, 255.0);
                        let got = plane.samples[y * n + x] as f64;
                        assert!(
                            (got - want).abs() <= 0.5,
                            "n {n}, k {k}, ({x}, {y}): {got} vs {want}"
                        );
                    }
                }
            }
        }
        check::<1>();
        check::<2>();
        check::<4>();
    }

    /// Upsampling keeps a flat plane flat and puts a step's transition where libjpeg does.
    #[test]
    fn fancy_upsampling_weighs_three_to_one() {
        let mut chroma = Plane::new(2, 2);
        chroma.samples = vec![0, 160, 0, 160];
        let across = upsample(&chroma, 1);
        assert_eq!(&across.samples[..4], &[0, 40, 120, 160]);
        let both = upsample(&chroma, 2);
        assert_eq!((both.width, both.height), (4, 4));
        for row in both.samples.chunks(4) {
            assert_eq!(row, &[0, 40, 120, 160]);
        }
        chroma.samples = vec![80; 4];
        assert!(upsample(&chroma, 2).samples.iter().all(|&s| s == 80));
    }
}
