//! The collector's own metrics, declared once and registered on the registry passed in.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::decode::Rejection;

#[derive(Clone, Debug)]
pub struct CollectorMetrics {
    pub streams_open: IntGauge,
    pub streams_opened: IntCounter,
    pub messages_received: IntCounter,
    pub messages_rejected: IntCounterVec,
    pub entries_received: IntCounterVec,
    pub entries_decoded: IntCounterVec,
    pub entries_intermediate: IntCounterVec,
    pub entries_rejected: IntCounterVec,
    pub identities_unresolved: IntCounterVec,
    pub queue_depth: IntGauge,
    pub queue_capacity: IntGauge,
    pub pairs_tracked: IntGauge,
    pub pairs_evicted: IntCounter,
    pub pairs_max: IntGauge,
    pub overflow_entries: IntCounter,
    pub windows_open: IntGauge,
    pub windows_closed: IntCounter,
    pub window_close_lag: prometheus::Gauge,
    pub stats: StatsMetrics,
}

/// The Envoy stats sink's own metrics (`meshwatch_envoy_stats_*`).
#[derive(Clone, Debug)]
pub struct StatsMetrics {
    pub streams_open: IntGauge,
    pub messages_received: IntCounter,
    pub messages_rejected: IntCounterVec,
    pub samples_received: IntCounter,
    pub samples_used: IntCounter,
    pub samples_ignored: IntCounter,
    pub rejected: IntCounterVec,
    pub counter_resets: IntCounter,
    pub tracked: IntGauge,
}

impl StatsMetrics {
    fn new(registry: &Registry) -> prometheus::Result<StatsMetrics> {
        let m = StatsMetrics {
            streams_open: gauge(
                registry,
                "meshwatch_envoy_stats_streams_open",
                "Envoy stats sink streams currently open.",
            )?,
            messages_received: counter(
                registry,
                "meshwatch_envoy_stats_messages_received_total",
                "Envoy stats sink messages received.",
            )?,
            messages_rejected: counter_vec(
                registry,
                "meshwatch_envoy_stats_messages_rejected_total",
                "Envoy stats sink messages rejected whole, by reason.",
                &["reason"],
            )?,
            samples_received: counter(
                registry,
                "meshwatch_envoy_stats_samples_received_total",
                "Envoy stats samples (metrics of metric families) received.",
            )?,
            samples_used: counter(
                registry,
                "meshwatch_envoy_stats_samples_used_total",
                "Envoy stats samples read into per-pair upstream signals.",
            )?,
            samples_ignored: counter(
                registry,
                "meshwatch_envoy_stats_samples_ignored_total",
                "Envoy stats samples of stats meshwatch does not read, or of ignored clusters.",
            )?,
            rejected: counter_vec(
                registry,
                "meshwatch_envoy_stats_rejected_total",
                "Envoy stats samples, or the per-cluster records made of them (late, future, queue_full), not counted, by reason.",
                &["reason"],
            )?,
            counter_resets: counter(
                registry,
                "meshwatch_envoy_stats_resets_total",
                "Cumulative Envoy counters that went down (an Envoy restart), read as starting again from zero.",
            )?,
            tracked: gauge(
                registry,
                "meshwatch_envoy_stats_tracked",
                "Nodes and (node, cluster) pairs whose cumulative counters are remembered.",
            )?,
        };
        for r in crate::envoy_stats::StatsRejection::ALL {
            m.rejected.with_label_values(&[r.as_str()]);
        }
        for r in [Rejection::Late, Rejection::Future, Rejection::QueueFull] {
            m.rejected.with_label_values(&[r.as_str()]);
        }
        m.messages_rejected.with_label_values(&["malformed"]);
        Ok(m)
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl CollectorMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<CollectorMetrics> {
        let m = CollectorMetrics {
            streams_open: gauge(registry, "meshwatch_als_streams_open", "Access-log gRPC streams currently open.")?,
            streams_opened: counter(registry, "meshwatch_als_streams_opened_total", "Access-log gRPC streams opened.")?,
            messages_received: counter(
                registry,
                "meshwatch_als_messages_received_total",
                "Access-log stream messages received.",
            )?,
            messages_rejected: counter_vec(
                registry,
                "meshwatch_als_messages_rejected_total",
                "Access-log stream messages rejected whole, by reason.",
                &["reason"],
            )?,
            entries_received: counter_vec(
                registry,
                "meshwatch_als_entries_received_total",
                "Access-log entries received, by protocol.",
                &["protocol"],
            )?,
            entries_decoded: counter_vec(
                registry,
                "meshwatch_als_entries_decoded_total",
                "Access-log entries decoded into flow records, by protocol.",
                &["protocol"],
            )?,
            entries_intermediate: counter_vec(
                registry,
                "meshwatch_als_entries_intermediate_total",
                "Start and periodic access-log entries, skipped because the final entry is counted.",
                &["protocol"],
            )?,
            entries_rejected: counter_vec(
                registry,
                "meshwatch_als_entries_rejected_total",
                "Access-log entries not counted, by reason.",
                &["reason"],
            )?,
            identities_unresolved: counter_vec(
                registry,
                "meshwatch_identities_unresolved_total",
                "Flow records with a side that no evidence named (identity \"unknown\"), by side.",
                &["side"],
            )?,
            queue_depth: gauge(
                registry,
                "meshwatch_pipeline_queue_depth",
                "Batches of flow records waiting for the window aggregator.",
            )?,
            queue_capacity: gauge(
                registry,
                "meshwatch_pipeline_queue_capacity",
                "Capacity of the window aggregator queue, in batches.",
            )?,
            pairs_tracked: gauge(
                registry,
                "meshwatch_pairs_tracked",
                "Distinct pairs tracked (source, destination, direction, reporter).",
            )?,
            pairs_max: gauge(registry, "meshwatch_pairs_max", "Configured cap on distinct pairs.")?,
            pairs_evicted: counter(
                registry,
                "meshwatch_pairs_evicted_total",
                "Pairs given up at the cap to admit new ones: fewer than 10 flows, silent for limits.evict_idle.",
            )?,
            overflow_entries: counter(
                registry,
                "meshwatch_pairs_overflow_entries_total",
                "Flow records counted under the __overflow__ pair because the pair cap was reached.",
            )?,
            windows_open: gauge(registry, "meshwatch_windows_open", "Event-time windows currently open.")?,
            windows_closed: counter(
                registry,
                "meshwatch_windows_closed_total",
                "Event-time windows closed and handed to the detector.",
            )?,
            window_close_lag: {
                let g = prometheus::Gauge::new(
                    "meshwatch_window_close_lag_seconds",
                    "How long after its end plus grace the last window was closed.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            stats: StatsMetrics::new(registry)?,
        };
        // Make every reason and protocol visible at zero from the start.
        for r in Rejection::ALL {
            m.entries_rejected.with_label_values(&[r.as_str()]);
        }
        m.messages_rejected.with_label_values(&["malformed"]);
        for p in ["http", "tcp"] {
            m.entries_received.with_label_values(&[p]);
            m.entries_decoded.with_label_values(&[p]);
            m.entries_intermediate.with_label_values(&[p]);
        }
        for side in ["source", "destination"] {
            m.identities_unresolved.with_label_values(&[side]);
        }
        Ok(m)
    }

    pub fn reject(&self, reason: Rejection, n: u64) {
        self.entries_rejected.with_label_values(&[reason.as_str()]).inc_by(n);
    }

    /// Counts Envoy stats samples or records not counted.
    pub fn reject_stats(&self, reason: &str, n: u64) {
        self.stats.rejected.with_label_values(&[reason]).inc_by(n);
    }
}
