//! The crate's own seedable random numbers: candle's CPU generator cannot be seeded, so all
//! training randomness (shuffling, crops, flips, colour jitter, dropout masks) comes from here and
//! a run is reproducible from its seed.
//!
//! [`Rng`] is xoshiro256++ seeded through SplitMix64 (Vigna's recommended seeding).
//! [`Rng::stream`] derives an independent generator from a seed and a tuple of ids, so that work
//! split over threads draws the same numbers whatever thread does it, in whatever order.
//!
//! ```
//! use candle_zoo::rng::Rng;
//!
//! let mut a = Rng::stream(7, &[0, 12]); // e.g. (seed, [epoch, sample index])
//! let mut b = Rng::stream(7, &[0, 12]);
//! assert_eq!(a.next_u64(), b.next_u64());
//! let x = a.uniform();
//! assert!((0.0..1.0).contains(&x));
//! ```

use crate::error::{Error, Result};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++, seeded through SplitMix64. Small (32 bytes), fast, and serialisable, so that a
/// checkpoint can record where a stream stands. It serialises as its [`Rng::state`], four
/// integers; deserialising refuses the all-zero state as [`Rng::from_state`] does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "[u64; 4]", into = "[u64; 4]")]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose state is the first four outputs of SplitMix64 started at `seed` (the
    /// same as `rand_xoshiro`'s `Xoshiro256PlusPlus::seed_from_u64`).
    ///
    /// ```
    /// let mut rng = candle_zoo::rng::Rng::new(0);
    /// assert_eq!(rng.next_u64(), 0x53175d61490b23df);
    /// ```
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for w in &mut s {
            x = x.wrapping_add(GOLDEN);
            *w = mix64(x);
        }
        // SplitMix64 is a bijection of a counter, so four consecutive outputs are never all zero.
        Self { s }
    }

    /// An independent stream for `(seed, ids...)`, e.g. `(seed, [epoch, sample_index])`: the same
    /// ids give the same stream on any thread, in any order; different ids (or a different number
    /// of them) give unrelated streams.
    ///
    /// ```
    /// use candle_zoo::rng::Rng;
    /// assert_eq!(Rng::stream(1, &[2, 3]), Rng::stream(1, &[2, 3]));
    /// assert_ne!(Rng::stream(1, &[2, 3]), Rng::stream(1, &[3, 2]));
    /// ```
    pub fn stream(seed: u64, ids: &[u64]) -> Self {
        // Each id is folded in through the mixer, so the key depends on the ids' order and count;
        // the final key seeds SplitMix64, which spreads it over the whole state.
        let mut key = mix64(seed ^ 0x5EED_5EED_5EED_5EED);
        for &id in ids {
            key = mix64(key.wrapping_add(GOLDEN) ^ mix64(id.wrapping_add(GOLDEN)));
        }
        Self::new(key)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in `[0, 1)`, from the top 24 bits (every value is an exact `f32`).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `0..n`, without modulo bias (Lemire's multiply-and-reject). Panics if `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        let n = n as u64;
        let mut m = self.next_u64() as u128 * n as u128;
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = self.next_u64() as u128 * n as u128;
            }
        }
        (m >> 64) as usize
    }

    /// A standard normal deviate (Box-Muller, computed in `f64`; two draws per call, no cached
    /// spare, so the state stays four words).
    pub fn normal(&mut self) -> f32 {
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1 = ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Shuffles `items` in place (Fisher-Yates): every permutation is equally likely.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// `n` dropout multipliers: 0 with probability `p`, else `1 / (1 - p)` (inverted dropout, as
    /// PyTorch). `p <= 0` gives all ones, `p >= 1` all zeros.
    ///
    /// ```
    /// let mask = candle_zoo::rng::Rng::new(3).dropout_mask(1000, 0.5);
    /// assert!(mask.iter().all(|&m| m == 0.0 || m == 2.0));
    /// ```
    pub fn dropout_mask(&mut self, n: usize, p: f32) -> Vec<f32> {
        if p <= 0.0 {
            return vec![1.0; n];
        }
        if p >= 1.0 {
            return vec![0.0; n];
        }
        let keep = 1.0 / (1.0 - p);
        (0..n)
            .map(|_| if self.uniform() < p { 0.0 } else { keep })
            .collect()
    }

    /// The raw state, e.g. to save in a checkpoint.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// A generator at a saved [`Rng::state`]. The all-zero state (a fixed point of xoshiro) is
    /// refused.
    ///
    /// ```
    /// use candle_zoo::rng::Rng;
    /// let mut a = Rng::new(9);
    /// a.next_u64();
    /// let mut b = Rng::from_state(a.state())?;
    /// assert_eq!(a.next_u64(), b.next_u64());
    /// assert!(Rng::from_state([0; 4]).is_err());
    /// # Ok::<(), candle_zoo::Error>(())
    /// ```
    pub fn from_state(state: [u64; 4]) -> Result<Self> {
        if state == [0; 4] {
            return Err(Error::Invalid(
                "RNG state is all zeros, which xoshiro256++ cannot leave; the saved state is \
                 corrupt"
                    .into(),
            ));
        }
        Ok(Self { s: state })
    }
}

