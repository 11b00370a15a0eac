//! The signals of a pair from its source Envoy's stats (the stats sink): what the Envoy
//! counted for the upstream cluster. Baselines and k-of-n detection as for the access-log
//! signals (`crate::model`), over the windows that had a stats flush.
//!
//! Ratios are binomial given their trials: 5xx, timeouts and retries per upstream request,
//! connection failures per connection attempt, circuit-breaker overflows per request,
//! unhealthy hosts per host. Upstream requests and outlier ejections are counts.

use std::collections::VecDeque;

use meshwatch_collector::window::UpstreamStats;

use crate::baseline::{Assessment, CountBaseline, Lesson, RatioBaseline};
use crate::model::{DetectorConfig, Signal, Step, Verdict, keep_better, rate_verdict, ratio_hot, track};
use crate::stats::poisson_upper_tail;

const RING: usize = 30;
const SIGNALS: usize = 8;

/// One window's upstream numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamObs {
    pub requests: f64,
    pub errors: f64,
    pub timeouts: f64,
    pub retries: f64,
    pub connections: f64,
    pub connect_failures: f64,
    pub overflows: f64,
    pub ejections: f64,
    /// Hosts of the cluster and the unhealthy ones among them (0 and 0 when not reported).
    pub hosts: f64,
    pub unhealthy: f64,
}

impl UpstreamObs {
    /// The window's numbers; `None` when no stats flush reported on the pair.
    pub fn from_stats(u: &UpstreamStats) -> Option<UpstreamObs> {
        if u.flushes == 0 {
            return None;
        }
        let c = &u.counts;
        let (hosts, healthy) = u.hosts.unwrap_or((0, 0));
        Some(UpstreamObs {
            requests: c.requests as f64,
            errors: c.errors as f64,
            timeouts: c.timeouts as f64,
            retries: c.retries as f64,
            connections: c.connections as f64,
            connect_failures: c.connect_failures as f64,
            overflows: c.pending_overflows as f64,
            ejections: c.ejections as f64,
            hosts: hosts as f64,
            unhealthy: hosts.saturating_sub(healthy) as f64,
        })
    }

    /// (events, trials) of a ratio signal, events never above trials.
    fn ratio(&self, s: Signal) -> (f64, f64) {
        let (events, trials) = match s {
            Signal::UpstreamErrorRatio => (self.errors, self.requests),
            Signal::UpstreamTimeoutRatio => (self.timeouts, self.requests),
            Signal::UpstreamRetryRatio => (self.retries, self.requests),
            Signal::ConnectFailureRatio => (self.connect_failures, self.connections.max(self.connect_failures)),
            Signal::PendingOverflowRatio => (self.overflows, self.requests.max(self.overflows)),
            Signal::UnhealthyHostShare => (self.unhealthy, self.hosts),
            _ => (0.0, 0.0),
        };
        (events.min(trials), trials)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Slot {
    obs: UpstreamObs,
    requests_expected: f64,
    ejections_expected: f64,
}

/// Baselines and detection state of the upstream signals of one pair.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamModel {
    pub(crate) requests: CountBaseline,
    pub(crate) ejections: CountBaseline,
    /// Errors, timeouts, retries, connect failures, overflows, unhealthy hosts.
    pub(crate) ratios: [RatioBaseline; 6],
    ring: VecDeque<Slot>,
    pub windows: u64,
    history: [u32; SIGNALS],
    active: [bool; SIGNALS],
    #[serde(skip)]
    last: [Option<Verdict>; SIGNALS],
}

const RATIOS: [Signal; 6] = [
    Signal::UpstreamErrorRatio,
    Signal::UpstreamTimeoutRatio,
    Signal::UpstreamRetryRatio,
    Signal::ConnectFailureRatio,
    Signal::PendingOverflowRatio,
    Signal::UnhealthyHostShare,
];

/// An upstream signal's place in the model's arrays.
/// The upstream signals whose detection would repeat the access logs' `error_ratio` while
/// that is on (the failures the access logs already count).
fn repeats_access_logs(s: Signal) -> bool {
    matches!(s, Signal::UpstreamErrorRatio | Signal::UpstreamTimeoutRatio | Signal::ConnectFailureRatio)
}

fn slot_of(s: Signal) -> usize {
    s.index().saturating_sub(Signal::CORE)
}

impl UpstreamModel {
    pub fn learning(&self, cfg: &DetectorConfig) -> bool {
        self.windows < cfg.warmup_windows
    }

