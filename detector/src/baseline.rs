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

use crate::stats::{beta_binomial_upper_tail, nb_lower_tail, nb_upper_tail, normal_sf};

/// The length of the windows (or rows) a baseline learns from: memories are durations, and
/// this turns them into numbers of windows, so that the same traffic at 10 s or 1 h
/// resolution is remembered for as long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    window_ms: i64,
}

impl Default for Cadence {
    /// Ten-second windows, the collector's default.
    fn default() -> Self {
        Cadence { window_ms: 10_000 }
    }
}

impl Cadence {
    /// A cadence of `window_ms` (at least a millisecond).
    pub fn of(window_ms: i64) -> Cadence {
        Cadence { window_ms: window_ms.max(1) }
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Windows in `ms` of time, and at least `min_windows`: a memory shorter than a few
    /// windows would follow every window.
    pub fn windows(&self, ms: f64, min_windows: f64) -> f64 {
        (ms / self.window_ms as f64).max(min_windows)
    }

    /// Windows in an hour (at least one): the default `adapt_after` where none is configured.
    pub fn hour(&self) -> u32 {
        (HOUR_MS as i64 / self.window_ms).clamp(1, i64::from(u32::MAX)) as u32
    }

    /// Windows in a day (at least one).
    pub fn day(&self) -> u64 {
        (DAY_MS as i64 / self.window_ms).max(1) as u64
    }

    /// Whole windows in `ms` (rounded, at least one).
    pub fn count(&self, ms: i64) -> u32 {
        ((ms as f64 / self.window_ms as f64).round() as i64).clamp(1, i64::from(u32::MAX)) as u32
    }

    /// The scales a signal is judged over, in windows: the window alone, then `SCALES_MS` in
    /// this cadence's windows (repeats dropped), at most `max_windows`. At 10 s windows 1, 3,
    /// 4, 6, 12 and 30; at 60 s 1, 2 and 5; at 5 min and longer the window alone.
    pub fn scales(&self, max_windows: usize) -> impl Iterator<Item = usize> + '_ {
        let mut last = 1;
        std::iter::once(1).chain(SCALES_MS.into_iter().filter_map(move |ms| {
            let w = self.count(ms) as usize;
            (w > last && w <= max_windows).then(|| {
                last = w;
                w
            })
        }))
    }
}

/// The spans a signal is judged over besides its window alone: sums over up to five minutes,
/// so that a small lasting deviation adds up.
pub const SCALES_MS: [i64; 5] = [30_000, 40_000, 60_000, 120_000, 300_000];

const DAY_MS: f64 = 86_400_000.0;
const HOUR_MS: f64 = 3_600_000.0;

/// Memories of the other baselines, in time: a ratio's decayed sums (a day), a latency
/// level (an hour, at least 30 windows), bytes per flow (half an hour, at least 30 windows).
const RATIO_MEMORY_MS: f64 = DAY_MS;
const LATENCY_MEMORY_MS: f64 = HOUR_MS;
const BYTES_MEMORY_MS: f64 = HOUR_MS / 2.0;

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
    /// Variance over mean (1 for Poisson) as learnt before the spread was (`LearntSpread`):
    /// kept in the stored layout, and read once, to start the spread of a model stored then.
    pub dispersion: f64,
    pub windows: u64,
    /// Anomalous windows in a row, and their sum of ratios to the expectation (for adaptation).
    pub shifted: u32,
    pub shift_sum: f64,
    /// Counts per hour of the first day: at its end, they set the daily shape and the level
    /// at once (the online estimates of the first day lag behind both).
    pub first_day: [(f64, u32); 24],
    /// The variance of a window's count, learnt. Stored apart from the rest (the pair
    /// model's trailer), so that the layout above reads as it was written before.
    #[serde(skip)]
    pub spread: LearntSpread,
    /// Per weekday, the decayed sum of what the level and daily shape expected of its
    /// windows: `weekly[d]` is the decayed sum of what came, over it (`learn_weekday`).
    /// Stored in the model's trailer, like `spread`.
    #[serde(skip)]
    pub weekday_expected: [f64; 7],
}

/// A count's variance as learnt from its residuals: `var = φ·λ + κ·λ²`, with φ (the
/// quasi-Poisson dispersion) and κ (the squared relative error of the expectation) fitted by
/// least squares of `r²/λ = φ + κ·λ` over decayed moments of the windows that taught the
/// baseline. A pair 5× burstier than Poisson gets φ ≈ 5; a large series whose noise is a share
/// of its level gets κ ≈ that share². Counts keep φ ≥ 1 (Poisson is the least a count
/// varies); continuous values (`counts == false`) have no floor.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearntSpread {
    pub counts: bool,
    /// The least κ: the expectation's own relative error, which residuals one window apart
    /// cannot show (the level and shapes are wrong together for a while).
    pub min_kappa: f64,
    /// Decayed means of λ, λ², u = r²/λ and λ·u.
    moments: [f64; 4],
    samples: u64,
    pub phi: f64,
    pub kappa: f64,
}

impl Default for LearntSpread {
    /// The spread of counts.
    fn default() -> Self {
        LearntSpread::new(true)
    }
}

impl LearntSpread {
    pub fn new(counts: bool) -> LearntSpread {
        LearntSpread {
            counts,
            min_kappa: MIN_RELATIVE_ERROR * MIN_RELATIVE_ERROR,
            moments: [0.0; 4],
            samples: 0,
            phi: 1.0,
            kappa: MODEL_ERROR * MODEL_ERROR,
        }
    }

