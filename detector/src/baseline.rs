//! Baselines: what one signal of one pair normally looks like, learned online, and how
//! surprising an observation is. Pure: numbers and event time in, numbers out.
//!
//! Every baseline is robust (an observation judged anomalous does not teach it; others are
//! clipped at 3 standard deviations), and adapts to a lasting shift: after `adapt_after`
//! anomalous windows in a row it takes the level of those windows as the new normal.
//!
//! Tails: counts are negative binomial (Poisson with overdispersion, around an expectation
//! that is itself uncertain), with the variance-stabilising Anscombe transform as a guard; ratios are binomial given the number of requests; latency quantiles are compared
//! in log space against their learned level, with the sampling error of a quantile of `n`
//! values added to the learned variation between windows.

use crate::stats::{binomial_upper_tail, nb_lower_tail, nb_upper_tail, normal_sf};

/// Learning rates, as windows (the reciprocal is the weight of one new window).
pub const LEVEL_WINDOWS: f64 = 180.0;
pub const DISPERSION_WINDOWS: f64 = 360.0;
pub const RATIO_WINDOWS: f64 = 8_640.0;
pub const LATENCY_WINDOWS: f64 = 360.0;

/// Where an observation stands: its p-value in the direction it deviates, and what was
/// expected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assessment {
    /// One-sided tail probability of a deviation at least this large, in `[0, 1]`.
    pub p_value: f64,
    /// The observation is above what was expected.
    pub high: bool,
    pub observed: f64,
    pub expected: f64,
    /// The band of normal values (at the detection threshold).
    pub lower: f64,
    pub upper: f64,
}

/// `α` for the `n`-th observation with a floor: a running mean at first, then an EWMA.
fn rate(n: u64, windows: f64) -> f64 {
    (1.0 / (n as f64 + 1.0)).max(1.0 / windows)
}

/// Standard-normal quantile for the upper tail probability `p` (Acklam's rational
/// approximation, relative error below 1.2e-9), used to draw bands at the threshold.
pub fn z_for_p(p: f64) -> f64 {
    let p = p.clamp(1e-300, 0.5);
    let q = (-2.0 * p.ln()).sqrt();
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
        / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
}

/// Counts per window (requests, connections): a slow level (about a day), a daily shape
/// (24 hourly factors), a weekly shape (7 daily factors) and a short-term factor (about a
/// quarter of an hour) that follows what the shapes do not explain.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CountBaseline {
    /// Deseasonalised mean count per window.
    pub level: f64,
    pub daily: [f64; 24],
    pub daily_n: [u32; 24],
    pub weekly: [f64; 7],
    pub weekly_n: [u32; 7],
    /// Recent observations over what level and shapes expect, within [1/3, 3].
    pub short: f64,
    /// Variance over mean (1 for Poisson).
    pub dispersion: f64,
    pub windows: u64,
    /// Anomalous windows in a row, and their sum of ratios to the expectation (for adaptation).
    pub shifted: u32,
    pub shift_sum: f64,
    /// Counts per hour of the first day: at its end, they set the daily shape and the level
    /// at once (the online estimates of the first day lag behind both).
    pub first_day: [(f64, u32); 24],
}

impl Default for CountBaseline {
    fn default() -> Self {
        CountBaseline {
            level: 0.0,
            daily: [1.0; 24],
            daily_n: [0; 24],
            weekly: [1.0; 7],
            weekly_n: [0; 7],
            short: 1.0,
            dispersion: 1.0,
            windows: 0,
            shifted: 0,
            shift_sum: 0.0,
            first_day: [(0.0, 0); 24],
        }
    }
}

/// Hour of day (fractional) and weekday (0 = Monday) of a Unix time in milliseconds.
pub fn calendar(t_ms: i64) -> (f64, usize) {
    let day = t_ms.div_euclid(86_400_000);
    let hour = t_ms.rem_euclid(86_400_000) as f64 / 3_600_000.0;
    (hour, (day + 3).rem_euclid(7) as usize)
}

