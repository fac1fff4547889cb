//! im2col (the input pixels each output pixel sees, one row per kernel tap) and col2im (its
//! adjoint, for the input gradient), tile by tile.

use std::ops::Range;

use rayon::prelude::*;

use super::{for_tasks, Geometry};

impl Geometry {
    /// Fills row `(ki, kj)` of one input channel's block of an im2col buffer, for the output
    /// rows `oys` (`oys.len() * ow` columns): the input pixel each output pixel sees through
    /// that kernel tap, zero in the padding.
    pub(super) fn im2col_row(
        &self,
        plane: &[f32],
        ki: usize,
        kj: usize,
        oys: &Range<usize>,
        row: &mut [f32],
    ) {
        let (s, ow) = (self.stride, self.ow);
        let (y0, y1) = self.valid_rows(ki, oys);
        let (x0, x1) = self.valid(kj, self.w, self.ow);
        // Output row `oy` is `row[(oy - base) * ow..]`.
        let base = oys.start;
        row[..(y0 - base) * ow].fill(0.0);
        row[(y1 - base) * ow..].fill(0.0);
        if x0 == x1 || y0 == y1 {
            row[(y0 - base) * ow..(y1 - base) * ow].fill(0.0);
            return;
        }
        if s == 1 && ow == self.w {
            // "Same" padding: output rows y0..y1 are one run of input rows shifted by
            // `kj - pad`, so copy the run at once, then zero the columns that wrapped around.
            let shift = (ki * self.w + kj) as isize - (self.pad * self.w + self.pad) as isize;
            let (start, end) = ((y0 * ow) as isize + shift, (y1 * ow) as isize + shift);
            let (lo, hi) = (
                start.max(0) as usize,
                end.min(plane.len() as isize) as usize,
            );
            let dst_lo = (lo as isize - shift) as usize - base * ow;
            row[dst_lo..dst_lo + (hi - lo)].copy_from_slice(&plane[lo..hi]);
            for oy in y0..y1 {
                let dst = &mut row[(oy - base) * ow..(oy - base + 1) * ow];
                dst[..x0].fill(0.0);
                dst[x1..].fill(0.0);
            }
            return;
        }
        for oy in y0..y1 {
            let dst = &mut row[(oy - base) * ow..(oy - base + 1) * ow];
            dst[..x0].fill(0.0);
            dst[x1..].fill(0.0);
            let iy = oy * s + ki - self.pad;
            let first = iy * self.w + x0 * s + kj - self.pad;
            let src = &plane[first..first + (x1 - x0 - 1) * s + 1];
            if s == 1 {
                dst[x0..x1].copy_from_slice(src);
            } else {
                for (d, c) in dst[x0..x1].iter_mut().zip(src.chunks(s)) {
                    *d = c[0];
                }
            }
        }
    }

    /// Adds row `(ki, kj)` of an im2col-shaped gradient of output rows `oys` back onto the
    /// input pixels it came from.
    pub(super) fn col2im_row(
        &self,
        row: &[f32],
        ki: usize,
        kj: usize,
        oys: &Range<usize>,
        plane: &mut [f32],
    ) {
        let (s, ow) = (self.stride, self.ow);
        let (y0, y1) = self.valid_rows(ki, oys);
        let (x0, x1) = self.valid(kj, self.w, self.ow);
        if x0 == x1 {
            return;
        }
        for oy in y0..y1 {
            let at = (oy - oys.start) * ow;
            let src = &row[at + x0..at + x1];
            let iy = oy * s + ki - self.pad;
            let dst = &mut plane[iy * self.w + x0 * s + kj - self.pad..(iy + 1) * self.w];
            for (d, &v) in dst.iter_mut().step_by(s).zip(src) {
                *d += v;
            }
        }
    }

