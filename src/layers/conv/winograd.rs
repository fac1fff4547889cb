//! Winograd's minimal filtering F(2x2, 3x3) for the 3x3 stride-1 convolutions on AVX2 CPUs
//! (AlexNet's conv3-5 and, through [`Geometry::input_grad_by_conv`], their input gradients).
//!
//! Why: a 2x2 block of outputs of a 3x3 kernel takes 36 multiply-adds per input channel
//! directly and 16 in the transformed domain (Lavin & Gray, 2016). With `d` a 4x4 input tile,
//! `g` a 3x3 kernel and `Y` its 2x2 outputs, `Y = A^T [(G g G^T) ⊙ (B^T d B)] A`, where
//! `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]` and
//! `A^T = [1 1 1 0; 0 1 -1 -1]`. Each of the 16 positions `ξ` of a transformed tile is a product
//! over the input channels, `M_ξ[cout, tiles] = U_ξ[cout, cin] V_ξ[cin, tiles]`. The
//! coefficients are 0, ±1 and ±½, exact in binary, so the rounding is that of a few more
//! additions. AlexNet's 13x13 maps are 7x7 tiles (a 14x14 grid, 14% of it beyond the edge): ~1.9x
//! fewer multiply-adds than im2col + gemm.
//!
//! Two earlier versions fed the 16 products to the `gemm` crate and lost what they saved
//! (`benches/NOTES.md`): the crate packs (copies) both operands on every call, and the
//! transformed blocks went to and from memory between the transforms and the gemms. Here the
//! transforms write and read the micro-kernel's own layouts, in blocks of [`BLOCK_TILES`] tiles
//! (one `ξ`'s panels stay in L2, a block's in L3):
//! - `U` (the kernels, once per call): per group and panel of [`KR`] output channels, per `ξ`,
//!   `[cin][KR]`;
//! - `V` (a block's input tiles): per `ξ` and panel of [`TR`] tiles, `[cin][TR]`;
//! - `M` (the products): per `ξ`, one row of output channels per tile, which the output
//!   transform reads 8 channels at a time, adding the bias and applying the ReLU on the way.
//!
//! The batch's tiles are cut into one run per thread, each run into blocks. Against im2col +
//! gemm in the same process at batch 32: conv3 1.7-1.9x, conv4 1.2-1.7x, conv5 1.65-1.75x; the
//! micro-kernel takes ~73% of the time at ~67 GFLOP/s per thread, the transforms ~20%.

use std::cell::Cell;
use std::ops::Range;

use rayon::prelude::*;

use super::{with_scratch, Geometry};
use crate::layers::cpu::narrow;
use crate::layers::cpu::{self, DstPtr};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Output channels per register tile and per packed panel of `U` (two 8-lane vectors).
const KR: usize = 16;
/// Tiles per register tile and per packed panel of `V` (broadcast one at a time).
const TR: usize = 6;
/// Tiles per block: `V` and `M` of a block (16 x channels x tiles floats each) stay within L2
/// and L3 while `U` streams past once per block.
const BLOCK_TILES: usize = 48;
/// Fewest input channels per group worth the transforms (16 extra passes over each tile).
const MIN_CIN: usize = 32;
/// Fewest output channels per group: fewer would leave most of a [`KR`]-wide panel empty.
const MIN_COUT: usize = 16;

/// Whether a convolution goes through Winograd's F(2x2, 3x3): a 3x3 kernel at stride 1, enough
/// channels per group, an output of at least 4x4 (smaller ones are mostly padding), at least a
/// block of tiles per thread (fewer do not pay for the kernels' transform: AlexNet's conv3-5 at
/// batch 1 on two threads, 25 tiles each, ran at 0.87-1.1x), and a CPU with AVX2 and FMA for
/// the micro-kernel.
pub(super) fn applies(g: &Geometry) -> bool {
    let (th, tw) = tile_grid(g);
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.cin_g() >= MIN_CIN
        && g.cout_g() >= MIN_COUT
        && g.oh >= 4
        && g.ow >= 4
        && g.n * th * tw >= cpu::threads() * BLOCK_TILES
        && narrow::available()
}