/// Windows of memory of the level, a daily slot (per slot), a weekly slot, the short factor.
const LEVEL_MEMORY: f64 = 8_640.0;
const DAILY_SLOT_MEMORY: f64 = 1_080.0;
const WEEKLY_SLOT_MEMORY: f64 = 17_280.0;
const SHORT_MEMORY: f64 = 90.0;
const DAY_WINDOWS: u64 = 8_640;

impl CountBaseline {
    /// The seasonal factor at `t_ms` (daily slots interpolated between hour midpoints).
    pub fn season(&self, t_ms: i64) -> f64 {
        let (hour, weekday) = calendar(t_ms);
        let x = hour - 0.5;
        let h0 = x.floor().rem_euclid(24.0) as usize;
        let f = x - x.floor();
        (self.daily[h0] * (1.0 - f) + self.daily[(h0 + 1) % 24] * f) * self.weekly_factor(weekday)
    }

    /// The weekly shape applies once every weekday has taught it for half a day: before, the
    /// factor of a day not yet seen would be a guess against days that were.
    fn weekly_factor(&self, weekday: usize) -> f64 {
        if self.weekly_n.iter().all(|&n| u64::from(n) >= DAY_WINDOWS / 2) { self.weekly[weekday] } else { 1.0 }
    }

    /// Expected count in the window at `t_ms`.
    pub fn expected(&self, t_ms: i64) -> f64 {
        self.level * self.season(t_ms) * self.short
    }

    /// Learns from one window's count; `anomalous` windows teach nothing unless the shift
    /// lasts `adapt_after` windows.
    pub fn update(&mut self, x: f64, t_ms: i64, anomalous: bool, adapt_after: u32) {
        let season = self.season(t_ms).max(1e-3);
        let lambda = self.level * season * self.short;
        if anomalous && self.windows > 0 {
            self.shifted += 1;
            self.shift_sum += x / lambda.max(1e-3);
            if self.shifted >= adapt_after {
                let factor = self.shift_sum / f64::from(self.shifted);
                self.level *= factor;
                self.short = 1.0;
                self.shifted = 0;
                self.shift_sum = 0.0;
            }
            return;
        }
        self.shifted = 0;
        self.shift_sum = 0.0;
        let sd = (self.dispersion * lambda.max(1.0)).sqrt();
        let clipped = if self.windows < 30 { x } else { x.clamp(lambda - 3.0 * sd, lambda + 3.0 * sd).max(0.0) };
        // The level: a running mean at first, then about a day of memory.
        self.level += rate(self.windows, LEVEL_MEMORY) * (clipped / season - self.level);
        if self.windows >= 30 && self.level > 0.0 {
            let (hour, weekday) = calendar(t_ms);
            let h = hour.floor() as usize % 24;
            let weekly_now = self.weekly_factor(weekday);
            let daily_ratio = (clipped / (self.level * weekly_now)).min(10.0);
            self.daily[h] += rate(u64::from(self.daily_n[h]), DAILY_SLOT_MEMORY) * (daily_ratio - self.daily[h]);
            self.daily_n[h] = self.daily_n[h].saturating_add(1);
            // The weekly shape only once a day has taught the level and the daily shape.
            if self.windows >= DAY_WINDOWS {
                let weekly_ratio = (clipped / (self.level * season / weekly_now)).min(10.0);
                self.weekly[weekday] += (weekly_ratio - self.weekly[weekday]) / WEEKLY_SLOT_MEMORY;
                self.weekly_n[weekday] = self.weekly_n[weekday].saturating_add(1);
            }
            normalize(&mut self.daily);
            normalize(&mut self.weekly);
            let short_ratio = (clipped / (self.level * self.season(t_ms)).max(1e-9)).clamp(1.0 / 3.0, 3.0);
            self.short += (short_ratio - self.short) / SHORT_MEMORY;
            if lambda >= 1.0 {
                let r = ((clipped - lambda).powi(2) / lambda).min(50.0);
                self.dispersion = (self.dispersion + (r - self.dispersion) / DISPERSION_WINDOWS).max(1.0);
            }
        }
        if self.windows < DAY_WINDOWS {
            let h = calendar(t_ms).0.floor() as usize % 24;
            self.first_day[h].0 += x;
            self.first_day[h].1 += 1;
        }
        self.windows += 1;
        if self.windows == DAY_WINDOWS {
            self.calibrate_from_first_day();
        }
    }