    /// The spread of a count baseline stored before spreads were learnt: its dispersion, and
    /// the fixed model error it was judged with.
    pub fn migrated(dispersion: f64) -> LearntSpread {
        LearntSpread { phi: dispersion.max(1.0), ..LearntSpread::new(true) }
    }

    fn floor(&self) -> f64 {
        if self.counts { 1.0 } else { 0.0 }
    }

    /// The variance of a count whose expectation is `lambda`.
    pub fn variance(&self, lambda: f64) -> f64 {
        let lambda = lambda.max(0.0);
        (self.phi * lambda + self.kappa.max(self.min_kappa) * lambda * lambda).max(1e-12)
    }

    /// Learns one residual `r` of a window expected at `lambda` (> 0); `memory` in windows.
    fn learn(&mut self, lambda: f64, r: f64, memory: f64) {
        let u = r * r / lambda;
        let a = rate(self.samples, memory);
        for (m, v) in self.moments.iter_mut().zip([lambda, lambda * lambda, u, lambda * u]) {
            *m += a * (v - *m);
        }
        self.samples += 1;
        let [ml, mll, mu, mlu] = self.moments;
        let var_l = mll - ml * ml;
        let floor = self.floor();
        // The fit needs λ to have varied (a daily shape); otherwise the noise is taken as a
        // share of the level for continuous values, and as dispersion for counts.
        let (mut phi, mut kappa) = if var_l > (0.1 * ml).powi(2) {
            let kappa = (mlu - ml * mu) / var_l;
            (mu - kappa * ml, kappa)
        } else if self.counts {
            (mu, 0.0)
        } else {
            (0.0, mu / ml.max(1e-300))
        };
        if kappa < 0.0 {
            (phi, kappa) = (mu, 0.0);
        }
        if phi < floor {
            // Through the floor: κ = E[λ(u − φ)] / E[λ²].
            phi = floor;
            kappa = ((mlu - floor * ml) / mll.max(1e-300)).max(0.0);
        }
        self.phi = phi;
        self.kappa = kappa;
    }
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
            spread: LearntSpread::default(),
            weekday_expected: [0.0; 7],
        }
    }
}

/// Hour of day (fractional) and weekday (0 = Monday) of a Unix time in milliseconds.
pub fn calendar(t_ms: i64) -> (f64, usize) {
    let day = t_ms.div_euclid(86_400_000);
    let hour = t_ms.rem_euclid(86_400_000) as f64 / 3_600_000.0;
    (hour, (day + 3).rem_euclid(7) as usize)
}

/// The daily factor at `t_ms`, interpolated between hour midpoints.
fn interpolated(daily: &[f64; 24], t_ms: i64) -> f64 {
    let x = calendar(t_ms).0 - 0.5;
    let h0 = x.floor().rem_euclid(24.0) as usize;
    let f = x - x.floor();
    daily[h0] * (1.0 - f) + daily[(h0 + 1) % 24] * f
}

/// Memories, in time: the level (a day), a daily slot (three hours of its own windows, so
/// three days), a weekly slot (two days of its windows: two weeks), the short factor (a quarter
/// of an hour, at least 4 windows), the dispersion (an hour, at least 100 windows: a variance
/// needs many).
const LEVEL_MEMORY_MS: f64 = DAY_MS;
const DAILY_SLOT_MEMORY_MS: f64 = 3.0 * HOUR_MS;
const WEEKLY_SLOT_MEMORY_MS: f64 = 2.0 * DAY_MS;
/// A weekday's factor is settled (applies) after two hours of that day that expected at least
/// `WEEKDAY_MIN_EXPECTED` counts, or after a whole day; until then the day is expected as the
/// days before it, its windows teach its factor from their counts unclipped, and a rate is
/// judged with `model::UNSETTLED_WEEKDAY`'s allowance.
const WEEKDAY_SETTLE_MS: f64 = 2.0 * HOUR_MS;
pub(crate) const WEEKDAY_MIN_EXPECTED: f64 = 20.0;
/// The counts at a factor of 1 that a weekday's factor starts from.
const WEEKDAY_PRIOR_EXPECTED: f64 = 5.0;
const SHORT_MEMORY_MS: f64 = HOUR_MS / 4.0;
const DISPERSION_MEMORY_MS: f64 = HOUR_MS;

impl CountBaseline {
    /// The seasonal factor at `t_ms` (daily slots interpolated between hour midpoints).
    pub fn season(&self, t_ms: i64, cadence: Cadence) -> f64 {
        interpolated(&self.daily, t_ms) * self.weekly_factor(calendar(t_ms).1, cadence)
    }

    /// A weekday's factor applies once it is settled; before, the day is expected as the days
    /// the level learnt from.
    fn weekly_factor(&self, weekday: usize, cadence: Cadence) -> f64 {
        if self.weekday_settled(weekday, cadence) { self.weekly[weekday] } else { 1.0 }
    }

    /// Whether `weekday`'s factor has been learnt: two hours of that day with at least
    /// `WEEKDAY_MIN_EXPECTED` counts expected, or a whole day.
    pub fn weekday_settled(&self, weekday: usize, cadence: Cadence) -> bool {
        let n = f64::from(self.weekly_n[weekday]);
        n >= cadence.day() as f64
            || (n >= cadence.windows(WEEKDAY_SETTLE_MS, 1.0) && self.weekday_expected[weekday] >= WEEKDAY_MIN_EXPECTED)
    }