/// Tile rows and columns of an output map: 2x2 outputs per tile, the last ones cut at the edge.
fn tile_grid(g: &Geometry) -> (usize, usize) {
    (g.oh.div_ceil(2), g.ow.div_ceil(2))
}

/// Panels of [`KR`] output channels per group.
fn cout_panels(g: &Geometry) -> usize {
    g.cout_g().div_ceil(KR)
}

/// The transformed kernels `U = G g G^T`, laid out `[group][panel][ξ][cin_g][KR]` (output
/// channels past the group's last are zero), one task per panel. Each input channel's 16
/// rows of `KR` are computed together, vectorised over the panel's output channels, and
/// written whole.
fn transform_weights(g: &Geometry, w: &[f32], u: &mut [f32]) {
    let (cin_g, cout_g, panels) = (g.cin_g(), g.cout_g(), cout_panels(g));
    let panel_len = cin_g * KR;
    u.par_chunks_mut(16 * panel_len)
        .enumerate()
        .for_each(|(gp, u)| {
            let (grp, panel) = (gp / panels, gp % panels);
            let lanes = KR.min(cout_g - panel * KR);
            let first = grp * cout_g + panel * KR;
            for ci in 0..cin_g {
                // k[tap][lane]: the panel's kernels of input channel `ci`, zero past `lanes`.
                let mut k = [[0f32; KR]; 9];
                for lane in 0..lanes {
                    let src = &w[((first + lane) * cin_g + ci) * 9..][..9];
                    for (tap, &v) in src.iter().enumerate() {
                        k[tap][lane] = v;
                    }
                }
                let vals = transform_kernel(&k);
                for (xi, row) in vals.iter().enumerate() {
                    u[xi * panel_len + ci * KR..][..KR].copy_from_slice(row);
                }
            }
        });
}

/// Floats of the transformed kernels ([`transform_weights`]).
fn u_len(g: &Geometry) -> usize {
    g.groups * cout_panels(g) * 16 * g.cin_g() * KR
}