    /// Sets the level and the daily shape from the first day's hourly means. A pair busy in
    /// only a few hours of its first day (a burst, a batch job seen once) gets a flat shape:
    /// one day is no evidence that the burst recurs at that hour.
    fn calibrate_from_first_day(&mut self) {
        let means: Vec<Option<f64>> =
            self.first_day.iter().map(|&(sum, n)| (n > 0).then(|| sum / f64::from(n))).collect();
        let seen: Vec<f64> = means.iter().flatten().copied().collect();
        if seen.is_empty() {
            return;
        }
        let overall = seen.iter().sum::<f64>() / seen.len() as f64;
        if overall <= 0.0 {
            return;
        }
        let busy_hours = self.first_day.iter().filter(|&&(sum, _)| sum > 0.0).count();
        let events: f64 = self.first_day.iter().map(|&(sum, _)| sum).sum();
        if busy_hours >= 12 && events >= 100.0 {
            for (slot, mean) in self.daily.iter_mut().zip(&means) {
                *slot = mean.map_or(1.0, |m| (m / overall).clamp(0.02, 10.0));
            }
        } else {
            self.daily = [1.0; 24];
        }
        normalize(&mut self.daily);
        self.level = overall;
        self.short = 1.0;
    }

    /// How surprising `x` observed against `expected` (summed over the same windows) is.
    /// Counts are Poisson with the learnt overdispersion (quasi-Poisson), and the expectation
    /// itself is uncertain — the daily and weekly shapes and the level are estimates, wrong
    /// together for minutes at a time — by `MODEL_ERROR` relative: a negative binomial, whose
    /// tails are heavier than Poisson's once the expectation is more than a few counts. The
    /// p-value is the larger (more cautious) of that exact tail and the normal approximation
    /// through the variance-stabilising Anscombe transform; the exact tail alone is too sure
    /// of itself above small means, the approximation alone far too sure below them.
    pub fn assess(&self, x: f64, expected: f64, threshold_p: f64) -> Assessment {
        let phi = self.dispersion.max(1.0);
        // Variance over mean of the count: the dispersion, plus the expectation's error.
        let spread = phi + MODEL_ERROR * MODEL_ERROR * expected.max(0.0);
        let anscombe = |v: f64| (v.max(0.0) + 0.375).sqrt();
        let zt = z_for_p(threshold_p);
        let half = zt * spread.sqrt() / 2.0;
        let lower = ((anscombe(expected) - half).max(0.0).powi(2) - 0.375).max(0.0);
        let upper = (anscombe(expected) + half).powi(2) - 0.375;
        let high = x > expected;
        let (xs, ls) = (x.max(0.0) / phi, expected.max(0.0) / phi);
        let approx = normal_sf((2.0 * (anscombe(x) - anscombe(expected)) / spread.sqrt()).abs());
        let shape = 1.0 / (MODEL_ERROR * MODEL_ERROR);
        let p_value = if ls < 1_000.0 {
            let exact = if high {
                nb_upper_tail(xs.ceil() as u64, ls, shape)
            } else {
                nb_lower_tail(xs.floor() as u64, ls, shape)
            };
            exact.max(approx)
        } else {
            approx
        };
        Assessment { p_value: p_value.clamp(0.0, 1.0), high, observed: x, expected, lower, upper }
    }
}

/// Relative error of a count's expectation (the standard deviation of the true rate around
/// it, as a share of it).
pub const MODEL_ERROR: f64 = 0.15;

fn normalize<const N: usize>(v: &mut [f64; N]) {
    let mean = v.iter().sum::<f64>() / N as f64;
    if mean > 0.0 {
        for x in v.iter_mut() {
            *x /= mean;
        }
    }
}

/// A ratio (errors, denials, rate limits over requests), learned as decayed sums with a
/// weak prior of 0.5 events in 500 requests (0.1 %).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RatioBaseline {
    pub events: f64,
    pub total: f64,
    /// Anomalous windows in a row: past `adapt_after` they teach again (a lasting shift).
    pub shifted: u32,
}

const PRIOR_EVENTS: f64 = 0.5;
const PRIOR_TOTAL: f64 = 500.0;