    /// Whether the window at `t_ms` is on a weekday whose factor is still being learnt, after
    /// the first day (a pair's first week: each day is new once).
    pub fn unsettled_at(&self, t_ms: i64, cadence: Cadence) -> bool {
        self.windows >= cadence.day() && !self.weekday_settled(calendar(t_ms).1, cadence)
    }

    /// Teaches `weekday`'s factor a window of `x` where the level and daily shape expected
    /// `lambda0`: the factor is the decayed sum of counts over the decayed sum of
    /// expectations, on a prior of `WEEKDAY_PRIOR_EXPECTED` counts at 1. Once every weekday
    /// is settled the factors are kept at a mean of 1, the level taking the difference, so
    /// that no expectation moves.
    fn learn_weekday(&mut self, weekday: usize, x: f64, lambda0: f64, cadence: Cadence) {
        let memory = cadence.windows(WEEKLY_SLOT_MEMORY_MS, 2.0);
        let sum = &mut self.weekday_expected[weekday];
        *sum = *sum * (1.0 - 1.0 / memory) + lambda0;
        let w = &mut self.weekly[weekday];
        *w = (*w + (x - *w * lambda0) / (WEEKDAY_PRIOR_EXPECTED + *sum)).clamp(0.01, 10.0);
        self.weekly_n[weekday] = self.weekly_n[weekday].saturating_add(1);
        if (0..7).all(|d| self.weekday_settled(d, cadence)) {
            let mean = self.weekly.iter().sum::<f64>() / 7.0;
            if mean > 0.0 {
                self.weekly.iter_mut().for_each(|f| *f /= mean);
                self.level *= mean;
            }
        }
    }

    /// Sets what this baseline now expects of the windows that ended at `t_ms` and before it,
    /// latest first (a ring's stored expectations, once `update` said they are stale).
    pub fn reexpect<'a>(&self, latest_first: impl Iterator<Item = &'a mut f64>, t_ms: i64, cadence: Cadence) {
        for (k, e) in latest_first.enumerate() {
            *e = self.expected(t_ms - k as i64 * cadence.window_ms(), cadence);
        }
    }

    /// Expected count in the window at `t_ms`.
    pub fn expected(&self, t_ms: i64, cadence: Cadence) -> f64 {
        self.level * self.season(t_ms, cadence) * self.short
    }

    /// Learns from one window's count; `anomalous` windows teach nothing unless the shift
    /// lasts `adapt_after` windows. True when what the baseline expects has just changed at
    /// once (the first day calibrated it, or a weekday's factor settled): expectations kept
    /// from before are stale.
    pub fn update(&mut self, x: f64, t_ms: i64, anomalous: bool, adapt_after: u32, cadence: Cadence) -> bool {
        let day_windows = cadence.day();
        let season = self.season(t_ms, cadence).max(1e-3);
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
            return false;
        }
        self.shifted = 0;
        self.shift_sum = 0.0;
        // A count's clip is never under Poisson's at one expected: a single request where
        // 0.01 were expected is not an outlier to cut down.
        let sd = self.spread.variance(if self.spread.counts { lambda.max(1.0) } else { lambda }).sqrt();
        let (_, weekday) = calendar(t_ms);
        let unsettled = self.unsettled_at(t_ms, cadence) && self.level > 0.0;
        if unsettled {
            // A day of the week not learnt yet: its windows teach its factor from what they
            // hold, not clipped to what the other days expect.
            let lambda0 = self.level * interpolated(&self.daily, t_ms);
            let cap = (10.0 * lambda0).max(lambda0 + 10.0 * sd);
            self.learn_weekday(weekday, x.min(cap), lambda0, cadence);
        }
        let clipped = if self.windows < 30 { x } else { x.clamp(lambda - 3.0 * sd, lambda + 3.0 * sd).max(0.0) };
        // The level: a running mean at first, then about a day of memory.
        self.level += rate(self.windows, cadence.windows(LEVEL_MEMORY_MS, 4.0)) * (clipped / season - self.level);
        if self.windows >= 30 && self.level > 0.0 {
            let h = calendar(t_ms).0.floor() as usize % 24;
            let weekly_now = self.weekly_factor(weekday, cadence);
            let daily_ratio = (clipped / (self.level * weekly_now)).min(10.0);
            let daily_memory = cadence.windows(DAILY_SLOT_MEMORY_MS, 3.0);
            self.daily[h] += rate(u64::from(self.daily_n[h]), daily_memory) * (daily_ratio - self.daily[h]);
            self.daily_n[h] = self.daily_n[h].saturating_add(1);
            // The weekly shape only once a day has taught the level and the daily shape.
            if self.windows >= day_windows && !unsettled {
                let lambda0 = self.level * season / weekly_now;
                self.learn_weekday(weekday, clipped, lambda0, cadence);
            }
            normalize(&mut self.daily);
            let short_ratio = (clipped / (self.level * self.season(t_ms, cadence)).max(1e-9)).clamp(1.0 / 3.0, 3.0);
            self.short += (short_ratio - self.short) / cadence.windows(SHORT_MEMORY_MS, 4.0);
            if lambda > 0.0 {
                self.spread.learn(lambda, clipped - lambda, cadence.windows(DISPERSION_MEMORY_MS, 100.0));
            }
        }
        if self.windows < day_windows {
            let h = calendar(t_ms).0.floor() as usize % 24;
            self.first_day[h].0 += x;
            self.first_day[h].1 += 1;
        }
        self.windows += 1;
        if self.windows == day_windows {
            self.calibrate_from_first_day();
            return true;
        }
        let settled_now = unsettled && self.weekday_settled(weekday, cadence);
        if settled_now {
            // The weekday's factor now explains what the short factor followed meanwhile.
            self.short = 1.0;
        }
        settled_now
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
    /// The count in units of φ (for a continuous value, φ is the size of one "count") is
    /// negative binomial of size 1/κ: Poisson with the learnt overdispersion, around an
    /// expectation that is itself uncertain by √κ relative (the shapes and the level are
    /// estimates, wrong together for a while). The p-value is the larger (more cautious) of
    /// that exact tail and the normal approximation through the variance-stabilising Anscombe
    /// transform; the exact tail alone is too sure of itself above small means, the
    /// approximation alone far too sure below them.
    pub fn assess(&self, x: f64, expected: f64, threshold_p: f64) -> Assessment {
        let s = &self.spread;
        // κ floored so that the exact tail stays a negative binomial of finite size.
        let (phi, kappa) = (s.phi.max(1e-12), s.kappa.max(s.min_kappa).max(1e-4));
        let (x, expected) = (x.max(0.0) / phi, expected.max(0.0) / phi);
        let zt = z_for_p(threshold_p);
        // Variance over mean of the count in units of φ: 1, plus the expectation's error.
        let spread = 1.0 + kappa * expected;
        let anscombe = |v: f64| (v.max(0.0) + 0.375).sqrt();
        let half = zt * spread.sqrt() / 2.0;
        let lower = phi * ((anscombe(expected) - half).max(0.0).powi(2) - 0.375).max(0.0);
        let upper = phi * ((anscombe(expected) + half).powi(2) - 0.375);
        let high = x > expected;
        let approx = normal_sf((2.0 * (anscombe(x) - anscombe(expected)) / spread.sqrt()).abs());
        let p_value = if expected < 1_000.0 {
            let shape = 1.0 / kappa;
            let exact = if high {
                nb_upper_tail(x.ceil() as u64, expected, shape)
            } else {
                nb_lower_tail(x.floor() as u64, expected, shape)
            };
            exact.max(approx)
        } else {
            approx
        };
        Assessment { p_value: p_value.clamp(0.0, 1.0), high, observed: x * phi, expected: expected * phi, lower, upper }
    }
}