impl TryFrom<[u64; 4]> for Rng {
    type Error = Error;
    fn try_from(state: [u64; 4]) -> Result<Self> {
        Self::from_state(state)
    }
}

impl From<Rng> for [u64; 4] {
    fn from(rng: Rng) -> Self {
        rng.s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outputs_match_the_reference_algorithm() {
        // Computed with an independent Python transcription of Vigna's xoshiro256++ and
        // SplitMix64; the raw-state vector is rand_xoshiro's test vector.
        let mut r = Rng::new(0);
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [
                0x53175d61490b23df,
                0x61da6f3dc380d507,
                0x5c0fdf91ec9a7bfc,
                0x02eebf8c3bbe5e1a
            ]
        );
        let mut r = Rng::new(42);
        assert_eq!(r.next_u64(), 0xd0764d4f4476689f);
        let mut r = Rng::from_state([1, 2, 3, 4]).unwrap();
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [41943041, 58720359, 3588806011781223, 3591011842654386]
        );
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let first = |r: Rng| r.clone().next_u64();
        let base = first(Rng::stream(5, &[1, 2]));
        assert_eq!(base, first(Rng::stream(5, &[1, 2])));
        for other in [
            Rng::stream(6, &[1, 2]),
            Rng::stream(5, &[2, 1]),
            Rng::stream(5, &[1, 3]),
            Rng::stream(5, &[1]),
            Rng::stream(5, &[1, 2, 0]),
            Rng::stream(5, &[]),
            Rng::new(5),
        ] {
            assert_ne!(base, first(other));
        }
        // Neighbouring sample streams are uncorrelated: their uniforms' correlation is small.
        let n = 20_000;
        let (a, b): (Vec<f64>, Vec<f64>) = (0..n)
            .map(|i| {
                (
                    Rng::stream(1, &[0, i]).uniform() as f64 - 0.5,
                    Rng::stream(1, &[0, i + 1]).uniform() as f64 - 0.5,
                )
            })
            .unzip();
        let corr: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / n as f64 * 12.0;
        assert!(corr.abs() < 0.05, "correlation {corr}");
    }

    fn moments(xs: impl Iterator<Item = f64>) -> (f64, f64) {
        let v: Vec<f64> = xs.collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        (mean, var)
    }

    #[test]
    fn distributions_have_the_right_moments() {
        let n = 100_000;
        let mut r = Rng::new(1);
        let (m, v) = moments((0..n).map(|_| r.uniform() as f64));
        assert!(
            (m - 0.5).abs() < 0.005 && (v - 1.0 / 12.0).abs() < 0.002,
            "{m} {v}"
        );

        let mut counts = [0usize; 7];
        for _ in 0..n {
            counts[r.below(7)] += 1;
        }
        for c in counts {
            let expected = n as f64 / 7.0;
            assert!(
                (c as f64 - expected).abs() < 5.0 * expected.sqrt(),
                "{counts:?}"
            );
        }

        let (m, v) = moments((0..n).map(|_| r.normal() as f64));
        assert!(m.abs() < 0.015 && (v - 1.0).abs() < 0.02, "{m} {v}");

        let mask = r.dropout_mask(n, 0.3);
        let zeros = mask.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
        assert!((zeros - 0.3).abs() < 0.01, "{zeros}");
        let (m, _) = moments(mask.iter().map(|&x| x as f64));
        assert!(
            (m - 1.0).abs() < 0.02,
            "inverted dropout keeps the mean: {m}"
        );
        assert!(mask.iter().all(|&x| x == 0.0 || x == 1.0 / 0.7));
        assert_eq!(r.dropout_mask(3, 0.0), [1.0; 3]);
        assert_eq!(r.dropout_mask(3, 1.0), [0.0; 3]);
    }

    #[test]
    fn below_handles_edges() {
        let mut r = Rng::new(2);
        assert!((0..100).all(|_| r.below(1) == 0));
        let big = usize::MAX / 3 * 2;
        assert!((0..100).all(|_| r.below(big) < big));
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut r = Rng::new(3);
        let mut v: Vec<usize> = (0..1000).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        r.shuffle(&mut [0u8; 0]);
        // Every element lands in the first slot about equally often.
        let mut first = [0usize; 4];
        for _ in 0..40_000 {
            let mut v = [0, 1, 2, 3];
            r.shuffle(&mut v);
            first[v[0]] += 1;
        }
        assert!(
            first.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{first:?}"
        );
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let mut a = Rng::new(11);
        a.normal();
        let mut b = Rng::from_state(a.state())?;
        assert_eq!(a, b);
        assert_eq!(a.next_u64(), b.next_u64());
        let json = serde_json::to_string(&a).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut c: Rng = serde_json::from_str(&json).map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(a.next_u64(), c.next_u64());
        assert!(matches!(Rng::from_state([0; 4]), Err(Error::Invalid(_))));
        assert!(serde_json::from_str::<Rng>("[0,0,0,0]").is_err());
        Ok(())
    }
}