impl RatioBaseline {
    pub fn expected(&self) -> f64 {
        (self.events + PRIOR_EVENTS) / (self.total + PRIOR_TOTAL)
    }

    pub fn update(&mut self, events: f64, total: f64, anomalous: bool, adapt_after: u32) {
        let keep = 1.0 - 1.0 / RATIO_WINDOWS;
        self.events *= keep;
        self.total *= keep;
        self.shifted = if anomalous { self.shifted.saturating_add(1) } else { 0 };
        if self.shifted == 0 || self.shifted >= adapt_after {
            self.events += events;
            self.total += total;
        }
    }

    /// `events` of `total` against the learned ratio: binomial upper tail (only an increase
    /// is an anomaly).
    pub fn assess(&self, events: u64, total: u64, threshold_p: f64) -> Option<Assessment> {
        if total == 0 {
            return None;
        }
        let p0 = self.expected();
        let p_value = if total <= 20_000 {
            binomial_upper_tail(events, total, p0)
        } else {
            let n = total as f64;
            normal_sf((events as f64 - n * p0) / (n * p0 * (1.0 - p0)).sqrt())
        };
        let n = total as f64;
        let sd = (p0 * (1.0 - p0) / n).sqrt();
        let zt = z_for_p(threshold_p);
        Some(Assessment {
            p_value,
            high: events as f64 / n > p0,
            observed: events as f64 / n,
            expected: p0,
            lower: (p0 - zt * sd).max(0.0),
            upper: (p0 + zt * sd).min(1.0),
        })
    }
}

/// Sampling error factor of a quantile of a log-normal sample, in units of its log-sd over
/// √n: √(p(1−p)) / φ(z_p).
pub fn quantile_error_factor(q: f64) -> f64 {
    let z = -z_for_p(1.0 - q);
    let density = (-z * z / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (q * (1.0 - q)).sqrt() / density
}

/// A latency quantile, in log space (natural log of microseconds).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencyBaseline {
    pub mean: f64,
    /// Variance between windows beyond sampling error.
    pub between_var: f64,
    /// Log-sd of latency within a window.
    pub spread: f64,
    pub windows: u64,
    pub shifted: u32,
    pub shift_sum: f64,
}

impl Default for LatencyBaseline {
    fn default() -> Self {
        LatencyBaseline { mean: 0.0, between_var: 0.01, spread: 0.5, windows: 0, shifted: 0, shift_sum: 0.0 }
    }
}

/// Floor of the variation between windows (log units): about 5 %.
const MIN_BETWEEN_VAR: f64 = 0.05 * 0.05;

impl LatencyBaseline {
    fn sd(&self, q: f64, n: f64, windows: f64) -> f64 {
        let sampling = quantile_error_factor(q) * self.spread / n.max(1.0).sqrt();
        (self.between_var.max(MIN_BETWEEN_VAR) / windows.max(1.0) + sampling * sampling).sqrt()
    }

    /// Learns one window's quantile (`log_value`, from `n` requests; `span`: the windows it
    /// was pooled from) and within-window spread.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        q: f64,
        log_value: f64,
        n: f64,
        spread: Option<f64>,
        anomalous: bool,
        span: u32,
        adapt_after: u32,
    ) {
        if anomalous && self.windows > 0 {
            self.shifted += span.max(1);
            self.shift_sum += log_value * f64::from(span.max(1));
            if self.shifted >= adapt_after {
                self.mean = self.shift_sum / f64::from(self.shifted);
                self.shifted = 0;
                self.shift_sum = 0.0;
            }
            return;
        }
        self.shifted = 0;
        self.shift_sum = 0.0;
        let a = rate(self.windows, LATENCY_WINDOWS);
        if self.windows == 0 {
            self.mean = log_value;
        } else {
            let sd = self.sd(q, n, 1.0);
            let resid = (log_value - self.mean).clamp(-3.0 * sd, 3.0 * sd);
            self.mean += a * resid;
            let sampling = quantile_error_factor(q) * self.spread / n.max(1.0).sqrt();
            // Unclipped, so that the mean of the excess is the variance between windows (a
            // window closer than sampling error says so); never below zero.
            let excess = resid * resid - sampling * sampling;
            self.between_var = (self.between_var + a * (excess - self.between_var)).max(0.0);
        }
        if let Some(s) = spread {
            self.spread += a * (s.clamp(0.01, 5.0) - self.spread);
        }
        self.windows += 1;
    }

    /// The mean log quantile over `windows` windows holding `n` requests: an increase only.
    pub fn assess(&self, q: f64, log_value: f64, n: f64, windows: f64, threshold_p: f64) -> Assessment {
        let sd = self.sd(q, n, windows);
        let z = (log_value - self.mean) / sd;
        let zt = z_for_p(threshold_p);
        Assessment {
            p_value: normal_sf(z.abs()),
            high: z > 0.0,
            observed: log_value.exp(),
            expected: self.mean.exp(),
            lower: (self.mean - zt * sd).exp(),
            upper: (self.mean + zt * sd).exp(),
        }
    }
}