/// Relative error of a count's expectation (the standard deviation of the true rate around
/// it, as a share of it) that a learnt κ starts from.
pub const MODEL_ERROR: f64 = 0.15;

/// The least relative error of a learnt expectation: residuals one window apart cannot show
/// how far the level and shapes are off together (a series smooth from one window to the
/// next still moves by this much from day to day), so a change within it is never an anomaly
/// however smooth the series.
pub const MIN_RELATIVE_ERROR: f64 = MODEL_ERROR;

fn normalize<const N: usize>(v: &mut [f64; N]) {
    let mean = v.iter().sum::<f64>() / N as f64;
    if mean > 0.0 {
        for x in v.iter_mut() {
            *x /= mean;
        }
    }
}

/// A ratio (errors, denials, rate limits over requests), learned as decayed sums of events
/// and requests on top of a prior of `PRIOR_RATIO` over `PRIOR_REQUESTS` requests: the
/// learnt ratio is Beta(events + 0.02, non-events + 19.98). A window is judged by the
/// beta-binomial that follows from it, widened by the over-dispersion the pair's own windows
/// show (`RatioSpread`): a ratio learnt from a few hundred requests is as uncertain as it is,
/// a pair's first requests are its own normal (at 10 % errors from the first request, the
/// learnt ratio is 9.4 % after 330 requests; a prior of 500 requests made it 4 %), and a pair
/// whose errors come in clusters is not paged for its clusters.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RatioBaseline {
    pub events: f64,
    pub total: f64,
    /// Anomalous windows in a row: past `adapt_after` they teach again (a lasting shift).
    pub shifted: u32,
    /// Not in this layout: stored in the model's trailer (see `PairModel::to_bytes`).
    #[serde(skip)]
    pub spread: RatioSpread,
    /// Hot windows that started no detection yet, with their age in windows: they teach once
    /// old enough to be sure they started none (`Lesson::Hot`). Not stored: a restart loses
    /// at most a few windows' lessons.
    #[serde(skip)]
    deferred: Vec<(f64, f64, u32)>,
}

/// What one window of a ratio may teach its baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lesson {
    /// An ordinary window: it teaches.
    Normal,
    /// A hot window that started no detection (yet): it teaches `n` windows later if none
    /// started by then. Events that come in clusters are a pair's ordinary spread, which its
    /// over-dispersion must learn; a window kept out for being hot would teach that clusters
    /// never happen.
    Hot { n: u32 },
    /// A window of an active detection: it does not teach (and the hot windows before it,
    /// its start, never will).
    Detecting,
    /// Not hot, but part of a rise that a longer span finds suspect: it teaches the spread,
    /// but the level only if the rise lasts (`adapt_after` windows in a row), so that a slow
    /// burst is judged before it is learnt.
    Suspect,
}

/// The ratio a pair is assumed to have before its requests say otherwise (0.1 %)...
pub const PRIOR_RATIO: f64 = 0.001;
/// ...weighing as much as this many of its requests.
pub const PRIOR_REQUESTS: f64 = 20.0;

/// How much more a ratio's windows vary than a binomial's: the intra-window correlation ρ of
/// a beta-binomial, `var(events) = n·p·q·(1 + (n − 1)·ρ)`. Learnt over about a day of windows
/// as `Σ((e − n·p)² − n·p·q) / Σ(n − 1)·n·p·q` (each window weighs by its binomial variance,
/// so that the many windows of a low ratio that hold no event do not drown the few that show
/// its clusters), less one standard error, with `PRIOR_PAIRS` of binomial evidence before any
/// window (the first events of a pair that never erred do not make it over-dispersed at once).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RatioSpread {
    /// Decayed means of `x = (n − 1)·n·p·q`, `y = (e − n·p)² − n·p·q` and `y²`.
    moments: [f64; 3],
    samples: u64,
    pub rho: f64,
}

