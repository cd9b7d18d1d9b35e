//! A small seeded random number generator (xoshiro256**, seeded through
//! splitmix64) and the distributions the models draw from. Written out
//! here so that results never change with a dependency's version.

/// xoshiro256**: fast, 256 bits of state, good statistical quality.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    s: [u64; 4],
}

/// One splitmix64 step: a well-mixed 64-bit value from `x`.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Rng {
    /// A generator for `seed` and stream `stream` (different streams of one
    /// seed are independent).
    pub(crate) fn new(seed: u64, stream: u64) -> Rng {
        let mut x = mix(seed ^ mix(stream.wrapping_add(0x632b_e59b_d9b4_e019)));
        let mut s = [0; 4];
        for v in &mut s {
            x = mix(x);
            *v = x;
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Rng { s }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub(crate) fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub(crate) fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range_u32(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the bias is below 2^-64 · n, negligible here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Whether an event of probability `p` happens.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.f64() < p
    }

    /// Exponential with the given mean.
    pub(crate) fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u = 1.0 - self.f64();
        let v = self.f64();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Log-normal with the given median and log-space standard deviation.
    pub(crate) fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Pareto (type I) with minimum `min` and tail index `alpha`.
    pub(crate) fn pareto(&mut self, min: f64, alpha: f64) -> f64 {
        min / (1.0 - self.f64()).powf(1.0 / alpha)
    }

    /// An index drawn with probability proportional to `weights`.
    pub(crate) fn weighted(&mut self, weights: impl Iterator<Item = f64> + Clone) -> usize {
        let total: f64 = weights.clone().sum();
        let mut x = self.f64() * total;
        let mut last = 0;
        for (i, w) in weights.enumerate() {
            last = i;
            if x < w {
                return i;
            }
            x -= w;
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, 1).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = Rng::new(7, 1);
        let mut y = Rng::new(7, 2);
        assert_ne!(x.next_u64(), y.next_u64());
    }

    #[test]
    fn distributions_have_their_means() {
        let mut r = Rng::new(1, 0);
        let n = 200_000;
        let mean = |f: &mut dyn FnMut() -> f64| (0..n).map(|_| f()).sum::<f64>() / n as f64;
        assert!((mean(&mut || r.f64()) - 0.5).abs() < 0.01);
        let mut r = Rng::new(2, 0);
        assert!((mean(&mut || r.exp(3.0)) - 3.0).abs() < 0.05);
        let mut r = Rng::new(3, 0);
        assert!(mean(&mut || r.normal()).abs() < 0.01);
        // Pareto(1, 3) has mean 1.5.
        let mut r = Rng::new(4, 0);
        assert!((mean(&mut || r.pareto(1.0, 3.0)) - 1.5).abs() < 0.05);
        let mut r = Rng::new(5, 0);
        let hits = (0..n)
            .filter(|_| r.weighted([1.0, 3.0].into_iter()) == 1)
            .count();
        assert!((hits as f64 / n as f64 - 0.75).abs() < 0.01);
        let mut r = Rng::new(6, 0);
        assert!((0..1000).all(|_| (2..=5).contains(&r.range_u32(2, 5))));
    }
}
