//! The window aggregator task: drains the queue of flow records, closes windows on time and
//! hands them to the detector.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::flow::FlowRecord;
use crate::metrics::CollectorMetrics;
use crate::window::{Added, Aggregator, ClosedWindow};

/// What "now" means for closing windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The wall clock: a window closes at its end plus grace.
    Live,
    /// The newest event time seen: for replay and simulation, where event time runs ahead of
    /// the wall clock.
    Watermark,
}

/// In watermark mode, how long without input, once every stream has ended, before the
/// open windows are closed; and how long with streams still open.
pub const WATERMARK_IDLE_FLUSH: Duration = Duration::from_secs(1);
pub const WATERMARK_STALL_FLUSH: Duration = Duration::from_secs(60);

fn replay_over(metrics: &CollectorMetrics, idle: Duration) -> bool {
    (metrics.streams_open.get() == 0 && idle >= WATERMARK_IDLE_FLUSH) || idle >= WATERMARK_STALL_FLUSH
}

pub fn wall_clock_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs until `shutdown` is cancelled or every sender is gone; then takes what is still
/// queued, closes every open window and returns. Windows go to `out` in order; the detector's
/// pace is the limit.
pub async fn run_aggregator(
    mut rx: mpsc::Receiver<Vec<FlowRecord>>,
    out: mpsc::Sender<ClosedWindow>,
    mut agg: Aggregator,
    clock: Clock,
    metrics: CollectorMetrics,
    shutdown: CancellationToken,
) {
    metrics.queue_capacity.set(i64::try_from(rx.max_capacity()).unwrap_or(i64::MAX));
    metrics.pairs_max.set(i64::try_from(agg.config().max_pairs).unwrap_or(i64::MAX));
    let mut watermark_ms = i64::MIN;
    let now = |watermark_ms: i64| match clock {
        Clock::Live => wall_clock_ms(),
        Clock::Watermark => watermark_ms,
    };
    if clock == Clock::Live {
        // Anything that ended before the grace period is late from the start.
        agg.close_due(wall_clock_ms());
    }
    let mut last_batch = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                // No new batches; the ones already queued are still counted.
                rx.close();
                while let Some(batch) = rx.recv().await {
                    add_batch(&mut agg, &batch, now(watermark_ms), &metrics);
                }
                break;
            }
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                last_batch = tokio::time::Instant::now();
                if clock == Clock::Watermark {
                    watermark_ms = batch.iter().map(|r| r.end_ms).fold(watermark_ms, i64::max);
                }
                add_batch(&mut agg, &batch, now(watermark_ms), &metrics);
                metrics.queue_depth.set(i64::try_from(rx.len()).unwrap_or(i64::MAX));
                if clock == Clock::Watermark && !emit(agg.close_due(watermark_ms), &out, &metrics, None).await {
                    return;
                }
            }
            _ = tick.tick() => {
                if clock == Clock::Live {
                    let now_ms = wall_clock_ms();
                    let grace = agg.config().grace_ms;
                    if !emit(agg.close_due(now_ms), &out, &metrics, Some(now_ms - grace)).await {
                        return;
                    }
                } else if agg.open_windows() > 0 && replay_over(&metrics, last_batch.elapsed()) {
                    // A replay that ended (or stalled): nothing will move the watermark, so
                    // close every window up to the one holding it. Later entries of those
                    // windows will be late; entries after the watermark are still taken.
                    let cfg = agg.config();
                    let horizon = watermark_ms.saturating_add(cfg.grace_ms + cfg.length_ms);
                    if !emit(agg.close_due(horizon), &out, &metrics, None).await {
                        return;
                    }
                }
                metrics.windows_open.set(i64::try_from(agg.open_windows()).unwrap_or(i64::MAX));
            }
        }
    }
    emit(agg.close_all(), &out, &metrics, None).await;
    metrics.windows_open.set(0);
    debug!("window aggregator finished");
}

fn add_batch(agg: &mut Aggregator, batch: &[FlowRecord], now_ms: i64, metrics: &CollectorMetrics) {
    let mut overflowed = 0;
    for r in batch {
        match agg.add(r, now_ms) {
            Ok(Added::Counted) => {}
            Ok(Added::NewPair) => metrics.pairs_tracked.set(i64::try_from(agg.pair_count()).unwrap_or(i64::MAX)),
            Ok(Added::Overflowed) => overflowed += 1,
            Err(reason) => metrics.reject(reason, 1),
        }
    }
    if overflowed > 0 {
        metrics.overflow_entries.inc_by(overflowed);
    }
}

/// Sends closed windows on; false when the detector is gone. `horizon_ms` (live mode) is the
/// time by which each window was due, for the lag gauge.
async fn emit(
    windows: Vec<ClosedWindow>,
    out: &mpsc::Sender<ClosedWindow>,
    metrics: &CollectorMetrics,
    horizon_ms: Option<i64>,
) -> bool {
    for w in windows {
        if let Some(h) = horizon_ms {
            metrics.window_close_lag.set((h - w.end_ms).max(0) as f64 / 1000.0);
        }
        metrics.windows_closed.inc();
        if out.send(w).await.is_err() {
            return false;
        }
    }
    true
}
