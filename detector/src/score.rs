//! Scoring every pair in every closed window: a known pair with no traffic is scored as a
//! zero, not skipped (vanished traffic is an anomaly); windows the mesh left empty are filled
//! with zeros; detections become anomalies.

use std::collections::HashMap;
use std::sync::Arc;

use meshwatch_collector::flow::{Direction, Reporter};
use meshwatch_collector::window::{ClosedWindow, PairKey, PairStats};

use crate::alert::{AlertConfig, Alerts, Silence};
use crate::anomaly::Anomalies;
use crate::model::{DetectorConfig, Obs, PairModel, Signal};
use crate::trail::{TRAIL_PAIRS, Trails};
use crate::trust::{Trust, TrustConfig};
use crate::upstream::UpstreamObs;

/// A gap longer than this (a restart, a stalled collector) is not filled with zeros: the
/// pairs were not observed, which is not the same as silent.
pub const MAX_GAP_MS: i64 = 3_600_000;

/// Event time between checkpoints of the models to the store (at least a window).
pub const CHECKPOINT_MS: i64 = 600_000;

#[derive(Debug)]
pub struct Detector {
    pub cfg: DetectorConfig,
    pub window_ms: i64,
    models: HashMap<PairKey, PairModel>,
    pub anomalies: Anomalies,
    /// Zero-trust findings (they go to `anomalies` too).
    pub trust: Trust,
    /// Alerts on the anomalies and findings, the silences that hold them back, and how.
    pub alerts: Alerts,
    pub silences: Vec<Silence>,
    pub alert_cfg: AlertConfig,
    /// Start of the last window scored.
    pub last_start_ms: Option<i64>,
    since_checkpoint: u32,
    /// The last hours of the pairs' signals, for the web UI (not persisted).
    pub trails: Trails,
}

/// What processing one closed window did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    pub windows_scored: u32,
    pub anomalies_started: u32,
    pub anomalies_ended: u32,
    pub checkpoint_due: bool,
}

impl Detector {
    pub fn new(cfg: DetectorConfig, window_ms: i64) -> Detector {
        Detector {
            cfg,
            window_ms,
            models: HashMap::new(),
            anomalies: Anomalies::default(),
            trust: Trust::new(TrustConfig::default()),
            alerts: Alerts::default(),
            silences: Vec::new(),
            alert_cfg: AlertConfig::default(),
            last_start_ms: None,
            since_checkpoint: 0,
            trails: Trails::new(window_ms, TRAIL_PAIRS),
        }
    }

    /// A detector holding what a checkpoint saved.
    pub fn restore(
        cfg: DetectorConfig,
        window_ms: i64,
        models: impl IntoIterator<Item = (PairKey, PairModel)>,
        anomalies: Anomalies,
        trust: Trust,
        last_start_ms: Option<i64>,
    ) -> Detector {
        let mut d = Detector {
            models: models.into_iter().collect(),
            anomalies,
            trust,
            last_start_ms,
            ..Detector::new(cfg, window_ms)
        };
        d.resume_detections();
        d
    }

    pub fn models(&self) -> impl Iterator<Item = (&PairKey, &PairModel)> {
        self.models.iter()
    }

    pub fn model(&self, key: &PairKey) -> Option<&PairModel> {
        self.models.get(key)
    }

    /// Scores a closed window (and the empty windows before it).
    pub fn process(&mut self, w: &ClosedWindow) -> Processed {
        let mut done = Processed::default();
        if self.last_start_ms.is_some_and(|last| w.start_ms <= last) {
            return done;
        }
        if let Some(last) = self.last_start_ms {
            let missing = (w.start_ms - last) / self.window_ms - 1;
            if (1..=i64::from(self.cfg.cadence.count(MAX_GAP_MS))).contains(&missing) {
                for k in 1..=missing {
                    self.score_window(last + k * self.window_ms, &HashMap::new(), &mut done);
                }
            }
        }
        for key in &w.evicted {
            self.models.remove(key);
            self.trails.forget(key);
        }
        let stats: HashMap<&PairKey, &PairStats> =
            w.pairs.iter().filter(|(k, _)| !k.is_overflow()).map(|(k, s)| (k, s)).collect();
        for key in stats.keys() {
            if !self.models.contains_key(*key) {
                self.models.insert((*key).clone(), PairModel::default());
            }
        }
        self.score_window(w.start_ms, &stats, &mut done);
        let found = self.trust.observe(w, &mut self.anomalies);
        done.anomalies_started += found.started;
        done.anomalies_ended += found.ended;
        self.since_checkpoint += done.windows_scored;
        if self.since_checkpoint >= self.cfg.cadence.count(CHECKPOINT_MS) {
            done.checkpoint_due = true;
        }
        done
    }

