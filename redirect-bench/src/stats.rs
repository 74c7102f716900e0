//! Verdicts from statistics: confidence intervals for the report's ratios and differences,
//! by a paired bootstrap over the interleaved rounds.
//!
//! Every round of the benchmark measures each configuration once, one after the other, so
//! the two figures of one round share the machine's state at that time (other work, cache and
//! frequency drift). A comparison of configuration A with B is therefore made of pairs
//! `(a_r, b_r)`, one per round r, and resampled as pairs: a bootstrap replicate draws n rounds
//! with replacement and computes the statistic (ratio or difference of the medians of A and B)
//! over those rounds. The interval is the percentile interval of the replicates.
//!
//! The random numbers come from ChaCha8 with a fixed seed (value-stable across platforms and
//! versions of `rand_chacha`), so a report rewritten from the same results JSON prints the same
//! intervals.
//!
//! A verdict follows from the interval alone: entirely on one side of "no difference" (1 for a
//! ratio, 0 for a difference) is a difference; containing it is "within noise". An interval
//! that contains it but is wider than [`NOISE_MARGIN`] on either side cannot tell a small
//! difference from none: the benchmark measures more rounds of such comparisons while its
//! time budget lasts ([`Interval::decided`]).

use rand_chacha::{
    rand_core::{RngCore as _, SeedableRng as _},
    ChaCha8Rng,
};

/// Bootstrap replicates per interval.
pub const RESAMPLES: usize = 4000;
/// Two-sided confidence level of the intervals.
pub const LEVEL: f64 = 0.95;
/// A ratio interval inside `1 ± NOISE_MARGIN` that contains 1 decides "within noise": a
/// difference below 5 % is not one this benchmark claims to resolve.
pub const NOISE_MARGIN: f64 = 0.05;
/// The seed of every interval of a report.
pub const SEED: u64 = 14;

/// A statistic with its bootstrap confidence interval over `n` paired rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub point: f64,
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
    /// The value that means "no difference": 1 for a ratio, 0 for a difference.
    pub null: f64,
}

/// Which way is better for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Latency, CPU per operation.
    Lower,
    /// Rate, throughput.
    Higher,
}

impl Better {
    pub fn of_metric(metric: &str) -> Better {
        match metric {
            "rate" | "gib_s" => Better::Higher,
            _ => Better::Lower,
        }
    }
}

/// What the interval says about A against B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Faster,
    Slower,
    WithinNoise,
    /// Fewer than two paired rounds: no interval.
    NoData,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Faster => "faster",
            Verdict::Slower => "slower",
            Verdict::WithinNoise => "within noise",
            Verdict::NoData => "no data",
        }
    }
}

impl Interval {
    /// A's verdict against B, for a metric where `better` is the good direction.
    pub fn verdict(&self, better: Better) -> Verdict {
        if self.n < 2 || !self.lo.is_finite() || !self.hi.is_finite() {
            return Verdict::NoData;
        }
        let below = self.hi < self.null;
        let above = self.lo > self.null;
        match (below, above, better) {
            (true, _, Better::Lower) | (_, true, Better::Higher) => Verdict::Faster,
            (true, _, Better::Higher) | (_, true, Better::Lower) => Verdict::Slower,
            _ => Verdict::WithinNoise,
        }
    }

    /// Whether more rounds are not needed: the interval excludes "no difference", or it is
    /// narrow enough (within [`NOISE_MARGIN`] of the null, relative to B's scale for a
    /// difference: `scale` is B's median then, 1 for a ratio) to call the difference noise.
    pub fn decided(&self, scale: f64) -> bool {
        if self.n < 2 {
            return false;
        }
        if self.hi < self.null || self.lo > self.null {
            return true;
        }
        let margin = NOISE_MARGIN * scale.abs();
        self.lo >= self.null - margin && self.hi <= self.null + margin
    }
}