thread_local! {
    /// The calling thread's buffer of transformed kernels, kept between calls: a fresh one
    /// (6 MB for AlexNet's conv4) cost more to zero or fault in than the transform itself.
    static U: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `G g G^T` of `KR` kernels at once (`k[tap][lane]`, taps row-major): the 16 rows `ξ = 4 r + s`.
/// Written lane-wise over whole rows, so that it compiles to vector operations.
#[inline(always)]
fn transform_kernel(k: &[[f32; KR]; 9]) -> [[f32; KR]; 16] {
    // G's rows applied to three rows (or columns) a, b, c of KR lanes.
    fn g_rows(a: &[f32; KR], b: &[f32; KR], c: &[f32; KR]) -> [[f32; KR]; 4] {
        let mut out = [*a, [0.0; KR], [0.0; KR], *c];
        for l in 0..KR {
            out[1][l] = 0.5 * (a[l] + b[l] + c[l]);
            out[2][l] = 0.5 * (a[l] - b[l] + c[l]);
        }
        out
    }
    // t = G g, column by column: t[j][r] is row r, column j.
    let t: [[[f32; KR]; 4]; 3] = std::array::from_fn(|j| g_rows(&k[j], &k[3 + j], &k[6 + j]));
    // U = t G^T, row by row.
    let mut u = [[0f32; KR]; 16];
    for r in 0..4 {
        let row = g_rows(&t[0][r], &t[1][r], &t[2][r]);
        u[r * 4..r * 4 + 4].copy_from_slice(&row);
    }
    u
}

/// `relu(conv(x, w) + b)` of the whole batch (the ReLU when `relu`), as [`Geometry::forward`]
/// computes it by im2col; `x` and `w` as there.
pub(super) fn forward(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    // Taken out while in use (a nested call would get a fresh one). Every element is written
    // before it is read: panels past the last output channel get zeros.
    let mut u = U.with(Cell::take);
    u.resize(u_len(g).max(u.len()), 0.0);
    transform_weights(g, w, &mut u[..u_len(g)]);
    let mut out = vec![0f32; g.n * g.out_image()];
    let (th, tw) = tile_grid(g);
    let total = g.n * th * tw;
    // One run of tiles per thread, each cut into even blocks of at most BLOCK_TILES.
    let runs = cpu::threads().min(total.div_ceil(TR)).max(1);
    let per_run = total.div_ceil(runs);
    let blocks_per_run = per_run.div_ceil(BLOCK_TILES);
    let block = per_run.div_ceil(blocks_per_run).next_multiple_of(TR);
    // Per thread: `V`, `M`, then the padded images.
    let scratch = v_len(g, block) + m_len(g, block) + padded_len(g, block);
    let out_len = out.len();
    let dst = DstPtr::new(&mut out);
    (0..runs).into_par_iter().for_each(|r| {
        let run = r * per_run..((r + 1) * per_run).min(total);
        with_scratch(scratch, |buf| {
            let mut ready = None;
            for start in run.clone().step_by(block) {
                let tiles = start..(start + block).min(run.end);
                let (v, rest) = buf.split_at_mut(v_len(g, block));
                let (m, padded) = rest.split_at_mut(m_len(g, block));
                transform_input(g, x, tiles.clone(), v, padded, &mut ready);
                multiply(g, &u[..u_len(g)], v, m, tiles.len().div_ceil(TR));
                // SAFETY: runs and their blocks are disjoint ranges of tiles, and each output
                // element belongs to exactly one tile, so no two calls write the same element;
                // `out` outlives the parallel loop and nothing else reads it meanwhile.
                unsafe { transform_output(g, m, tiles, b, relu, (dst, out_len)) };
            }
        })
    });
    U.with(|cell| cell.set(u));
    out
}

/// Floats of `V` for blocks of `block` tiles: `[ξ][panel][cin][TR]`.
fn v_len(g: &Geometry, block: usize) -> usize {
    16 * v_stride(g, block.div_ceil(TR))
}

/// Floats of `M` for blocks of `block` tiles: `[ξ][tile][ldm]`.
fn m_len(g: &Geometry, block: usize) -> usize {
    16 * m_stride(g, block.div_ceil(TR))
}

/// Floats between the 16 matrices of `V` or `M` past their length: the transforms access all
/// 16 at once, and at AlexNet's sizes their lengths are multiples of 4 KiB, which would put
/// the 16 streams in the same L1 sets (input transform at conv4, b32, both threads' time: 40 ->
/// 31 ms).
const SKEW: usize = 32;

/// Floats from one `ξ` to the next in `V`, for a block of `panels` panels of tiles.
fn v_stride(g: &Geometry, panels: usize) -> usize {
    panels * g.cin * TR + SKEW
}

/// Floats from one `ξ` to the next in `M`, for a block of `panels` panels of tiles.
fn m_stride(g: &Geometry, panels: usize) -> usize {
    panels * TR * ldm(g) + SKEW
}

/// Row length of `M`: every group's panels of output channels.
fn ldm(g: &Geometry) -> usize {
    g.groups * cout_panels(g) * KR
}

/// `V[ξ][panel][c][lane] = (B^T d B)_ξ` of the input tiles `tiles` (numbered image, tile row,
/// tile column over the batch; block-local tile `i` is panel `i / TR`, lane `i % TR`): `d` is
/// the 4x4 input window of a tile, from input row `2 ty - pad` and column `2 tx - pad`, zero
/// outside the image; lanes past the last tile are zero. `padded` holds slots of zero-padded
/// images ([`padded_len`]), `ready` the last image padded into them by the previous block of
/// the same run (`None` at the start of a run).
fn transform_input(
    g: &Geometry,
    x: &[f32],
    tiles: Range<usize>,
    v: &mut [f32],
    padded: &mut [f32],
    ready: &mut Option<usize>,
) {
    let (th, tw) = tile_grid(g);
    let per_image = th * tw;
    let panels = tiles.len().div_ceil(TR);
    let xi_len = v_stride(g, panels);
    let v = &mut v[..16 * xi_len];
    let (ph, pw) = (2 * th + 2, 2 * tw + 2);
    let (plane_len, image_len) = (ph * pw, g.cin * ph * pw);
    // The block's images, padded into slot `img % slots`; those the run's previous block
    // padded (its last image is usually this block's first) are there already.
    let (first, last) = (tiles.start / per_image, (tiles.end - 1) / per_image);
    let slots = padded.len() / image_len;
    assert!(last - first < slots, "winograd: padded slots");
    let from = ready.map_or(first, |r| first.max(r + 1));
    for img in from..=last {
        let slot = &mut padded[img % slots * image_len..][..image_len];
        pad_image(g, &x[img * g.in_image()..][..g.in_image()], slot);
    }
    *ready = Some(last);
    // Each tile's window in channel 0 of its padded image.
    let windows: Vec<usize> = tiles
        .clone()
        .map(|t| {
            let (ty, tx) = (t % per_image / tw, t % tw);
            t / per_image % slots * image_len + 2 * ty * pw + 2 * tx
        })
        .collect();
    let last_window = windows.iter().copied().max().unwrap_or(0);
    assert!(
        last_window + (g.cin - 1) * plane_len + 3 * pw + 4 <= padded.len(),
        "winograd: windows"
    );
    assert!(15 * xi_len + panels * g.cin * TR <= v.len(), "winograd: V");
    // Panel by panel, channel by channel: each of the 16 matrices gets the panel's rows of TR
    // values in order.
    for (p, windows) in windows.chunks(TR).enumerate() {
        for c in 0..g.cin {
            // SAFETY: the asserts above bound every window of every channel inside `padded`
            // and the panel's rows inside each of V's 16 matrices.
            unsafe {
                transform_panel(
                    padded.as_ptr().add(c * plane_len),
                    pw,
                    windows,
                    v.as_mut_ptr().add(p * g.cin * TR + c * TR),
                    xi_len,
                )
            };
        }
    }
}

/// `B^T d B` of up to [`TR`] windows at `windows[lane]` after `plane` (rows `pw` apart), value
/// `ξ` of lane `l` to `v[ξ * xi_len + l]`, lanes past the last window zero.
///
/// # Safety
/// Every window must be readable, and `v` must hold `TR` lanes in each of the 16 rows.
#[inline(always)]
unsafe fn transform_panel(
    plane: *const f32,
    pw: usize,
    windows: &[usize],
    v: *mut f32,
    xi_len: usize,
) {
    let mut vals = [[0f32; TR]; 16];
    for (lane, &at) in windows.iter().enumerate() {
        let d: [[f32; 4]; 4] =
            std::array::from_fn(|i| std::array::from_fn(|j| *plane.add(at + i * pw + j)));
        for (xi, val) in transform_tile(&d).into_iter().enumerate() {
            vals[xi][lane] = val;
        }
    }
    // Whole rows: the lanes of a partial panel past its last window get zeros.
    for (xi, row) in vals.iter().enumerate() {
        v.add(xi * xi_len).cast::<[f32; TR]>().write_unaligned(*row);
    }
}

/// Floats of the scratch [`transform_input`] pads a block's images into: one slot per image a
/// block of `block` tiles can touch (`block / tiles per image`, rounded up, + 1).
fn padded_len(g: &Geometry, block: usize) -> usize {
    let (th, tw) = tile_grid(g);
    (block.div_ceil(th * tw) + 1) * g.cin * (2 * th + 2) * (2 * tw + 2)
}

/// One image's planes `x` into `padded` (`cin` planes of `2 th + 2` rows of `2 tw + 2`), the
/// image at row and column `pad`, zero around it: every tile's window is then inside.
fn pad_image(g: &Geometry, x: &[f32], padded: &mut [f32]) {
    let (th, tw) = tile_grid(g);
    let (ph, pw) = (2 * th + 2, 2 * tw + 2);
    // The output grid reaches input row 2 th + 1 - pad >= h - 1 (oh = h + 2 pad - 2): the whole
    // image fits.
    debug_assert!(ph >= g.h + g.pad && pw >= g.w + g.pad);
    for (plane, src) in padded
        .chunks_exact_mut(ph * pw)
        .zip(x.chunks_exact(g.h * g.w))
    {
        plane[..g.pad * pw].fill(0.0);
        for (y, row) in src.chunks_exact(g.w).enumerate() {
            let dst = &mut plane[(g.pad + y) * pw..][..pw];
            dst[..g.pad].fill(0.0);
            dst[g.pad..g.pad + g.w].copy_from_slice(row);
            dst[g.pad + g.w..].fill(0.0);
        }
        plane[(g.pad + g.h) * pw..].fill(0.0);
    }
}

/// `B^T d B` of one 4x4 window, as the 16 values `ξ = 4 r + s`.
#[inline(always)]
fn transform_tile(d: &[[f32; 4]; 4]) -> [f32; 16] {
    // e = B^T d (down the columns), then e B (along the rows).
    let e: [[f32; 4]; 4] = std::array::from_fn(|j| {
        let col = [d[0][j], d[1][j], d[2][j], d[3][j]];
        [
            col[0] - col[2],
            col[1] + col[2],
            col[2] - col[1],
            col[1] - col[3],
        ]
    });
    // e[j][r] is row r, column j of B^T d.
    let mut out = [0f32; 16];
    for r in 0..4 {
        let (a, b, c, dd) = (e[0][r], e[1][r], e[2][r], e[3][r]);
        out[r * 4] = a - c;
        out[r * 4 + 1] = b + c;
        out[r * 4 + 2] = c - b;
        out[r * 4 + 3] = b - dd;
    }
    out
}

/// `M_ξ = U_ξ V_ξ` of a block of `panels` panels of tiles, per group, by the micro-kernel.
fn multiply(g: &Geometry, u: &[f32], v: &[f32], m: &mut [f32], panels: usize) {
    let (cin_g, cps, ldm) = (g.cin_g(), cout_panels(g), ldm(g));
    let (v_xi, m_xi) = (v_stride(g, panels), m_stride(g, panels));
    let u_panel = cin_g * KR;
    assert!(u.len() >= g.groups * cps * 16 * u_panel, "winograd: U");
    assert!(
        v.len() >= 16 * v_xi && m.len() >= 16 * m_xi,
        "winograd: block scratch"
    );
    for grp in 0..g.groups {
        for xi in 0..16 {
            for cp in 0..cps {
                let up = &u[((grp * cps + cp) * 16 + xi) * u_panel..][..u_panel];
                for tp in 0..panels {
                    let vp = &v[xi * v_xi + tp * g.cin * TR + grp * cin_g * TR..][..cin_g * TR];
                    let at = xi * m_xi + tp * TR * ldm + (grp * cps + cp) * KR;
                    let mp = &mut m[at..at + (TR - 1) * ldm + KR];
                    // SAFETY: `applies` checked AVX2 and FMA; the slices hold the `cin_g`
                    // steps of both panels and the kernel's `TR` rows of `KR` outputs.
                    unsafe { kernel(cin_g, up.as_ptr(), vp.as_ptr(), mp.as_mut_ptr(), ldm) };
                }
            }
        }
    }
}

/// The register tile: `m[j * ldm + i] = Σ_c u[c * KR + i] v[c * TR + j]` for `KR` output
/// channels `i` and `TR` tiles `j` over `kc` input channels.
///
/// # Safety
/// AVX2 and FMA must be available; `u` must hold `kc * KR` floats, `v` `kc * TR`, and `m` the
/// `TR` rows of `KR` floats `ldm` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(kc: usize, u: *const f32, v: *const f32, m: *mut f32, ldm: usize) {
    let mut acc = [[_mm256_setzero_ps(); 2]; TR];
    for c in 0..kc {
        let (u, v) = (u.add(c * KR), v.add(c * TR));
        // A hint, possibly past `u`'s end: `wrapping_add` forms the address without `add`'s
        // in-bounds requirement.
        _mm_prefetch::<_MM_HINT_T0>(u.wrapping_add(64 * KR) as *const i8);
        let (a0, a1) = (_mm256_loadu_ps(u), _mm256_loadu_ps(u.add(8)));
        for (j, acc) in acc.iter_mut().enumerate() {
            let b = _mm256_broadcast_ss(&*v.add(j));
            acc[0] = _mm256_fmadd_ps(a0, b, acc[0]);
            acc[1] = _mm256_fmadd_ps(a1, b, acc[1]);
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(m.add(j * ldm), acc[0]);
        _mm256_storeu_ps(m.add(j * ldm + 8), acc[1]);
    }
}

/// Never called: [`applies`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: *const f32, _: *const f32, _: *mut f32, _: usize) {
    unreachable!("winograd: the micro-kernel needs x86-64 with AVX2")
}

