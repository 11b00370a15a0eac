//! The window aggregator task: drains the queue of flow records, closes windows on time and
//! hands them to the detector.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use crate::decode::Rejection;
use crate::flow::{FlowRecord, UpstreamRecord};
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

/// Flow records of one access-log stream, in the order they arrived.
#[derive(Debug, Default)]
pub struct Batch {
    /// Which stream (numbered by the service, unique in the process).
    pub stream: u64,
    pub records: Vec<FlowRecord>,
    /// Upstream stats of a metrics stream.
    pub upstream: Vec<UpstreamRecord>,
    /// The stream has ended; nothing more will come from it.
    pub end_of_stream: bool,
}

impl Batch {
    /// The last message of a stream.
    pub fn end(stream: u64) -> Batch {
        Batch { stream, end_of_stream: true, ..Batch::default() }
    }
}

/// A number for a new stream, unique in the process (every service draws from it, so that the
/// watermark never mixes up two streams).
pub fn next_stream_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A stream that sent nothing for this long no longer holds the watermark back.
pub const WATERMARK_IDLE_STREAM: Duration = Duration::from_secs(2);

/// Event-time progress per stream. The watermark is the newest event time of the slowest
/// stream still sending, so one stream running ahead of the others (their messages wait in
/// buffers or queues) makes no one's entries late.
#[derive(Debug, Default)]
struct Watermarks {
    streams: HashMap<u64, (i64, Instant)>,
    /// The newest event time any stream reached.
    max_ms: Option<i64>,
}

impl Watermarks {
    fn observe(&mut self, b: &Batch, now: Instant) {
        if b.end_of_stream {
            self.streams.remove(&b.stream);
            return;
        }
        let times = b.records.iter().map(|r| r.end_ms).chain(b.upstream.iter().map(|r| r.time_ms));
        let Some(newest) = times.max() else { return };
        let slot = self.streams.entry(b.stream).or_insert((newest, now));
        *slot = (slot.0.max(newest), now);
        self.max_ms = Some(self.max_ms.map_or(newest, |m| m.max(newest)));
    }

    /// The watermark: the slowest stream still sending, else the newest time seen.
    fn current(&self, now: Instant) -> i64 {
        self.streams
            .values()
            .filter(|(_, seen)| now.duration_since(*seen) < WATERMARK_IDLE_STREAM)
            .map(|(t, _)| *t)
            .min()
            .or(self.max_ms)
            .unwrap_or(i64::MIN)
    }
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
    mut rx: mpsc::Receiver<Batch>,
    out: mpsc::Sender<ClosedWindow>,
    mut agg: Aggregator,
    clock: Clock,
    metrics: CollectorMetrics,
    shutdown: CancellationToken,
) {
    metrics.queue_capacity.set(i64::try_from(rx.max_capacity()).unwrap_or(i64::MAX));
    metrics.pairs_max.set(i64::try_from(agg.config().max_pairs).unwrap_or(i64::MAX));
    let mut marks = Watermarks::default();
    // The clock records are judged against (too far ahead is `future`): in watermark mode the
    // newest time any stream reached.
    let now = |marks: &Watermarks| match clock {
        Clock::Live => wall_clock_ms(),
        Clock::Watermark => marks.max_ms.unwrap_or(i64::MIN),
    };
    if clock == Clock::Live {
        // Anything that ended before the grace period is late from the start.
        agg.close_due(wall_clock_ms());
    }
    let mut last_batch = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                // No new batches; the ones already queued are still counted.
                rx.close();
                while let Some(batch) = rx.recv().await {
                    marks.observe(&batch, Instant::now());
                    add_batch(&mut agg, &batch, now(&marks), &metrics);
                }
                break;
            }
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                last_batch = Instant::now();
                marks.observe(&batch, last_batch);
                add_batch(&mut agg, &batch, now(&marks), &metrics);
                metrics.queue_depth.set(i64::try_from(rx.len()).unwrap_or(i64::MAX));
                if clock == Clock::Watermark && !emit(agg.close_due(marks.current(last_batch)), &out, &metrics, None).await {
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
                    let horizon = marks.max_ms.unwrap_or(i64::MIN).saturating_add(cfg.grace_ms + cfg.length_ms);
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

fn add_batch(agg: &mut Aggregator, batch: &Batch, now_ms: i64, metrics: &CollectorMetrics) {
    let mut overflowed = 0;
    let mut count = |added: Result<Added, Rejection>, stats: bool, pairs: usize| match added {
        Ok(Added::Counted) => {}
        Ok(Added::NewPair) => metrics.pairs_tracked.set(i64::try_from(pairs).unwrap_or(i64::MAX)),
        Ok(Added::Overflowed) => overflowed += 1,
        Err(reason) if stats => metrics.reject_stats(reason.as_str(), 1),
        Err(reason) => metrics.reject(reason, 1),
    };
    for r in &batch.records {
        let added = agg.add(r, now_ms);
        count(added, false, agg.pair_count());
    }
    for r in &batch.upstream {
        let added = agg.add_upstream(r, now_ms);
        count(added, true, agg.pair_count());
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
        let lag_s = horizon_ms.map(|h| (h - w.end_ms).max(0) as f64 / 1000.0);
        if let Some(lag) = lag_s {
            metrics.window_close_lag.set(lag);
        }
        metrics.windows_closed.inc();
        metrics.pairs_evicted.inc_by(w.evicted.len() as u64);
        let span = tracing::debug_span!(
            target: crate::TRACE_TARGET,
            "window.close",
            window.start_ms = w.start_ms,
            window.end_ms = w.end_ms,
            pairs = w.pairs.len(),
            lag_s,
        );
        if out.send(w).instrument(span).await.is_err() {
            return false;
        }
    }
    true
}