    fn score_window(&mut self, start_ms: i64, stats: &HashMap<&PairKey, &PairStats>, done: &mut Processed) {
        let end_ms = start_ms + self.window_ms;
        for (key, model) in &mut self.models {
            let stats = stats.get(key);
            let obs = stats.map_or_else(Obs::zero, |s| Obs::from_stats(s));
            let mut step = model.observe(&obs, start_ms, &self.cfg);
            if let Some(up) = stats.and_then(|s| UpstreamObs::from_stats(&s.upstream)) {
                let more = model.observe_upstream(&up, start_ms, &self.cfg);
                step.fired.extend(more.fired);
                step.cleared.extend(more.cleared);
            }
            self.trails.record(key, start_ms, &step.verdicts, !step.fired.is_empty(), self.window_ms);
            for v in &step.fired {
                done.anomalies_started += u32::from(self.anomalies.fire(key, v, end_ms, self.window_ms));
            }
            for s in &step.cleared {
                done.anomalies_ended += u32::from(self.anomalies.clear(key, *s, end_ms));
            }
        }
        self.last_start_ms = Some(start_ms);
        done.windows_scored += 1;
    }

    /// Brings the alerts up to date (at the end of the last window scored, and `wall_ms`);
    /// returns the notifications due.
    pub fn update_alerts(&mut self, wall_ms: i64) -> Vec<crate::alert::Notification> {
        let event_ms = self.last_start_ms.map_or(0, |t| t + self.window_ms);
        self.alerts.update(&self.anomalies, &self.silences, &self.alert_cfg, event_ms, wall_ms)
    }

    /// Everything a restart needs, encoded; resets the checkpoint clock.
    pub fn checkpoint(&mut self) -> Checkpoint {
        self.since_checkpoint = 0;
        Checkpoint {
            models: self.models.iter().map(|(k, m)| (k.clone(), m.to_bytes())).collect(),
            state: self.state(),
            last_start_ms: self.last_start_ms,
        }
    }

    /// The records that notifications are queued with (see `State`), encoded.
    pub fn state(&self) -> State {
        State { anomalies: self.anomalies.to_bytes(), trust: self.trust.to_bytes(), alerts: self.alerts.to_bytes() }
    }

    /// After a restore: a detection that the anomalies hold active but its model does not
    /// (the anomalies are written with every notification, the models every few minutes)
    /// resumes in the model, so that it ends when its signal is quiet again.
    fn resume_detections(&mut self) {
        for a in self.anomalies.iter().filter(|a| a.ended_ms.is_none()) {
            let (Some(signal), Some(direction)) = (Signal::parse(&a.signal), Direction::parse(&a.direction)) else {
                continue;
            };
            for reporter in a.reporters.iter().filter_map(|r| Reporter::parse(r)) {
                let key = PairKey {
                    source: Arc::from(a.source.as_str()),
                    destination: Arc::from(a.destination.as_str()),
                    direction,
                    reporter,
                };
                if let Some(m) = self.models.get_mut(&key) {
                    m.resume(signal);
                }
            }
        }
    }
}

/// The records that must agree with one another and with the notifications queued from
/// them: written together in one transaction (`Store::save_checkpoint`, `Store::enqueue`), so
/// that after a crash at any moment the alerts never start a firing cycle again for a
/// detection they had already sent, and the id of a detection that was notified is never
/// given to another.
#[derive(Debug, Default)]
pub struct State {
    pub anomalies: Vec<u8>,
    pub trust: Vec<u8>,
    pub alerts: Vec<u8>,
}

