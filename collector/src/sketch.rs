//! A latency sketch with bounded relative error (DDSketch: Masson, Rim and Lee, VLDB 2019).
//!
//! A value `x` (microseconds, at least 1) goes to bucket `ceil(ln x / ln γ)` with
//! γ = (1 + α) / (1 − α); every quantile is then within relative error α = 2 % of the true
//! one. Buckets are kept sparse and sorted: a window of one pair rarely fills more than a few
//! dozen, and the number of buckets is bounded by the value range (1 µs to 1 h: ~550).

/// Relative accuracy of quantiles.
pub const RELATIVE_ACCURACY: f64 = 0.02;

fn ln_gamma() -> f64 {
    ((1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)).ln()
}

/// Values are clamped into this range (microseconds): 1 µs to 1 hour.
const MAX_US: u64 = 3_600_000_000;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySketch {
    /// (bucket index, count), sorted by index.
    buckets: Vec<(i16, u32)>,
    count: u64,
}

impl LatencySketch {
    fn index(us: u64) -> i16 {
        let x = us.clamp(1, MAX_US) as f64;
        (x.ln() / ln_gamma()).ceil() as i16
    }

    /// The value a bucket stands for: the midpoint (in relative terms) of its range.
    fn value(index: i16) -> f64 {
        let g = ln_gamma();
        2.0 * (f64::from(index) * g).exp() / (1.0 + g.exp())
    }

    pub fn add(&mut self, us: u64) {
        self.add_n(Self::index(us), 1);
    }

    fn add_n(&mut self, index: i16, n: u32) {
        match self.buckets.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(pos) => self.buckets[pos].1 = self.buckets[pos].1.saturating_add(n),
            Err(pos) => self.buckets.insert(pos, (index, n)),
        }
        self.count += u64::from(n);
    }

    pub fn merge(&mut self, other: &LatencySketch) {
        for &(i, n) in &other.buckets {
            self.add_n(i, n);
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) in microseconds; `None` when empty. Between the two
    /// values around rank q·(n − 1), interpolated in log space, so that the median of an
    /// even number of requests is the middle of its two middle values and a few requests
    /// give no value biased low.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let h = q.clamp(0.0, 1.0) * (self.count - 1) as f64;
        let (below, frac) = (h.floor() as u64, h.fract());
        let (mut seen, mut lower) = (0u64, None);
        for &(i, n) in &self.buckets {
            seen += u64::from(n);
            if lower.is_none() && seen > below {
                lower = Some(i);
            }
            if let Some(lo) = lower
                && (seen > below + 1 || frac == 0.0)
            {
                let (a, b) = (Self::value(lo).ln(), Self::value(i).ln());
                return Some((a + frac * (b - a)).exp());
            }
        }
        self.buckets.last().map(|&(i, _)| Self::value(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_relative_error() {
        let mut s = LatencySketch::default();
        let values: Vec<u64> = (1..=10_000).map(|i| i * 37).collect();
        for &v in &values {
            s.add(v);
        }
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 1.0] {
            let h = (values.len() - 1) as f64 * q;
            let (lo, hi) = (values[h.floor() as usize] as f64, values[h.ceil() as usize] as f64);
            let exact = (lo.ln() + h.fract() * (hi.ln() - lo.ln())).exp();
            let got = s.quantile(q).expect("not empty");
            assert!((got - exact).abs() <= exact * RELATIVE_ACCURACY * 1.0001, "q{q}: {got} vs {exact}");
        }
        assert_eq!(s.count(), 10_000);
        assert!(s.buckets.len() < 300);
    }

    #[test]
    fn the_median_of_an_even_count_is_between_its_middle_values() {
        let mut s = LatencySketch::default();
        for v in [1_000, 4_000] {
            s.add(v);
        }
        let median = s.quantile(0.5).expect("not empty");
        assert!((median - 2_000.0).abs() <= 2_000.0 * RELATIVE_ACCURACY * 1.0001, "{median}");
        assert!((s.quantile(0.0).expect("not empty") - 1_000.0).abs() <= 1_000.0 * RELATIVE_ACCURACY);
        assert!((s.quantile(1.0).expect("not empty") - 4_000.0).abs() <= 4_000.0 * RELATIVE_ACCURACY);
    }

    #[test]
    fn merging_is_adding() {
        let (mut a, mut b, mut both) = (LatencySketch::default(), LatencySketch::default(), LatencySketch::default());
        for v in [5, 50, 500, 5000] {
            a.add(v);
            both.add(v);
        }
        for v in [7, 70, 7000, 0, u64::MAX] {
            b.add(v);
            both.add(v);
        }
        a.merge(&b);
        assert_eq!(a, both);
        assert_eq!(LatencySketch::default().quantile(0.5), None);
    }
}
