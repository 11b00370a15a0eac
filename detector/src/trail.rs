//! The last hours of each pair's signals, for the web UI's pair page: per minute (or per
//! window, when windows are longer), what was observed against the band expected, from the
//! window of that minute that deviated most. Held in memory only, for a bounded number of
//! pairs: it is a view, not something detection reads or a restart must keep.

use std::collections::{HashMap, VecDeque};

use meshwatch_collector::window::PairKey;
use serde::Serialize;

use crate::anomaly::in_units;
use crate::model::{Signal, Verdict};

/// How far back a trail reaches.
pub const TRAIL_SPAN_MS: i64 = 3 * 3_600_000;
/// The shortest step between two points of a trail.
pub const TRAIL_STEP_MS: i64 = 60_000;
/// Pairs with a trail: about 32 KiB each at one-minute points. Beyond this, a pair gets one
/// only when a detection starts on it, in place of the trail that has gone longest without a
/// hot window.
pub const TRAIL_PAIRS: usize = 1_000;

/// One signal at one point, in the signal's unit (per second for rates and bytes, a ratio,
/// seconds for latency), as `in_units` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TrailValue {
    pub observed: f32,
    pub expected: f32,
    pub lower: f32,
    pub upper: f32,
}

#[derive(Clone, Debug)]
struct Point {
    start_ms: i64,
    values: [Option<TrailValue>; Signal::CORE],
    /// Bit `i`: signal `i` was hot in a window of the point.
    hot: u16,
}

#[derive(Debug)]
struct Trail {
    points: VecDeque<Point>,
    /// The tail probability of each signal's kept value in the newest point: a later window
    /// of the same point replaces it when it deviates more.
    best_p: [f64; Signal::CORE],
    /// Start of the last hot window (`i64::MIN` for none).
    last_hot_ms: i64,
}

/// The trails of the pairs, bounded in pairs and in time.
#[derive(Debug)]
pub struct Trails {
    trails: HashMap<PairKey, Trail>,
    step_ms: i64,
    points: usize,
    max_pairs: usize,
}

impl Trails {
    pub fn new(window_ms: i64, max_pairs: usize) -> Trails {
        let step_ms = window_ms.max(TRAIL_STEP_MS);
        let points = usize::try_from((TRAIL_SPAN_MS / step_ms).max(1)).unwrap_or(1);
        Trails { trails: HashMap::new(), step_ms, points, max_pairs }
    }

    pub fn step_ms(&self) -> i64 {
        self.step_ms
    }

    /// Adds the verdicts of one scored window of `key` (started at `start_ms`). `fired`: a
    /// detection started on the pair in this window.
    pub fn record(&mut self, key: &PairKey, start_ms: i64, verdicts: &[Verdict], fired: bool, window_ms: i64) {
        if verdicts.iter().all(|v| v.signal.is_upstream()) {
            return;
        }
        if !self.trails.contains_key(key) {
            if self.trails.len() >= self.max_pairs {
                if !fired {
                    return;
                }
                let coldest = self.trails.iter().min_by_key(|(_, t)| t.last_hot_ms).map(|(k, _)| k.clone());
                if let Some(k) = coldest {
                    self.trails.remove(&k);
                }
            }
            let trail = Trail { points: VecDeque::new(), best_p: [f64::INFINITY; Signal::CORE], last_hot_ms: i64::MIN };
            self.trails.insert(key.clone(), trail);
        }
        let Some(trail) = self.trails.get_mut(key) else { return };
        let point_start = start_ms.div_euclid(self.step_ms) * self.step_ms;
        if trail.points.back().is_none_or(|p| p.start_ms < point_start) {
            if trail.points.len() == self.points {
                trail.points.pop_front();
            }
            trail.points.push_back(Point { start_ms: point_start, values: [None; Signal::CORE], hot: 0 });
            trail.best_p = [f64::INFINITY; Signal::CORE];
        }
        let Some(point) = trail.points.back_mut() else { return };
        if point.start_ms != point_start {
            // A window older than the newest point (not produced by the detector).
            return;
        }
        for v in verdicts.iter().filter(|v| !v.signal.is_upstream()) {
            let i = v.signal.index();
            if v.hot {
                point.hot |= 1 << i;
                trail.last_hot_ms = start_ms;
            }
            if v.assessment.p_value <= trail.best_p[i] {
                trail.best_p[i] = v.assessment.p_value;
                let (observed, expected, lower, upper) = in_units(v, window_ms);
                point.values[i] = Some(TrailValue {
                    observed: observed as f32,
                    expected: expected as f32,
                    lower: lower as f32,
                    upper: upper as f32,
                });
            }
        }
    }