/// The detector's state as it goes to the store.
#[derive(Debug)]
pub struct Checkpoint {
    pub models: Vec<(PairKey, Vec<u8>)>,
    pub state: State,
    pub last_start_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An hour of warm-up instead of a day, so that tests stay short.
    fn test_config() -> DetectorConfig {
        DetectorConfig { warmup_windows: 360, ..DetectorConfig::default() }
    }
    fn key() -> PairKey {
        PairKey {
            source: Arc::from("a"),
            destination: Arc::from("b"),
            direction: Direction::EastWest,
            reporter: Reporter::Source,
        }
    }

    fn window(start_ms: i64, requests: u64) -> ClosedWindow {
        let mut s = PairStats::default();
        s.requests[2] = requests;
        for _ in 0..requests {
            s.latency.add(20_000);
        }
        ClosedWindow {
            start_ms,
            end_ms: start_ms + 10_000,
            pairs: vec![(key(), s)],
            evicted: Vec::new(),
            ..Default::default()
        }
    }

    #[test]
    fn a_pair_that_goes_silent_is_scored_as_zeros_and_flagged() {
        let mut d = Detector::new(test_config(), 10_000);
        for i in 0..1_000 {
            d.process(&window(i * 10_000, 40));
        }
        assert_eq!(d.anomalies.active_count(), 0);
        // No window at all for a minute (the whole mesh silent), then traffic elsewhere.
        let mut other = window(1_006 * 10_000, 0);
        other.pairs.clear();
        let done = d.process(&other);
        assert_eq!(done.windows_scored, 7);
        assert_eq!(d.anomalies.active_count(), 1);
        let a = d.anomalies.iter().next().expect("an anomaly");
        assert_eq!((a.kind.as_str(), a.source.as_str(), a.reporters.len()), ("vanished", "a", 1));
        assert!(a.reason.starts_with("no requests in"), "{}", a.reason);
    }

    #[test]
    fn a_detection_saved_with_its_notification_but_not_in_its_model_still_ends() {
        // The models of the last checkpoint are older than the anomalies, which were written
        // with a notification after the detection started.
        let mut d = Detector::new(test_config(), 10_000);
        for i in 0..1_000 {
            d.process(&window(i * 10_000, 40));
        }
        let models = d.checkpoint().models;
        for i in 1_000..1_010 {
            d.process(&window(i * 10_000, 0));
        }
        assert_eq!(d.anomalies.active_count(), 1);
        let state = d.state();
        let mut restored = Detector::restore(
            d.cfg,
            10_000,
            models.iter().map(|(k, b)| (k.clone(), PairModel::from_bytes(b).expect("decodes"))),
            Anomalies::from_bytes(&state.anomalies).expect("decodes"),
            Trust::from_bytes(d.trust.cfg.clone(), &state.trust).expect("decodes"),
            d.last_start_ms,
        );
        assert!(restored.model(&key()).is_some_and(|m| m.is_active(Signal::RequestRate)));
        for i in 1_010..1_060 {
            restored.process(&window(i * 10_000, 40));
        }
        assert_eq!(restored.anomalies.active_count(), 0, "the traffic is back: the detection ended");
    }

    #[test]
    fn a_checkpoint_restores_a_detector_that_scores_the_same() {
        let mut d = Detector::new(test_config(), 10_000);
        for i in 0..500 {
            d.process(&window(i * 10_000, 30 + (i % 5) as u64));
        }
        let c = d.checkpoint();
        let models = c.models.iter().map(|(k, b)| (k.clone(), PairModel::from_bytes(b).expect("decodes")));
        let mut restored = Detector::restore(
            d.cfg,
            10_000,
            models,
            Anomalies::from_bytes(&c.state.anomalies).expect("decodes"),
            Trust::from_bytes(d.trust.cfg.clone(), &c.state.trust).expect("decodes"),
            c.last_start_ms,
        );
        for i in 500..600 {
            let w = window(i * 10_000, if i > 550 { 0 } else { 33 });
            d.process(&w);
            restored.process(&w);
        }
        assert_eq!(d.model(&key()).map(PairModel::to_bytes), restored.model(&key()).map(PairModel::to_bytes));
        let a: Vec<_> = d.anomalies.iter().cloned().collect();
        let b: Vec<_> = restored.anomalies.iter().cloned().collect();
        assert_eq!(a, b);
        assert!(!a.is_empty());
    }
}