/// Bytes per window, as a per-flow mean and variance learned from non-anomalous windows.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BytesBaseline {
    pub mean: f64,
    pub var: f64,
    pub windows: u64,
}

impl BytesBaseline {
    pub fn update(&mut self, bytes: f64, flows: f64, anomalous: bool) {
        if flows <= 0.0 || anomalous {
            return;
        }
        let per_flow = bytes / flows;
        let a = rate(self.windows, LEVEL_WINDOWS);
        if self.windows == 0 {
            self.mean = per_flow;
            self.var = per_flow * per_flow;
        } else {
            let resid = per_flow - self.mean;
            self.mean += a * resid;
            self.var += a * (resid * resid * flows - self.var);
        }
        self.windows += 1;
    }

    /// `bytes` over `flows` flows: an increase only. A sum of `n` flow sizes is skewed far
    /// to the right when `n` is small, so the tail is the Gamma distribution's (shape `n`
    /// times the flows' own m²/σ²), through the Wilson–Hilferty cube-root transform.
    pub fn assess(&self, bytes: f64, flows: f64, threshold_p: f64) -> Option<Assessment> {
        if flows <= 0.0 || self.mean <= 0.0 {
            return None;
        }
        let expected = flows * self.mean;
        let per_flow_var = self.var.max((0.5 * self.mean).powi(2));
        let shape = (flows * self.mean * self.mean / per_flow_var).max(0.05);
        let c = 1.0 / (9.0 * shape);
        let z = ((bytes / expected).max(0.0).cbrt() - (1.0 - c)) / c.sqrt();
        let zt = z_for_p(threshold_p);
        let edge = |z: f64| expected * (1.0 - c + z * c.sqrt()).max(0.0).powi(3);
        Some(Assessment {
            p_value: normal_sf(z.abs()),
            high: z > 0.0,
            observed: bytes,
            expected,
            lower: edge(-zt),
            upper: edge(zt),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 10_000;

    #[test]
    fn z_for_p_inverts_the_tail() {
        for p in [0.4, 0.05, 1e-3, 1e-6, 1e-9] {
            assert!((normal_sf(z_for_p(p)) - p).abs() < p * 1e-4, "p {p}");
        }
    }

    #[test]
    fn quantile_error_factors() {
        assert!((quantile_error_factor(0.5) - 1.2533).abs() < 1e-3);
        assert!((quantile_error_factor(0.99) - 3.73).abs() < 0.02);
    }

    #[test]
    fn a_constant_count_is_learned_and_never_surprising() {
        let mut b = CountBaseline::default();
        for i in 0..2_000 {
            let t = i * W;
            let a = b.assess(30.0, b.expected(t), 1e-6);
            assert!(i < 30 || a.p_value > 0.01, "window {i}: {a:?}");
            b.update(30.0, t, false, 360);
        }
        assert!((b.expected(2_000 * W) - 30.0).abs() < 0.5);
    }

    #[test]
    fn a_surge_is_surprising_and_does_not_teach() {
        let mut b = CountBaseline::default();
        for i in 0..1_000 {
            b.update(30.0, i * W, false, 360);
        }
        let before = b.level;
        let a = b.assess(90.0, b.expected(1_000 * W), 1e-6);
        assert!(a.high && a.p_value < 1e-6, "{a:?}");
        b.update(90.0, 1_000 * W, true, 360);
        assert_eq!(b.level, before);
        let drop = b.assess(0.0, 6.0 * b.expected(0), 1e-6);
        assert!(!drop.high && drop.p_value < 1e-6, "{drop:?}");
    }

    #[test]
    fn a_lasting_shift_is_adopted() {
        let mut b = CountBaseline::default();
        for i in 0..500 {
            b.update(10.0, i * W, false, 360);
        }
        for i in 500..860 {
            b.update(40.0, i * W, true, 360);
        }
        assert!((b.level - 40.0).abs() < 1.0, "{}", b.level);
    }

    #[test]
    fn three_errors_in_four_requests_at_night_are_not_an_error_burst() {
        let mut r = RatioBaseline::default();
        for _ in 0..10_000 {
            r.update(1.0, 1_000.0, false, 360);
        }
        // Large samples: 5 % of 1,000 against 0.1 % is overwhelming.
        assert!(r.assess(50, 1_000, 1e-6).expect("requests").p_value < 1e-20);
        // 3 of 4 is improbable under 0.1 %, but only at the level a multi-window rule and an
        // absolute minimum must weigh: the p-value is still far from zero.
        let small = r.assess(3, 4, 1e-6).expect("requests");
        assert!(small.p_value > 1e-9, "{small:?}");
        assert!(r.assess(0, 0, 1e-6).is_none());
    }

    #[test]
    fn latency_doubling_is_seen_in_log_space() {
        let mut l = LatencyBaseline::default();
        let base = (20_000f64).ln();
        for i in 0..1_000 {
            let jitter = ((i * 7919) % 100) as f64 / 100.0 * 0.1 - 0.05;
            l.update(0.5, base + jitter, 100.0, Some(0.5), false, 1, 360);
        }
        let normal = l.assess(0.5, base + 0.02, 100.0, 1.0, 1e-6);
        assert!(normal.p_value > 1e-3, "{normal:?}");
        let doubled = l.assess(0.5, base + 2f64.ln(), 100.0, 1.0, 1e-6);
        assert!(doubled.high && doubled.p_value < 1e-6, "{doubled:?}");
        assert!((doubled.expected - 20_000.0).abs() < 1_000.0);
    }

    #[test]
    fn one_large_response_among_few_is_not_a_surge() {
        let mut b = BytesBaseline::default();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..5_000 {
            // Exponential sizes with mean 2,000 bytes, one to four flows a window.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            b.update(-2_000.0 * (1.0 - u).ln(), 1.0, false);
        }
        // A 25 kB response in a window of two (a 1-in-100,000 draw) is not past 1e-6.
        let a = b.assess(25_000.0, 2.0, 1e-6).expect("flows");
        assert!(a.p_value > 1e-6, "{a:?}");
    }

    #[test]
    fn bytes_twenty_fold_is_seen() {
        let mut b = BytesBaseline::default();
        for i in 0..1_000 {
            b.update(300.0 * 10.0 + (i % 7) as f64 * 50.0, 10.0, false);
        }
        assert!(b.assess(3_000.0, 10.0, 1e-6).expect("flows").p_value > 1e-3);
        let surge = b.assess(60_000.0, 10.0, 1e-6).expect("flows");
        assert!(surge.high && surge.p_value < 1e-6, "{surge:?}");
    }

    #[test]
    fn daily_shape_is_learned() {
        let mut b = CountBaseline::default();
        let shape = |t: i64| if calendar(t).0 < 12.0 { 10.0 } else { 40.0 };
        for i in 0..(7 * 8_640) {
            let t = i * W;
            b.update(shape(t), t, false, 360);
        }
        let t_morning = 7 * 86_400_000 + 6 * 3_600_000;
        let t_evening = 7 * 86_400_000 + 18 * 3_600_000;
        let ratio = b.season(t_evening) / b.season(t_morning);
        assert!((3.2..4.8).contains(&ratio), "evening over morning {ratio}");
        // The level is the daily mean, 25; the expectation follows the shape.
        assert!((b.level - 25.0).abs() < 4.0, "{}", b.level);
    }
}