    pub fn last_verdicts(&self) -> impl Iterator<Item = &Verdict> {
        self.last.iter().flatten()
    }

    pub fn resume(&mut self, s: Signal) {
        if s.is_upstream() {
            self.active[slot_of(s)] = true;
        }
    }

    pub fn is_active(&self, s: Signal) -> bool {
        s.is_upstream() && self.active[slot_of(s)]
    }

    /// Scores one window that had a stats flush, learns from it, and returns what changed.
    /// `logged_requests`: the pair's access logs count its requests, so the upstream request
    /// rate is scored but does not raise detections of its own (it would repeat theirs).
    /// `logged_errors`: the pair's access-log error ratio is an active detection, so the
    /// upstream 5xx, timeout and connect-failure ratios do not start one (they would repeat
    /// it; they still do when retries hide the failures from the access logs).
    pub fn observe(
        &mut self,
        obs: &UpstreamObs,
        t_ms: i64,
        logged_requests: bool,
        logged_errors: bool,
        cfg: &DetectorConfig,
    ) -> Step {
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back(Slot {
            obs: *obs,
            requests_expected: self.requests.expected(t_ms, cfg.cadence),
            ejections_expected: self.ejections.expected(t_ms, cfg.cadence),
        });
        let ready = !self.learning(cfg);
        if self.windows == cfg.warmup_windows {
            self.history = [0; SIGNALS];
        }
        let mut step = Step::default();
        for signal in &Signal::ALL[Signal::CORE..] {
            let i = slot_of(*signal);
            let mut verdict = self.assess(*signal, t_ms, cfg);
            if *signal == Signal::UpstreamRequestRate
                && logged_requests
                && let Some(v) = verdict.as_mut()
            {
                v.hot = false;
            }
            let repeats = logged_errors && repeats_access_logs(*signal);
            track(*signal, verdict, &mut self.history[i], &mut self.active[i], ready && !repeats, cfg, &mut step);
            self.last[i] = verdict;
        }
        let hot = |s: Signal| ready && self.history[slot_of(s)] & 1 == 1;
        let (h_req, h_ej) = (hot(Signal::UpstreamRequestRate), hot(Signal::OutlierEjections));
        // As in `PairModel::learn` (`Lesson`); a hot window whose detection would repeat the
        // access logs' never teaches.
        let hot_ratios = RATIOS.map(|s| {
            let i = slot_of(s);
            if (ready && self.active[i]) || (logged_errors && repeats_access_logs(s) && hot(s)) {
                Lesson::Detecting
            } else if hot(s) {
                Lesson::Hot { n: cfg.n }
            } else {
                Lesson::Normal
            }
        });
        let changed = self.requests.update(obs.requests, t_ms, h_req, cfg.adapt_after, cfg.cadence);
        if self.ejections.update(obs.ejections, t_ms, h_ej, cfg.adapt_after, cfg.cadence) | changed {
            // As in `PairModel::learn`: the ring is judged against the calibrated baselines.
            let ring = &mut self.ring;
            self.requests.reexpect(ring.iter_mut().rev().map(|s| &mut s.requests_expected), t_ms, cfg.cadence);
            self.ejections.reexpect(ring.iter_mut().rev().map(|s| &mut s.ejections_expected), t_ms, cfg.cadence);
        }
        for ((baseline, signal), h) in self.ratios.iter_mut().zip(RATIOS).zip(hot_ratios) {
            let (events, trials) = obs.ratio(signal);
            baseline.update(events, trials, h, cfg.adapt_after, cfg.cadence);
        }
        self.windows += 1;
        step
    }