/// The most over-dispersion learnt: errors that come all at once or not at all are a signal
/// of a kind the ratio cannot judge.
const MAX_RHO: f64 = 0.5;

/// The binomial evidence a ratio's spread starts from, in units of `x` (about the expected
/// number of pairs of events within windows): a pair needs at least this much traffic at its
/// ratio before its own windows set ρ.
const PRIOR_PAIRS: f64 = 30.0;

impl RatioSpread {
    /// A spread stored before its moments were weighted (`TRAILER_MAGIC_V3`): its ρ, taken as
    /// a day of evidence once the next window gives it a scale.
    pub fn migrated(rho: f64) -> RatioSpread {
        RatioSpread { moments: [0.0; 3], samples: 0, rho: rho.clamp(0.0, MAX_RHO) }
    }

    fn learn(&mut self, n: f64, e: f64, p: f64, memory: f64) {
        if n < 2.0 || p <= 0.0 || p >= 1.0 {
            return;
        }
        let v = n * p * (1.0 - p);
        let (x, y) = ((n - 1.0) * v, ((e - n * p).powi(2) - v).min(1e6 * v));
        if self.samples == 0 && self.rho > 0.0 {
            // Migrated (`migrated`): the ρ learnt before stands for a day of windows like this one.
            self.moments = [x, self.rho * x, (self.rho * x).powi(2)];
            self.samples = memory as u64;
        }
        let a = rate(self.samples, memory);
        for (m, v) in self.moments.iter_mut().zip([x, y, y * y]) {
            *m += a * (v - *m);
        }
        self.samples += 1;
        let [mx, my, myy] = self.moments;
        let n_eff = (self.samples as f64).min(memory);
        let mx = mx + PRIOR_PAIRS / n_eff;
        // One standard error below the estimate: rare events make `y` very noisy, and an
        // estimate held far below the truth pages on every cluster (too wide a band only
        // costs a later detection).
        let se = ((myy - my * my).max(0.0) / n_eff).sqrt() / mx;
        self.rho = (my / mx - se).clamp(0.0, MAX_RHO);
    }
}

impl RatioBaseline {
    pub fn expected(&self) -> f64 {
        let (a, b) = self.beta();
        a / (a + b)
    }

    /// The learnt ratio as a Beta distribution's (a, b).
    fn beta(&self) -> (f64, f64) {
        let events = self.events.clamp(0.0, self.total.max(0.0));
        (events + PRIOR_RATIO * PRIOR_REQUESTS, self.total.max(0.0) - events + (1.0 - PRIOR_RATIO) * PRIOR_REQUESTS)
    }

    pub fn update(&mut self, events: f64, total: f64, lesson: Lesson, adapt_after: u32, cadence: Cadence) {
        let memory = cadence.windows(RATIO_MEMORY_MS, 4.0);
        let keep = 1.0 - 1.0 / memory;
        let anomalous = lesson != Lesson::Normal;
        self.shifted = if anomalous { self.shifted.saturating_add(1) } else { 0 };
        let teaches = self.shifted == 0 || self.shifted >= adapt_after;
        match lesson {
            Lesson::Detecting => self.deferred.clear(),
            // Bounded: a detection clears them, and they teach once `n` windows old.
            Lesson::Hot { n } if !teaches && self.deferred.len() < 32 => self.deferred.push((events, total, n)),
            _ => {}
        }
        // The hot windows old enough to be sure they started nothing.
        let due: Vec<(f64, f64)> = {
            let mut due = Vec::new();
            self.deferred.retain_mut(|(e, t, left)| {
                *left = left.saturating_sub(1);
                let ready = *left == 0 && lesson != Lesson::Detecting;
                if ready {
                    due.push((*e, *t));
                }
                !ready
            });
            due
        };
        // A suspect window teaches the spread at once (clusters are what it must learn) and
        // the level only if the rise lasts.
        if teaches || lesson == Lesson::Suspect {
            self.spread.learn(total, events, self.expected(), memory);
        }
        for &(e, t) in &due {
            self.spread.learn(t, e, self.expected(), memory);
        }
        self.events *= keep;
        self.total *= keep;
        if teaches {
            self.events += events;
            self.total += total;
        }
        for (e, t) in due {
            self.events += e;
            self.total += t;
        }
    }

