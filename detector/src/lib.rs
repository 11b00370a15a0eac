//! The detector: per-pair baselines and anomalies, persistence, and everything meshwatch
//! shows the world.
//!
//! `run` consumes the closed windows the collector produces: it folds them into the `pairs`
//! table (traffic totals) and hands them to `score`, which scores every known pair with its
//! `model` (one `baseline` per signal, tails from `stats`) and keeps the `anomaly` records.
//! The sled `store` keeps pairs, models and anomalies across restarts. `http` serves
//! `/metrics`, health endpoints and the JSON API.

pub mod alert;
pub mod anomaly;
pub mod baseline;
pub mod http;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pairs;
pub mod score;
pub mod stats;
pub mod store;
pub mod timefmt;
pub mod trail;
pub mod trust;
pub mod upstream;

use std::sync::{Arc, Mutex};

use meshwatch_collector::pipeline::wall_clock_ms;
use meshwatch_collector::window::{ClosedWindow, PairKey};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error};

use crate::pairs::PairTable;
use crate::score::{Checkpoint, Detector};
use crate::store::Store;

/// Least wall time between two checkpoints (the last one, at shutdown, is always written).
pub const MIN_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Locks the detector; a panic while it was held leaves state that is still the best we
/// have, so a poisoned lock is taken as it is.
pub fn lock(detector: &Mutex<Detector>) -> std::sync::MutexGuard<'_, Detector> {
    detector.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where notifications go: the receivers, and how to wake the task that sends to each.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    pub receivers: Vec<(notify::Receiver, Arc<tokio::sync::Notify>)>,
}

/// What one step of the detector writes: changed pair records, evicted pairs, a checkpoint,
/// and the notifications due with the state they came from.
#[derive(Default)]
struct Writes {
    records: Vec<meshwatch_proto::v1::PairRecord>,
    evicted: Vec<PairKey>,
    checkpoint: Option<Checkpoint>,
    queued: Vec<(String, alert::Notification)>,
    /// Whether the alerts changed: their state must be written with `queued`.
    alerts_changed: bool,
    /// The state to queue with, when there is no checkpoint to carry it (`finish`).
    state: Option<score::State>,
}

impl Writes {
    /// Brings the alerts up to date: when any changed, the notifications due, routed to the
    /// receivers that want them.
    fn alerts(&mut self, d: &mut Detector, routes: &Routes) {
        let due = d.update_alerts(wall_clock_ms());
        self.alerts_changed |= !due.is_empty();
        self.queued.extend(due.iter().flat_map(|n| {
            routes.receivers.iter().filter(|(r, _)| r.wants(n)).map(|(r, _)| (r.name.clone(), n.clone()))
        }));
    }

    /// Takes the state that changed alerts are written with, unless a checkpoint carries it.
    fn finish(mut self, d: &Detector) -> Writes {
        if self.alerts_changed && self.checkpoint.is_none() {
            self.state = Some(d.state());
        }
        self
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.evicted.is_empty() && self.checkpoint.is_none() && self.state.is_none()
    }

    /// Writes it all (one transaction for the state and the queue), then wakes the senders.
    async fn write(self, store: &Store, routes: &Routes) {
        if self.is_empty() {
            return;
        }
        let queued = self.queued.len();
        let s = store.clone();
        let result = tokio::task::spawn_blocking(move || {
            s.remove_pairs(&self.evicted)?;
            s.save_pairs(&self.records)?;
            match (&self.checkpoint, &self.state) {
                (Some(c), _) => s.save_checkpoint(c, &self.queued)?,
                (None, Some(state)) => s.enqueue(&self.queued, state)?,
                (None, None) => {}
            }
            Ok::<(), store::StoreError>(())
        })
        .await;
        match result {
            Ok(Ok(())) => debug!(queued, "detector state written"),
            Ok(Err(e)) => error!(error = %e, "cannot persist detector state"),
            Err(e) => error!(error = %e, "persistence task failed"),
        }
        if queued > 0 {
            for (_, wake) in &routes.receivers {
                wake.notify_one();
            }
        }
    }
}

/// Runs until the collector closes `windows`: folds each closed window into the pair table,
/// scores it, and persists what changed (pairs every window, a full checkpoint of the models
/// every `score::CHECKPOINT_MS` of event time and when anomalies start or end). Alerts follow
/// every window, and every second (silences end in wall time); their notifications are queued
/// in the store for the senders. At the end, writes a last checkpoint and flushes the store.
pub async fn run(
    mut windows: mpsc::Receiver<ClosedWindow>,
    table: Arc<PairTable>,
    detector: Arc<Mutex<Detector>>,
    store: Store,
    routes: Routes,
) {
    let mut last_checkpoint: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let window = tokio::select! {
            w = windows.recv() => match w {
                Some(w) => w,
                None => break,
            },
            _ = tick.tick() => {
                let writes = {
                    let mut d = lock(&detector);
                    let mut writes = Writes::default();
                    writes.alerts(&mut d, &routes);
                    writes.finish(&d)
                };
                writes.write(&store, &routes).await;
                continue;
            }
        };
        let span = tracing::debug_span!(
            target: meshwatch_collector::TRACE_TARGET,
            "detector.window",
            window.start_ms = window.start_ms,
            pairs = window.pairs.len(),
            anomalies_started = tracing::field::Empty,
            anomalies_ended = tracing::field::Empty,
            checkpoint = tracing::field::Empty,
        );
        let entered = span.enter();
        let mut writes = Writes { records: table.apply(&window), evicted: window.evicted.clone(), ..Writes::default() };
        let writes = {
            let mut d = lock(&detector);
            let done = d.process(&window);
            span.record("anomalies_started", done.anomalies_started);
            span.record("anomalies_ended", done.anomalies_ended);
            writes.alerts(&mut d, &routes);
            // Due by windows or by a change of anomalies, but not more often than every few
            // seconds: a replay closes windows thousands of times faster than real time.
            let wanted = done.checkpoint_due || done.anomalies_started > 0 || done.anomalies_ended > 0;
            let spaced = last_checkpoint.is_none_or(|t| t.elapsed() >= MIN_CHECKPOINT_INTERVAL);
            if wanted && spaced {
                last_checkpoint = Some(std::time::Instant::now());
                writes.checkpoint = Some(d.checkpoint());
            }
            writes.finish(&d)
        };
        span.record("checkpoint", writes.checkpoint.is_some());
        drop(entered);
        writes.write(&store, &routes).instrument(span).await;
    }
    let writes = {
        let mut d = lock(&detector);
        let mut writes = Writes::default();
        writes.alerts(&mut d, &routes);
        writes.checkpoint = Some(d.checkpoint());
        writes
    };
    writes.write(&store, &routes).await;
    match tokio::task::spawn_blocking(move || store.flush()).await {
        Ok(Ok(())) => debug!("store flushed"),
        Ok(Err(e)) => error!(error = %e, "cannot flush the store"),
        Err(e) => error!(error = %e, "store flush task failed"),
    }
}