/// `Y = A^T M A` of the block's tiles `tiles` (`M[ξ][tile][ldm]`), plus the bias, through the
/// ReLU when `relu`, into the batch's output `out` (NCHW), cutting the last row and column of
/// tiles at the edge; 8 output channels at a time. `out` is the output's pointer and length.
///
/// # Safety
/// `out` must point to the whole output, and no other thread may access the outputs of these
/// tiles during the call.
unsafe fn transform_output(
    g: &Geometry,
    m: &[f32],
    tiles: Range<usize>,
    b: Option<&[f32]>,
    relu: bool,
    (out, out_len): (DstPtr, usize),
) {
    let (th, tw) = tile_grid(g);
    let per_image = th * tw;
    let (cout_g, cps, ldm) = (g.cout_g(), cout_panels(g), ldm(g));
    let m_xi = m_stride(g, tiles.len().div_ceil(TR));
    let (oh, ow) = (g.oh, g.ow);
    assert!(
        out_len == g.n * g.out_image() && tiles.end <= g.n * per_image,
        "winograd: out"
    );
    assert!(m.len() >= 16 * m_xi, "winograd: M");
    for (local, t) in tiles.enumerate() {
        let (img, ty, tx) = (t / per_image, t % per_image / tw, t % tw);
        let (oy, ox) = (2 * ty, 2 * tx);
        let (down, right) = (oy + 1 < oh, ox + 1 < ow);
        for grp in 0..g.groups {
            for c0 in (0..cout_g).step_by(8) {
                let at = local * ldm + grp * cps * KR + c0;
                let mv: [[f32; 8]; 16] =
                    std::array::from_fn(|xi| m[xi * m_xi + at..][..8].try_into().expect("8"));
                for (lane, y) in output_tile(&mv).iter().enumerate().take(cout_g - c0) {
                    let ch = grp * cout_g + c0 + lane;
                    let bias = b.map_or(0.0, |b| b[ch]);
                    let act = |v: f32| if relu { (v + bias).max(0.0) } else { v + bias };
                    let base = ((img * g.cout + ch) * oh + oy) * ow + ox;
                    // SAFETY: (oy, ox) and its right and lower neighbours (where inside the
                    // map) are outputs of this tile, in bounds by the assert above.
                    let o = out.get();
                    *o.add(base) = act(y[0]);
                    if right {
                        *o.add(base + 1) = act(y[1]);
                    }
                    if down {
                        *o.add(base + ow) = act(y[2]);
                        if right {
                            *o.add(base + ow + 1) = act(y[3]);
                        }
                    }
                }
            }
        }
    }
}

/// `A^T M A` of one tile for 8 channels: `M` as 16 rows (`ξ = 4 r + s`) of 8 lanes, the result
/// per lane as `[y00, y01, y10, y11]`.
#[inline(always)]
fn output_tile(m: &[[f32; 8]; 16]) -> [[f32; 4]; 8] {
    std::array::from_fn(|l| {
        // s = A^T M (two rows of four), then s A.
        let s0: [f32; 4] = std::array::from_fn(|j| m[j][l] + m[4 + j][l] + m[8 + j][l]);
        let s1: [f32; 4] = std::array::from_fn(|j| m[4 + j][l] - m[8 + j][l] - m[12 + j][l]);
        [
            s0[0] + s0[1] + s0[2],
            s0[1] - s0[2] - s0[3],
            s1[0] + s1[1] + s1[2],
            s1[1] - s1[2] - s1[3],
        ]
    })
}