    /// The trail of `key`, oldest point first: per signal that has any point, its points.
    pub fn view(&self, key: &PairKey) -> TrailView {
        let mut signals: Vec<SignalTrail> = Vec::new();
        if let Some(trail) = self.trails.get(key) {
            for s in Signal::ALL.into_iter().filter(|s| !s.is_upstream()) {
                let i = s.index();
                let points: Vec<TrailPoint> = trail
                    .points
                    .iter()
                    .filter_map(|p| {
                        p.values[i].map(|value| TrailPoint { start_ms: p.start_ms, value, hot: p.hot & (1 << i) != 0 })
                    })
                    .collect();
                if !points.is_empty() {
                    signals.push(SignalTrail { signal: s.as_str(), unit: unit(s), points });
                }
            }
        }
        TrailView { step_ms: self.step_ms, signals }
    }

    pub fn forget(&mut self, key: &PairKey) {
        self.trails.remove(key);
    }

    /// Pairs with a trail.
    pub fn len(&self) -> usize {
        self.trails.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trails.is_empty()
    }
}

fn unit(s: Signal) -> &'static str {
    match s {
        Signal::LatencyP50 | Signal::LatencyP90 | Signal::LatencyP99 => "seconds",
        Signal::ErrorRatio | Signal::DenialRatio | Signal::RateLimitRatio => "ratio",
        Signal::BytesOut | Signal::BytesIn => "bytes/s",
        _ => "per second",
    }
}

/// `GET /api/v1/pairs/{id}/trail`.
#[derive(Debug, Serialize)]
pub struct TrailView {
    /// Milliseconds between points.
    pub step_ms: i64,
    pub signals: Vec<SignalTrail>,
}

#[derive(Debug, Serialize)]
pub struct SignalTrail {
    pub signal: &'static str,
    pub unit: &'static str,
    pub points: Vec<TrailPoint>,
}

#[derive(Debug, Serialize)]
pub struct TrailPoint {
    pub start_ms: i64,
    #[serde(flatten)]
    pub value: TrailValue,
    /// A window of the point was hot on this signal.
    pub hot: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::Assessment;
    use meshwatch_collector::flow::{Direction, Reporter};
    use std::sync::Arc;

    fn key(n: usize) -> PairKey {
        PairKey {
            source: Arc::from(format!("s{n}")),
            destination: Arc::from("d"),
            direction: Direction::EastWest,
            reporter: Reporter::Source,
        }
    }

    fn verdict(signal: Signal, observed: f64, p_value: f64, hot: bool) -> Verdict {
        let assessment = Assessment { p_value, high: true, observed, expected: 10.0, lower: 5.0, upper: 15.0 };
        Verdict { signal, assessment, scale: 1, hot, sustained: false, kind: "test" }
    }

    #[test]
    fn a_point_keeps_the_window_of_its_minute_that_deviated_most() {
        let mut t = Trails::new(10_000, 10);
        let k = key(0);
        for (i, (obs, p)) in [(11.0, 0.4), (30.0, 1e-9), (12.0, 0.3)].into_iter().enumerate() {
            t.record(&k, i as i64 * 10_000, &[verdict(Signal::RequestRate, obs, p, p < 1e-6)], false, 10_000);
        }
        t.record(&k, 60_000, &[verdict(Signal::RequestRate, 10.0, 0.5, false)], false, 10_000);
        let v = t.view(&k);
        assert_eq!(v.step_ms, 60_000);
        let points = &v.signals[0].points;
        assert_eq!(points.len(), 2);
        // Per second over a 10 s window.
        assert_eq!((points[0].start_ms, points[0].value.observed, points[0].hot), (0, 3.0, true));
        assert_eq!((points[1].start_ms, points[1].hot), (60_000, false));
    }

    #[test]
    fn trails_reach_back_three_hours_and_no_further() {
        let mut t = Trails::new(10_000, 10);
        let k = key(0);
        for i in 0..(4 * 360) {
            t.record(&k, i * 10_000, &[verdict(Signal::LatencyP50, 1e4, 0.5, false)], false, 10_000);
        }
        let points = &t.view(&k).signals[0].points;
        assert_eq!(points.len(), 180);
        assert_eq!(points[0].start_ms, 3_600_000);
        assert_eq!(t.view(&k).signals[0].unit, "seconds");
    }

    #[test]
    fn beyond_the_cap_only_a_detection_takes_the_place_of_the_coldest_trail() {
        let mut t = Trails::new(10_000, 2);
        let quiet = verdict(Signal::RequestRate, 10.0, 0.5, false);
        let hot = verdict(Signal::RequestRate, 90.0, 1e-12, true);
        t.record(&key(0), 0, &[quiet], false, 10_000);
        t.record(&key(1), 0, &[hot], false, 10_000);
        t.record(&key(2), 10_000, &[quiet], false, 10_000);
        assert_eq!(t.len(), 2);
        assert!(t.view(&key(2)).signals.is_empty());
        t.record(&key(2), 20_000, &[hot], true, 10_000);
        assert_eq!(t.len(), 2);
        assert!(t.view(&key(0)).signals.is_empty(), "the trail never hot made room");
        assert!(!t.view(&key(1)).signals.is_empty() && !t.view(&key(2)).signals.is_empty());
    }
}
