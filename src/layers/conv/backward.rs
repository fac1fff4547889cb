//! The backward pass: the weight and bias gradients by im2col and gemm, and the input gradient
//! as a convolution where it is one, else by gemm and col2im.

use std::ops::Range;

use rayon::prelude::*;

use super::{with_scratch, Geometry};
use crate::layers::cpu::{matmul, relu_grad, relu_grad_into, Split};

impl Geometry {
    /// Gradients of the weight and bias (when asked for) and of the input (when `dx` is given,
    /// zeroed, for the whole batch), from the output `res` and its gradient `grad`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        relu: bool,
        want_dw: bool,
        want_db: bool,
        dx: Option<&mut [f32]>,
    ) -> (Vec<f32>, Vec<f64>) {
        let (per, threads) = self.split();
        let in_image = self.in_image();
        // Each group's weight transposed once, `k x cout_g`, for the input gradient's gemm:
        // the gemm crate reads a row-major left operand faster than a transposed one, and
        // every image and tile would transpose it again (conv2-5 input gradients: ~1.4x their
        // forward time before this).
        let wt = if dx.is_some() {
            let (k, cout_g) = (self.k(), self.cout_g());
            let mut wt = vec![0f32; w.len()];
            for (wg, wtg) in w
                .chunks_exact(cout_g * k)
                .zip(wt.chunks_exact_mut(cout_g * k))
            {
                for (o, row) in wg.chunks_exact(k).enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        wtg[i * cout_g + o] = v;
                    }
                }
            }
            wt
        } else {
            Vec::new()
        };
        let wt = &wt[..];
        let run = |images: Range<usize>, dx: Option<&mut [f32]>| {
            let mut dw = vec![0f32; if want_dw { self.cout * self.k() } else { 0 }];
            let mut db = vec![0f64; if want_db { self.cout } else { 0 }];
            let scratch = self.tile_len() + if relu { self.out_image() } else { 0 };
            with_scratch(scratch, |buf| {
                let (col, masked) = buf.split_at_mut(self.tile_len());
                let mut dx = dx;
                for (i, img) in images.enumerate() {
                    let dx_image = dx
                        .as_deref_mut()
                        .map(|dx| &mut dx[i * in_image..(i + 1) * in_image]);
                    let grads = Grads {
                        dw: &mut dw,
                        first: i == 0,
                        db: &mut db,
                        dx: dx_image,
                    };
                    self.backward_image(x, wt, res, grad, img, relu, grads, col, masked, threads);
                }
            });
            (dw, db)
        };
        if per >= self.n {
            return run(0..self.n, dx);
        }
        // One run of images per thread, each with its slice of dx (if any).
        let runs = self.n.div_ceil(per);
        let slices: Vec<Option<&mut [f32]>> = match dx {
            Some(dx) => dx.chunks_mut(per * in_image).map(Some).collect(),
            None => (0..runs).map(|_| None).collect(),
        };
        let partials: Vec<(Vec<f32>, Vec<f64>)> = slices
            .into_par_iter()
            .enumerate()
            .map(|(t, dx)| run(t * per..((t + 1) * per).min(self.n), dx))
            .collect();
        // Sum the partials in run order, so that the result does not depend on scheduling.
        let mut iter = partials.into_iter();
        let (mut dw, mut db) = iter.next().unwrap_or_default();
        for (pw, pb) in iter {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dw, db)
    }

    /// The convolution whose output is this one's input gradient, where there is one: with
    /// stride 1, a square kernel and padding `pad < k`, the gradient is the correlation of the
    /// output gradient, padded by `k - 1 - pad`, with the flipped kernel (input and output
    /// channels swapped within each group).
    ///
    /// Taken only when its gemm has at least [`MIN_ROWS_BY_CONV`] rows (input channels per
    /// group): with fewer (AlexNet's conv2, 64), packing its wide im2col costs more than the gemm
    /// + col2im path.
    pub(super) fn input_grad_geometry(&self) -> Option<Geometry> {
        let square = self.kh == self.kw && self.pad < self.kh;
        let rows = self.cin_g() >= MIN_ROWS_BY_CONV;
        (self.stride == 1 && square && rows).then(|| Geometry {
            n: self.n,
            cin: self.cout,
            h: self.oh,
            w: self.ow,
            cout: self.cin,
            groups: self.groups,
            kh: self.kh,
            kw: self.kw,
            stride: 1,
            pad: self.kh - 1 - self.pad,
            oh: self.h,
            ow: self.w,
        })
    }

    /// The input gradient as the forward convolution `t` ([`Self::input_grad_geometry`]) of the
    /// (ReLU-masked) output gradient: its im2col + gemm runs at the forward pass's speed, where
    /// the gemm + col2im path ran at about 0.7x of it (conv3-5 of AlexNet at batch 32).
    pub(super) fn input_grad_by_conv(
        &self,
        t: &Geometry,
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        relu: bool,
    ) -> Vec<f32> {
        let (cin_g, cout_g, kk) = (self.cin_g(), self.cout_g(), self.kh * self.kw);
        // flipped[g, ci, co] = w[g, co, ci] with the taps reversed: reversing a row-major
        // kh x kw block flips both of its axes.
        let mut flipped = vec![0f32; w.len()];
        for g in 0..self.groups {
            for co in 0..cout_g {
                for ci in 0..cin_g {
                    let src = &w[((g * cout_g + co) * cin_g + ci) * kk..][..kk];
                    let dst = &mut flipped[((g * cin_g + ci) * cout_g + co) * kk..][..kk];
                    dst.iter_mut()
                        .zip(src.iter().rev())
                        .for_each(|(d, &s)| *d = s);
                }
            }
        }
        t.forward(&relu_grad(relu, grad, res), &flipped, None, false)
    }

    /// Adds image `img`'s contributions to `grads`. `col` is the scratch of an im2col tile;
    /// `masked` holds the ReLU-masked output gradient of the image (empty without ReLU).
    #[allow(clippy::too_many_arguments)]
    fn backward_image(
        &self,
        x: &[f32],
        wt: &[f32],
        res: &[f32],
        grad: &[f32],
        img: usize,
        relu: bool,
        grads: Grads<'_>,
        col: &mut [f32],
        masked: &mut [f32],
        threads: usize,
    ) {
        let (k, p, cout_g) = (self.k(), self.p(), self.cout_g());
        let out = img * self.out_image()..(img + 1) * self.out_image();
        let g: &[f32] = if relu {
            relu_grad_into(masked, &grad[out.clone()], &res[out]);
            masked
        } else {
            &grad[out]
        };
        for (db, row) in grads.db.iter_mut().zip(g.chunks_exact(p)) {
            *db += row.iter().map(|&v| v as f64).sum::<f64>();
        }
        let x_group = self.cin_g() * self.h * self.w;
        let x = &x[img * self.in_image()..(img + 1) * self.in_image()];
        let mut dx = grads.dx;
        // Already zero, but written before col2im reads it: a fresh allocation then faults each
        // page in once rather than twice (a read maps the zero page, the write copies it).
        if let Some(dx) = dx.as_deref_mut() {
            dx.fill(0.0);
        }
        let kk = self.kh * self.kw;
        for grp in 0..self.groups {
            let g = &g[grp * cout_g * p..(grp + 1) * cout_g * p];
            let x = &x[grp * x_group..(grp + 1) * x_group];
            for oys in self.blocks() {
                let cols = oys.start * self.ow..oys.end * self.ow;
                let (g, bp) = (&g[cols.start..], cols.len());
                for chans in self.tiles() {
                    let (k0, rows) = (chans.start * kk, chans.len() * kk);
                    if !grads.dw.is_empty() {
                        self.im2col(x, chans.clone(), &oys, col, threads > 1);
                        // dw[cout_g, k0..k0 + rows] (+)= g[cout_g, cols] * col^T[cols, rows]
                        let dw = &mut grads.dw[grp * cout_g * k + k0..(grp + 1) * cout_g * k];
                        let acc = !grads.first || oys.start > 0;
                        matmul(
                            (dw, k),
                            acc,
                            (cout_g, rows, bp),
                            (g, p, 1),
                            (&col[..], 1, bp),
                            (threads, Split::Cols),
                        );
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        // col[rows, cols] = w^T[k0..k0 + rows, cout_g] * g[cout_g, cols], then
                        // back onto the input planes.
                        let wt = &wt[grp * k * cout_g + k0 * cout_g..(grp + 1) * k * cout_g];
                        matmul(
                            (col, bp),
                            false,
                            (rows, bp, cout_g),
                            (wt, cout_g, 1),
                            (g, p, 1),
                            (threads, Split::Cols),
                        );
                        let dx = &mut dx[grp * x_group..(grp + 1) * x_group];
                        self.col2im(col, chans, &oys, dx, threads > 1);
                    }
                }
            }
        }
    }
}

/// Where one image's gradients go.
struct Grads<'a> {
    /// `cout x k` weight gradient, empty when not wanted.
    dw: &'a mut [f32],
    /// Whether `dw` is yet to be written: the image's gemm overwrites it rather than adding to
    /// it (which, on a fresh allocation, also spares the page faults of reading it first).
    first: bool,
    /// Per-channel bias gradient, empty when not wanted.
    db: &'a mut [f64],
    /// The image's input gradient, when wanted.
    dx: Option<&'a mut [f32]>,
}

/// Fewest input channels per group for which [`Geometry::input_grad_geometry`] computes an
/// input gradient as a convolution.
const MIN_ROWS_BY_CONV: usize = 128;