    fn assess(&self, signal: Signal, t_ms: i64, cfg: &DetectorConfig) -> Option<Verdict> {
        let mut best: Option<Verdict> = None;
        for scale in cfg.cadence.scales(RING).take_while(|s| *s <= self.ring.len()) {
            if let Some(v) = self.assess_at(signal, scale, t_ms, cfg) {
                keep_better(&mut best, v);
            }
        }
        best
    }

    fn assess_at(&self, signal: Signal, scale: usize, t_ms: i64, cfg: &DetectorConfig) -> Option<Verdict> {
        let p = cfg.threshold_p;
        let recent = || self.ring.iter().rev().take(scale);
        let verdict = |a: Assessment, hot: bool, kind: &'static str| Verdict {
            signal,
            assessment: a,
            scale,
            hot,
            sustained: false,
            kind,
        };
        match signal {
            Signal::OutlierEjections => {
                let baseline = &self.ejections;
                let x: f64 = recent().map(|s| s.obs.ejections).sum();
                if baseline.windows < cfg.min_signal_windows() {
                    return None;
                }
                // Ejections are rare events: the exact Poisson tail against the learnt rate,
                // at least one in a thousand windows; two more than expected are news.
                let lambda = recent().map(|s| s.ejections_expected).sum::<f64>().max(0.001 * scale as f64);
                let p_value = poisson_upper_tail(x as u64, lambda);
                let upper = (0..).map(f64::from).find(|k| poisson_upper_tail(*k as u64, lambda) < p).unwrap_or(lambda);
                let a = Assessment { p_value, high: x > lambda, observed: x, expected: lambda, lower: 0.0, upper };
                let hot = p_value < p && x - lambda >= 2.0;
                Some(verdict(a, hot, "outlier_ejections"))
            }
            Signal::UpstreamRequestRate => {
                let x = recent().map(|s| s.obs.requests).sum();
                let expected = recent().map(|s| s.requests_expected).sum();
                let (a, hot) = rate_verdict(&self.requests, x, expected, t_ms, cfg)?;
                let kind = match (a.high, x == 0.0) {
                    (true, _) => "upstream_request_rate_high",
                    (false, true) => "upstream_vanished",
                    (false, false) => "upstream_request_rate_low",
                };
                Some(verdict(a, hot, kind))
            }
            _ => {
                let k = RATIOS.iter().position(|s| *s == signal)?;
                let (events, trials, pairs) = recent()
                    .map(|s| s.obs.ratio(signal))
                    .fold((0.0, 0.0, 0.0), |(e, t, pp), (x, n)| (e + x, t + n, pp + n * (n - 1.0).max(0.0)));
                let a = self.ratios[k].assess(events as u64, trials as u64, pairs, p)?;
                let with_events = recent().filter(|s| s.obs.ratio(signal).0 > 0.0).count();
                let hot = ratio_hot(&a, events, with_events, scale, cfg);
                Some(verdict(a, hot, signal.as_str()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DetectorConfig {
        DetectorConfig { warmup_windows: 360, ..DetectorConfig::default() }
    }

    const W: i64 = 10_000;

    fn steady(i: i64) -> UpstreamObs {
        let wobble = ((i * 7919) % 11) as f64 - 5.0;
        let requests = 100.0 + wobble;
        UpstreamObs { requests, connections: 2.0, hosts: 3.0, ..UpstreamObs::default() }
    }

    fn warm() -> UpstreamModel {
        let mut m = UpstreamModel::default();
        for i in 0..1_000 {
            assert!(m.observe(&steady(i), i * W, false, false, &cfg()).fired.is_empty(), "window {i}");
        }
        m
    }

    fn fired_within(m: &mut UpstreamModel, windows: i64, change: impl Fn(&mut UpstreamObs)) -> Vec<Verdict> {
        let mut fired = Vec::new();
        for i in 1_000..1_000 + windows {
            let mut o = steady(i);
            change(&mut o);
            fired.extend(m.observe(&o, i * W, false, false, &cfg()).fired);
        }
        fired
    }

    #[test]
    fn a_retry_storm_fires_retry_ratio() {
        let mut m = warm();
        let fired = fired_within(&mut m, 3, |o| o.retries = (o.requests * 0.2).round());
        assert!(fired.iter().any(|v| v.signal == Signal::UpstreamRetryRatio), "{fired:?}");
        assert!(m.is_active(Signal::UpstreamRetryRatio));
    }

    #[test]
    fn upstream_errors_do_not_repeat_an_active_access_log_error_ratio() {
        let burst = |o: &mut UpstreamObs| {
            o.errors = (o.requests * 0.1).round();
            o.timeouts = 3.0;
        };
        // The access logs of the pair already have an error-ratio detection: nothing new.
        let mut m = warm();
        let mut fired = Vec::new();
        for i in 1_000..1_006 {
            let mut o = steady(i);
            burst(&mut o);
            fired.extend(m.observe(&o, i * W, true, true, &cfg()).fired);
        }
        assert!(fired.is_empty(), "{fired:?}");
        // Without one (retries hid the failures from the access logs), they are detections.
        let mut m = warm();
        let kinds: Vec<_> = fired_within(&mut m, 6, burst).iter().map(|v| v.kind).collect();
        assert!(kinds.contains(&"upstream_error_ratio") && kinds.contains(&"upstream_timeout_ratio"), "{kinds:?}");
    }

    #[test]
    fn connect_failures_and_lost_hosts_fire() {
        let mut m = warm();
        let fired = fired_within(&mut m, 6, |o| {
            o.connect_failures = 2.0;
            o.unhealthy = 1.0;
        });
        let kinds: Vec<_> = fired.iter().map(|v| v.kind).collect();
        assert!(kinds.contains(&"connect_failure_ratio") && kinds.contains(&"unhealthy_host_share"), "{kinds:?}");
    }

    #[test]
    fn a_few_ejections_fire_and_one_does_not() {
        let mut m = warm();
        assert!(fired_within(&mut m, 1, |o| o.ejections = 1.0).is_empty());
        let mut m = warm();
        let fired = fired_within(&mut m, 3, |o| o.ejections = 2.0);
        assert!(fired.iter().any(|v| v.kind == "outlier_ejections"), "{fired:?}");
    }

    #[test]
    fn vanished_upstream_traffic_fires_only_without_access_logs() {
        let mut m = warm();
        let fired = fired_within(&mut m, 3, |o| o.requests = 0.0);
        assert!(fired.iter().any(|v| v.kind == "upstream_vanished"), "{fired:?}");
        let mut m = UpstreamModel::default();
        for i in 0..1_000 {
            m.observe(&steady(i), i * W, true, false, &cfg());
        }
        let fired: Vec<_> = (1_000..1_003)
            .flat_map(|i| m.observe(&UpstreamObs { requests: 0.0, ..steady(i) }, i * W, true, false, &cfg()).fired)
            .collect();
        assert!(fired.is_empty(), "{fired:?}");
    }

    #[test]
    fn steady_stats_never_fire_and_a_restored_model_scores_identically() {
        let mut m = warm();
        // Stored as part of its pair's model, learnt spreads and all.
        let bytes = crate::model::PairModel::with_upstream(m.clone()).to_bytes();
        let mut restored =
            crate::model::PairModel::from_bytes(&bytes).and_then(|p| p.upstream).map(|u| *u).expect("decodes");
        for i in 1_000..1_200 {
            let a = m.observe(&steady(i), i * W, false, false, &cfg());
            let b = restored.observe(&steady(i), i * W, false, false, &cfg());
            assert!(a.fired.is_empty());
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
    }
}