/// Median of finite values (NaN when there are none).
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `median(A) / median(B)` over paired rounds, with its interval.
pub fn ratio_of_medians(pairs: &[(f64, f64)]) -> Interval {
    paired(pairs, 1.0, RESAMPLES, |a, b| median(a) / median(b))
}

/// `median(A) - median(B)` over paired rounds, with its interval.
pub fn difference_of_medians(pairs: &[(f64, f64)]) -> Interval {
    paired(pairs, 0.0, RESAMPLES, |a, b| median(a) - median(b))
}

/// Percentile bootstrap of `stat` over rounds resampled as pairs.
fn paired(
    pairs: &[(f64, f64)],
    null: f64,
    resamples: usize,
    stat: impl Fn(&[f64], &[f64]) -> f64,
) -> Interval {
    let pairs: Vec<(f64, f64)> = pairs
        .iter()
        .copied()
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .collect();
    let n = pairs.len();
    let (a, b): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
    let point = stat(&a, &b);
    if n < 2 {
        return Interval {
            point,
            lo: f64::NAN,
            hi: f64::NAN,
            n,
            null,
        };
    }
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut reps = Vec::with_capacity(resamples);
    let (mut ra, mut rb) = (vec![0.0; n], vec![0.0; n]);
    for _ in 0..resamples {
        for i in 0..n {
            // n is at most a few dozen rounds: the modulo bias is below 1e-17.
            let j = (rng.next_u64() % n as u64) as usize;
            ra[i] = pairs[j].0;
            rb[i] = pairs[j].1;
        }
        let s = stat(&ra, &rb);
        if s.is_finite() {
            reps.push(s);
        }
    }
    reps.sort_by(|x, y| x.total_cmp(y));
    let q = |p: f64| {
        if reps.is_empty() {
            return f64::NAN;
        }
        let i = (p * (reps.len() - 1) as f64).round() as usize;
        reps[i.min(reps.len() - 1)]
    };
    let tail = (1.0 - LEVEL) / 2.0;
    Interval {
        point,
        lo: q(tail),
        hi: q(1.0 - tail),
        n,
        null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report's ratio with fewer replicates, so that hundreds of synthetic trials stay
    /// quick in a debug build.
    fn ratio(pairs: &[(f64, f64)]) -> Interval {
        paired(pairs, 1.0, 1000, |a, b| median(a) / median(b))
    }

    /// Normal variates for synthetic rounds (Box-Muller over a seeded generator).
    struct Normal(ChaCha8Rng);

    impl Normal {
        fn new(seed: u64) -> Normal {
            Normal(ChaCha8Rng::seed_from_u64(seed))
        }
        fn uniform(&mut self) -> f64 {
            ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn sample(&mut self, mean: f64, sd: f64) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            mean + sd * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    /// `n` rounds where A has mean `ma`, B mean `mb`, both with relative noise `noise` of
    /// their own plus a drift shared by the two figures of a round (what interleaving is for).
    fn rounds(g: &mut Normal, n: usize, ma: f64, mb: f64, noise: f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|_| {
                let drift = g.sample(1.0, 0.15).max(0.3);
                (
                    ma * drift * g.sample(1.0, noise),
                    mb * drift * g.sample(1.0, noise),
                )
            })
            .collect()
    }

    #[test]
    fn a_known_shift_is_called_faster_or_slower() {
        let mut g = Normal::new(1);
        let mut faster = 0;
        let mut slower = 0;
        let trials = 100;
        for _ in 0..trials {
            // A takes 80 % of B's time, with 5 % noise of their own and 15 % shared drift.
            let r = rounds(&mut g, 8, 80.0, 100.0, 0.05);
            let i = ratio(&r);
            assert!(i.lo <= i.point && i.point <= i.hi, "{i:?}");
            if i.verdict(Better::Lower) == Verdict::Faster {
                faster += 1;
            }
            // The same figures read as a rate: higher is better, so A is slower.
            if i.verdict(Better::Higher) == Verdict::Slower {
                slower += 1;
            }
            let d = paired(&r, 0.0, 1000, |a, b| median(a) - median(b));
            assert!(d.hi < 0.0 || d.verdict(Better::Lower) == Verdict::WithinNoise);
        }
        eprintln!("a 20 % shift called faster in {faster} of {trials}");
        assert!(
            faster >= 95,
            "a 20 % shift called faster in {faster} of {trials}"
        );
        assert_eq!(slower, faster);
    }

    #[test]
    fn identical_distributions_are_within_noise() {
        let mut g = Normal::new(2);
        let trials = 200;
        let mut noise = 0;
        for _ in 0..trials {
            let r = rounds(&mut g, 8, 100.0, 100.0, 0.1);
            if ratio(&r).verdict(Better::Lower) == Verdict::WithinNoise {
                noise += 1;
            }
        }
        eprintln!("identical distributions within noise in {noise} of {trials}");
        // A 95 % interval: about 5 % false calls; a percentile bootstrap over 8 rounds is a
        // little narrow, so allow up to 12 %.
        assert!(
            noise >= trials * 88 / 100,
            "identical distributions within noise in only {noise} of {trials}"
        );
    }

    #[test]
    fn the_interval_covers_the_true_ratio() {
        let mut g = Normal::new(3);
        let trials = 200;
        let mut covered = 0;
        for _ in 0..trials {
            let r = rounds(&mut g, 12, 120.0, 100.0, 0.08);
            let i = ratio(&r);
            if i.lo <= 1.2 && 1.2 <= i.hi {
                covered += 1;
            }
        }
        eprintln!("true ratio covered in {covered} of {trials}");
        assert!(
            covered >= trials * 85 / 100,
            "true ratio covered in {covered} of {trials}"
        );
    }

    #[test]
    fn pairing_removes_shared_drift() {
        // A is 3 % faster in every round, and the rounds drift by ±30 % together: unpaired,
        // the drift would swamp the difference; paired, the ratio is exact every time.
        let mut g = Normal::new(4);
        let r: Vec<(f64, f64)> = (0..10)
            .map(|_| {
                let d = g.sample(100.0, 30.0).max(10.0);
                (0.97 * d, d)
            })
            .collect();
        let i = ratio(&r);
        assert!((i.point - 0.97).abs() < 0.02, "{i:?}");
        assert_eq!(i.verdict(Better::Lower), Verdict::Faster, "{i:?}");
    }

    #[test]
    fn decided_when_excluding_the_null_or_narrow() {
        let i = |lo, hi| Interval {
            point: (lo + hi) / 2.0,
            lo,
            hi,
            n: 5,
            null: 1.0,
        };
        assert!(i(0.80, 0.95).decided(1.0));
        assert!(i(1.02, 1.30).decided(1.0));
        assert!(i(0.97, 1.04).decided(1.0));
        assert!(!i(0.90, 1.10).decided(1.0));
        let d = Interval {
            point: 2.0,
            lo: -3.0,
            hi: 4.0,
            n: 5,
            null: 0.0,
        };
        // ±5 µs on a 100 µs baseline is narrow enough; on a 50 µs one it is not.
        assert!(d.decided(100.0));
        assert!(!d.decided(50.0));
    }

    #[test]
    fn the_same_data_gives_the_same_interval() {
        let mut g = Normal::new(5);
        let r = rounds(&mut g, 7, 90.0, 100.0, 0.1);
        assert_eq!(ratio_of_medians(&r), ratio_of_medians(&r));
    }

    #[test]
    fn too_few_rounds_is_no_data() {
        let i = ratio_of_medians(&[(1.0, 2.0)]);
        assert_eq!(i.point, 0.5);
        assert_eq!(i.verdict(Better::Lower), Verdict::NoData);
        assert!(!i.decided(1.0));
        let nan = ratio_of_medians(&[(1.0, f64::NAN), (f64::NAN, 2.0)]);
        assert_eq!(nan.n, 0);
    }
}