    /// im2col of input channels `chans` of one group of one image (`x`: the group's planes)
    /// for the output rows `oys`, into the first `chans.len() * kh * kw` rows (of
    /// `oys.len() * ow` columns) of `col`; in parallel when `parallel`, one task per (channel,
    /// kernel row), or per channel when strided.
    pub(super) fn im2col(
        &self,
        x: &[f32],
        chans: Range<usize>,
        oys: &Range<usize>,
        col: &mut [f32],
        parallel: bool,
    ) {
        let (p, hw, kh) = (oys.len() * self.ow, self.h * self.w, self.kh);
        let col = &mut col[..chans.len() * kh * self.kw * p];
        let plane = |c: usize| &x[(chans.start + c) * hw..(chans.start + c + 1) * hw];
        if self.stride == 1 {
            for_tasks(col, self.kw * p, parallel, |t, rows| {
                for (kj, row) in rows.chunks_exact_mut(p).enumerate() {
                    self.im2col_row(plane(t / kh), t % kh, kj, oys, row);
                }
            });
        } else {
            for_tasks(col, kh * self.kw * p, parallel, |c, rows| {
                self.im2col_strided(plane(c), oys, rows)
            });
        }
    }

    /// The `kh * kw` rows of one input channel's block of an im2col buffer, for strides above
    /// one. A strided gather is slow; instead each (zero-padded) input row is split once into
    /// its `stride` phases, `phases[j % s][j / s] = row[j]`: the output row `oy` of tap
    /// `(ki, kj)`, where `oy * s + ki` is that input row, is the contiguous run of phase `kj % s`
    /// from `kj / s`.
    pub(super) fn im2col_strided(&self, plane: &[f32], oys: &Range<usize>, rows: &mut [f32]) {
        if oys.is_empty() {
            return;
        }
        let (s, p, ow, kw) = (self.stride, oys.len() * self.ow, self.ow, self.kw);
        let phase_len = (self.w + 2 * self.pad).div_ceil(s);
        // The padding stays zero: only the input's columns are written below.
        let mut phases = vec![0f32; s * phase_len];
        // The (padded) input rows that output rows `oys` read.
        let last = (oys.end.max(1) - 1) * s + self.kh;
        for iy in oys.start * s..last.min(self.h + 2 * self.pad) {
            let inside = (self.pad..self.pad + self.h).contains(&iy);
            if inside {
                let y = iy - self.pad;
                let src = &plane[y * self.w..(y + 1) * self.w];
                for (ph, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
                    // Phase `ph` starts at input column `skip` (padded column `pad + skip`).
                    let skip = (ph + s - self.pad % s) % s;
                    if skip < self.w {
                        let dst = &mut phase[(self.pad + skip) / s..];
                        for (d, &v) in dst.iter_mut().zip(src[skip..].iter().step_by(s)) {
                            *d = v;
                        }
                    }
                }
            }
            // Every (oy, ki) with oy in `oys` and oy * s + ki == iy.
            let first_oy = (iy + 1).saturating_sub(self.kh).div_ceil(s).max(oys.start);
            for oy in first_oy..=(iy / s).min(oys.end - 1) {
                let ki = iy - oy * s;
                let out = (oy - oys.start) * ow..(oy - oys.start + 1) * ow;
                let taps = rows[ki * kw * p..(ki + 1) * kw * p].chunks_exact_mut(p);
                for (kj, row) in taps.enumerate() {
                    if inside {
                        let start = (kj % s) * phase_len + kj / s;
                        row[out.clone()].copy_from_slice(&phases[start..start + ow]);
                    } else {
                        row[out.clone()].fill(0.0);
                    }
                }
            }
        }
    }

    /// col2im of input channels `chans` of one group of one image, output rows `oys`: adds the
    /// first `chans.len() * kh * kw` rows of `col` onto the group's planes `dx`; one plane per
    /// task when `parallel` (a plane's rows are all its own).
    pub(super) fn col2im(
        &self,
        col: &[f32],
        chans: Range<usize>,
        oys: &Range<usize>,
        dx: &mut [f32],
        parallel: bool,
    ) {
        let (p, hw, kk) = (oys.len() * self.ow, self.h * self.w, self.kh * self.kw);
        let planes = &mut dx[chans.start * hw..chans.end * hw];
        let col = &col[..chans.len() * kk * p];
        let add = |(plane, rows): (&mut [f32], &[f32])| {
            for (t, row) in rows.chunks_exact(p).enumerate() {
                self.col2im_row(row, t / self.kw, t % self.kw, oys, plane);
            }
        };
        if parallel {
            planes
                .par_chunks_mut(hw)
                .zip(col.par_chunks(kk * p))
                .for_each(add);
        } else {
            planes.chunks_mut(hw).zip(col.chunks(kk * p)).for_each(add);
        }
    }
}