    /// `events` of `total` against the learned ratio: beta-binomial upper tail (only an
    /// increase is an anomaly). `pairs` is Σ n·(n − 1) over the windows summed (their
    /// requests `n`), which says how much of the learnt over-dispersion the sum carries.
    pub fn assess(&self, events: u64, total: u64, pairs: f64, threshold_p: f64) -> Option<Assessment> {
        if total == 0 {
            return None;
        }
        let (a, b) = self.beta();
        let p0 = a / (a + b);
        let n = total as f64;
        // The variance over the binomial's: the learnt ratio's own uncertainty, and the
        // windows' over-dispersion (a sum of windows of n_i requests: 1 + ρ·Σ n_i(n_i − 1) / N).
        let inflation = 1.0 + (n - 1.0) / (a + b + 1.0) + self.spread.rho * pairs.max(0.0) / n;
        let sd = (p0 * (1.0 - p0) / n * inflation).sqrt();
        let p_value = if total <= 20_000 {
            // The beta-binomial of that variance: concentration c with (n − 1)/(c + 1) = inflation − 1.
            let c = if n > 1.0 { ((n - 1.0) / (inflation - 1.0).max(1e-12) - 1.0).max(1e-6) } else { a + b };
            beta_binomial_upper_tail(events, total, p0 * c, (1.0 - p0) * c)
        } else {
            normal_sf((events as f64 / n - p0) / sd)
        };
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

/// The fewest values a latency level remembers, however many windows each was pooled from.
const POOLED_MEMORY: f64 = 100.0;

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
        cadence: Cadence,
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
        // The memory is in time: a value pooled from `span` windows counts for all of them,
        // but it holds at least `POOLED_MEMORY` such values (each a quantile of few requests:
        // fewer would learn a shift before it is significant).
        let windows = cadence.windows(LATENCY_MEMORY_MS, 30.0);
        let memory = (windows / f64::from(span.max(1))).max(windows.min(POOLED_MEMORY));
        let a = rate(self.windows, memory);
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
    pub fn update(&mut self, bytes: f64, flows: f64, anomalous: bool, cadence: Cadence) {
        if flows <= 0.0 || anomalous {
            return;
        }
        let per_flow = bytes / flows;
        let a = rate(self.windows, cadence.windows(BYTES_MEMORY_MS, 30.0));
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
pub(crate) mod tests {
    use super::*;

    const W: i64 = 10_000;

    #[test]
    fn a_hot_ratio_window_teaches_later_unless_it_starts_a_detection() {
        let cadence = Cadence::default();
        let quiet = |b: &mut RatioBaseline, windows: usize| {
            for _ in 0..windows {
                b.update(0.0, 50.0, Lesson::Normal, 360, cadence);
            }
        };
        let mut b = RatioBaseline::default();
        quiet(&mut b, 1_000);
        let before = b.events;
        // A cluster that starts nothing: it is learnt three windows later.
        b.update(10.0, 50.0, Lesson::Hot { n: 3 }, 360, cadence);
        quiet(&mut b, 1);
        assert!(b.events < before + 1.0, "taught at once: {} → {}", before, b.events);
        quiet(&mut b, 2);
        assert!(b.events > before + 9.0, "not taught: {} → {}", before, b.events);
        // A cluster that starts a detection never is, nor are the detection's windows.
        let before = b.events;
        b.update(10.0, 50.0, Lesson::Hot { n: 3 }, 360, cadence);
        b.update(10.0, 50.0, Lesson::Detecting, 360, cadence);
        quiet(&mut b, 5);
        assert!(b.events < before, "{before} → {}", b.events);
    }

    #[test]
    fn scales_are_the_same_spans_of_time_at_any_window_length() {
        let scales = |window_ms: i64| Cadence::of(window_ms).scales(30).collect::<Vec<_>>();
        assert_eq!(scales(10_000), [1, 3, 4, 6, 12, 30]);
        assert_eq!(scales(60_000), [1, 2, 5]);
        assert_eq!(scales(300_000), [1]);
        assert_eq!(scales(3_600_000), [1]);
        // Five-second windows would need a ring of 60 for five minutes: the ring's 30 is the limit.
        assert_eq!(scales(5_000), [1, 6, 8, 12, 24]);
        assert_eq!((Cadence::of(60_000).count(600_000), Cadence::of(3_600_000).count(600_000)), (10, 1));
    }

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
            let a = b.assess(30.0, b.expected(t, Cadence::default()), 1e-6);
            assert!(i < 30 || a.p_value > 0.01, "window {i}: {a:?}");
            b.update(30.0, t, false, 360, Cadence::default());
        }
        assert!((b.expected(2_000 * W, Cadence::default()) - 30.0).abs() < 0.5);
    }

    #[test]
    fn a_surge_is_surprising_and_does_not_teach() {
        let mut b = CountBaseline::default();
        for i in 0..1_000 {
            b.update(30.0, i * W, false, 360, Cadence::default());
        }
        let before = b.level;
        let a = b.assess(90.0, b.expected(1_000 * W, Cadence::default()), 1e-6);
        assert!(a.high && a.p_value < 1e-6, "{a:?}");
        b.update(90.0, 1_000 * W, true, 360, Cadence::default());
        assert_eq!(b.level, before);
        let drop = b.assess(0.0, 6.0 * b.expected(0, Cadence::default()), 1e-6);
        assert!(!drop.high && drop.p_value < 1e-6, "{drop:?}");
    }

    #[test]
    fn a_lasting_shift_is_adopted() {
        let mut b = CountBaseline::default();
        for i in 0..500 {
            b.update(10.0, i * W, false, 360, Cadence::default());
        }
        for i in 500..860 {
            b.update(40.0, i * W, true, 360, Cadence::default());
        }
        let expected = b.expected(860 * W, Cadence::default());
        assert!((expected - 40.0).abs() < 1.0, "{expected}");
    }

    #[test]
    fn three_errors_in_four_requests_at_night_are_not_an_error_burst() {
        let mut r = RatioBaseline::default();
        for _ in 0..10_000 {
            r.update(1.0, 1_000.0, Lesson::Normal, 360, Cadence::default());
        }
        // Large samples: 5 % of 1,000 against 0.1 % is overwhelming.
        assert!(r.assess(50, 1_000, 999_000.0, 1e-6).expect("requests").p_value < 1e-20);
        // 3 of 4 is improbable under 0.1 %, but only at the level a multi-window rule and an
        // absolute minimum must weigh: the p-value is still far from zero.
        let small = r.assess(3, 4, 12.0, 1e-6).expect("requests");
        assert!(small.p_value > 1e-9, "{small:?}");
        assert!(r.assess(0, 0, 0.0, 1e-6).is_none());
    }

    #[test]
    fn latency_doubling_is_seen_in_log_space() {
        let mut l = LatencyBaseline::default();
        let base = (20_000f64).ln();
        for i in 0..1_000 {
            let jitter = ((i * 7919) % 100) as f64 / 100.0 * 0.1 - 0.05;
            l.update(0.5, base + jitter, 100.0, Some(0.5), false, 1, 360, Cadence::default());
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
            b.update(-2_000.0 * (1.0 - u).ln(), 1.0, false, Cadence::default());
        }
        // A 25 kB response in a window of two (a 1-in-100,000 draw) is not past 1e-6.
        let a = b.assess(25_000.0, 2.0, 1e-6).expect("flows");
        assert!(a.p_value > 1e-6, "{a:?}");
    }

    #[test]
    fn bytes_twenty_fold_is_seen() {
        let mut b = BytesBaseline::default();
        for i in 0..1_000 {
            b.update(300.0 * 10.0 + (i % 7) as f64 * 50.0, 10.0, false, Cadence::default());
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
            b.update(shape(t), t, false, 360, Cadence::default());
        }
        let t_morning = 7 * 86_400_000 + 6 * 3_600_000;
        let t_evening = 7 * 86_400_000 + 18 * 3_600_000;
        let ratio = b.season(t_evening, Cadence::default()) / b.season(t_morning, Cadence::default());
        assert!((3.2..4.8).contains(&ratio), "evening over morning {ratio}");
        // The expectation's mean over a day is the series', 25.
        let t = |h: i64| 6 * 86_400_000 + h * 3_600_000 + 1_800_000;
        let mean = (0..24).map(|h| b.level * b.season(t(h), Cadence::default())).sum::<f64>() / 24.0;
        assert!((mean - 25.0).abs() < 4.0, "{mean}");
    }

    /// Deterministic draws for the tests: xorshift uniforms, Poisson by inversion (normal
    /// approximation above 50), binomial by counting, and clustered counts `s · Poisson(λ / s)`
    /// whose variance is `s` times their mean.
    pub(crate) struct Draws(pub(crate) u64);

    impl Draws {
        pub(crate) fn binomial(&mut self, n: u64, p: f64) -> f64 {
            (0..n).filter(|_| self.uniform() < p).count() as f64
        }

        pub(crate) fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        pub(crate) fn normal(&mut self) -> f64 {
            (-2.0 * self.uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
        }

        /// Gamma of shape `a` (Marsaglia and Tsang; below 1 by boosting the shape).
        fn gamma(&mut self, a: f64) -> f64 {
            if a < 1.0 {
                return self.gamma(a + 1.0) * self.uniform().powf(1.0 / a);
            }
            let d = a - 1.0 / 3.0;
            let c = 1.0 / (9.0 * d).sqrt();
            loop {
                let x = self.normal();
                let v = (1.0 + c * x).powi(3);
                if v > 0.0 && self.uniform().ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                    return d * v;
                }
            }
        }

        pub(crate) fn beta(&mut self, a: f64, b: f64) -> f64 {
            let (x, y) = (self.gamma(a), self.gamma(b));
            if x + y > 0.0 { x / (x + y) } else { a / (a + b) }
        }

        pub(crate) fn poisson(&mut self, lambda: f64) -> f64 {
            if lambda > 50.0 {
                let z = self.normal();
                return (lambda + z * lambda.sqrt()).round().max(0.0);
            }
            let (mut k, mut p, mut cdf, u) = (0.0, (-lambda).exp(), (-lambda).exp(), self.uniform());
            while u > cdf && k < 1_000.0 {
                k += 1.0;
                p *= lambda / k;
                cdf += p;
            }
            k
        }

        fn clustered(&mut self, lambda: f64, dispersion: f64) -> f64 {
            dispersion * self.poisson(lambda / dispersion)
        }
    }

    /// A baseline whose spread is all learnt (no floor on κ).
    fn learnt(counts: bool) -> CountBaseline {
        let spread = LearntSpread { min_kappa: 0.0, ..LearntSpread::new(counts) };
        CountBaseline { spread, ..CountBaseline::default() }
    }

    #[test]
    fn the_learnt_dispersion_is_the_traffics_and_widens_the_band() {
        let cadence = Cadence::of(60_000);
        let mut uppers = Vec::new();
        for d in [1.0, 5.0, 25.0] {
            let mut draws = Draws(0x9e37_79b9_7f4a_7c15);
            let mut b = learnt(true);
            for i in 0..(3 * 1_440) {
                let t = i * 60_000;
                let x = draws.clustered(100.0, d);
                let hot = i >= 1_440 && b.assess(x, b.expected(t, cadence), 1e-6).p_value < 1e-6;
                b.update(x, t, hot, 1_440, cadence);
            }
            let var_over_mean = b.spread.variance(100.0) / 100.0;
            assert!((var_over_mean / d - 1.0).abs() < 0.35, "dispersion {d}: learnt {var_over_mean}");
            let t = 3 * 86_400_000;
            let a = b.assess(100.0, b.expected(t, cadence), 1e-6);
            uppers.push(a.upper - a.expected);
        }
        // Bands grow as the square root of the dispersion: 5× burstier, √5 × wider.
        assert!(uppers[0] < uppers[1] && uppers[1] < uppers[2], "{uppers:?}");
        assert!((uppers[1] / uppers[0] / 5f64.sqrt() - 1.0).abs() < 0.35, "{uppers:?}");
    }

    #[test]
    fn a_deviation_of_one_size_is_flagged_less_often_as_the_dispersion_grows() {
        let cadence = Cadence::of(60_000);
        let mut flagged = Vec::new();
        for d in [1.0, 4.0, 16.0] {
            let mut draws = Draws(7);
            let mut b = learnt(true);
            let mut hits = 0;
            for i in 0..(4 * 1_440) {
                let t = i * 60_000;
                // Every 97th minute of the last three days is 60 % above the normal 50.
                let surge = i >= 1_440 && i % 97 == 0;
                let x = draws.clustered(if surge { 80.0 } else { 50.0 }, d);
                let p = b.assess(x, b.expected(t, cadence), 1e-6).p_value;
                hits += usize::from(surge && p < 1e-3);
                // Learning for the first day, as the detector's warm-up.
                b.update(x, t, i >= 1_440 && p < 1e-6, 1_440, cadence);
            }
            flagged.push(hits);
        }
        assert!(flagged[0] > flagged[1] && flagged[1] > flagged[2], "{flagged:?}");
        // Under Poisson, a surge of 60 % on 50 is seen most of the time.
        assert!(flagged[0] > 20, "{flagged:?}");
    }

    #[test]
    fn the_same_traffic_at_10_s_and_60_s_windows_is_learnt_alike() {
        // Three days of a daily shape (quiet nights), as 10 s windows and as their sums over
        // a minute: the expected rate per second, the level per second and the daily shape
        // agree, and a surge ×3 for ten minutes is seen at both resolutions.
        let (fine, coarse) = (Cadence::of(10_000), Cadence::of(60_000));
        let rate_per_s = |t: i64| if calendar(t).0 < 8.0 { 0.5 } else { 2.0 };
        let (mut b10, mut b60) = (CountBaseline::default(), CountBaseline::default());
        let mut draws = Draws(11);
        let mut minute = 0.0;
        for i in 0..(3 * 8_640) {
            let t = i * 10_000;
            let x = draws.poisson(rate_per_s(t) * 10.0);
            b10.update(x, t, false, 360, fine);
            minute += x;
            if i % 6 == 5 {
                b60.update(minute, t - 50_000, false, 60, coarse);
                minute = 0.0;
            }
        }
        let day3 = 3 * 86_400_000;
        for hour in [3, 12, 20] {
            let t = day3 + hour * 3_600_000;
            let (e10, e60) = (b10.expected(t, fine) / 10.0, b60.expected(t, coarse) / 60.0);
            assert!((e10 / e60 - 1.0).abs() < 0.1, "hour {hour}: {e10} per s against {e60}");
        }
        assert!((b10.level / 10.0 / (b60.level / 60.0) - 1.0).abs() < 0.1);
        let t = day3 + 12 * 3_600_000;
        let surge10 = b10.assess(60.0 * 10.0, 10.0 * b10.expected(t, fine), 1e-6);
        let surge60 = b60.assess(60.0 * 10.0, 10.0 * b60.expected(t, coarse), 1e-6);
        assert!(surge10.p_value < 1e-6 && surge60.p_value < 1e-6, "{surge10:?} {surge60:?}");
    }

    #[test]
    fn over_dispersed_traffic_without_incidents_pages_nothing_in_a_week() {
        // A week of minutes, 5× burstier than Poisson, with a daily shape (nights at a fifth
        // of the afternoon's peak): after the day of learning, no minute reaches the threshold.
        let cadence = Cadence::of(60_000);
        let mut draws = Draws(0x2545_f491_4f6c_dd1d);
        let mut b = learnt(true);
        let mut paged = Vec::new();
        for i in 0..(7 * 1_440) {
            let t = i * 60_000;
            let lambda = 120.0 - 80.0 * (calendar(t).0 / 24.0 * std::f64::consts::TAU).cos();
            let x = draws.clustered(lambda, 5.0);
            let p = b.assess(x, b.expected(t, cadence), 1e-6).p_value;
            let hot = i >= 1_440 && p < 1e-6;
            if hot {
                paged.push((i, x));
            }
            b.update(x, t, hot, 1_440, cadence);
        }
        assert!(paged.is_empty(), "{paged:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// With any learnt spread, a larger deviation is never less surprising, p-values are
        /// in [0, 1] and bands hold the expectation.
        #[test]
        fn learnt_tails_are_finite_and_ordered(
            phi in 0.001f64..100.0,
            kappa in 0.0f64..1.0,
            expected in 0.0f64..1e7,
            steps in proptest::collection::vec(0.0f64..3.0, 1..8),
            counts in proptest::bool::ANY,
        ) {
            let mut spread = LearntSpread::new(counts);
            spread.phi = phi;
            spread.kappa = kappa;
            let b = CountBaseline { spread, ..CountBaseline::default() };
            let mut x = expected;
            let mut last_p = 1.0;
            for step in steps {
                x += step * (expected.sqrt() + 1.0);
                let a = b.assess(x, expected, 1e-6);
                proptest::prop_assert!(a.p_value.is_finite() && (0.0..=1.0).contains(&a.p_value), "{a:?}");
                proptest::prop_assert!(a.lower <= a.expected + 1e-9 && a.expected <= a.upper + 1e-9, "{a:?}");
                proptest::prop_assert!(a.p_value <= last_p + 1e-12, "{x} after p {last_p}: {a:?}");
                last_p = a.p_value;
            }
        }
    }
}
