//! The forward pass: Winograd where it applies, else per image and group, im2col and gemm tile
//! by tile, with the bias and ReLU applied while each block is in cache.

use rayon::prelude::*;

use super::{for_tasks, winograd, with_scratch, Geometry};
use crate::layers::cpu::{matmul, Split};

impl Geometry {
    pub(super) fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, relu: bool) -> Vec<f32> {
        if winograd::applies(self) {
            return winograd::forward(self, x, w, b, relu);
        }
        self.forward_im2col(x, w, b, relu)
    }

    /// [`Self::forward`] by im2col and gemm.
    pub(super) fn forward_im2col(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        relu: bool,
    ) -> Vec<f32> {
        let out_image = self.out_image();
        let mut out = vec![0f32; self.n * out_image];
        let (per, threads) = self.split();
        let run = |first: usize, out: &mut [f32]| {
            for (i, out) in out.chunks_exact_mut(out_image).enumerate() {
                let img = first + i;
                let x = &x[img * self.in_image()..(img + 1) * self.in_image()];
                self.forward_image(x, w, b, relu, out, threads);
            }
        };
        if per >= self.n {
            run(0, &mut out);
        } else {
            out.par_chunks_mut(per * out_image)
                .enumerate()
                .for_each(|(t, out)| run(t * per, out));
        }
        out
    }

    /// One image on `threads` threads, group by group; with several threads and groups, the
    /// groups side by side, each on its share of the threads (two-tower conv2, 4 and 5 at
    /// batch 1 on two threads: 1.1-1.3x against splitting each gemm over both).
    pub(super) fn forward_image(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
        threads: usize,
    ) {
        let group_out = self.cout_g() * self.p();
        let group = |(g, out): (usize, &mut [f32]), threads: usize| {
            with_scratch(self.tile_len(), |col| {
                self.forward_group(x, w, b, relu, g, out, col, threads)
            })
        };
        if threads > 1 && self.groups > 1 {
            let threads = (threads / self.groups).max(1);
            out.par_chunks_mut(group_out)
                .enumerate()
                .for_each(|g| group(g, threads));
        } else {
            out.chunks_mut(group_out)
                .enumerate()
                .for_each(|g| group(g, threads));
        }
    }

    /// Group `g` of one image `x` into `out`: block by block, im2col and gemm tile by tile,
    /// then bias and ReLU while the block is in cache.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_group(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        relu: bool,
        g: usize,
        out: &mut [f32],
        col: &mut [f32],
        threads: usize,
    ) {
        let (k, p, cout_g) = (self.k(), self.p(), self.cout_g());
        let x_group = self.cin_g() * self.h * self.w;
        let kk = self.kh * self.kw;
        let x = &x[g * x_group..(g + 1) * x_group];
        let w = &w[g * cout_g * k..(g + 1) * cout_g * k];
        for oys in self.blocks() {
            let cols = oys.start * self.ow..oys.end * self.ow;
            for chans in self.tiles() {
                let (k0, krows) = (chans.start * kk, chans.len() * kk);
                let first = chans.start == 0;
                self.im2col(x, chans, &oys, col, threads > 1);
                // out[cout_g, cols] (+)= w[cout_g, k0..k0 + krows] * col[krows, cols]
                let (lhs, rhs) = ((&w[k0..], k, 1), (&col[..], cols.len(), 1));
                matmul(
                    (&mut out[cols.start..], p),
                    !first,
                    (cout_g, cols.len(), krows),
                    lhs,
                    rhs,
                    (threads, Split::Cols),
                );
            }
            for_tasks(out, p, threads > 1, |c, row| {
                let row = &mut row[cols.clone()];
                let bias = b.map_or(0.0, |b| b[g * cout_g + c]);
                if relu {
                    row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0));
                } else if bias != 0.0 {
                    row.iter_mut().for_each(|v| *v += bias);
                }
            });
        }
    }
}
