//! The gRPC stats sink (`envoy.service.metrics.v3.MetricsService`): Envoy's
//! `envoy.stat_sinks.metrics_service` streams its stats here every flush; `envoy_stats` turns
//! the cluster stats into upstream records that join the access logs' pairs in the windows.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use envoy_types::pb::envoy::service::metrics::v3::StreamMetricsMessage;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::codegen::BoxFuture;
use tonic::server::ClientStreamingService;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::als::{AlsConfig, Next, OpenStream, next_message, raw_grpc, raw_grpc_service, send_or_drop, stream_error};
use crate::decode::Rejection;
use crate::envoy_stats::{CounterBook, STREAM_METRICS_PATH, StatsConfig, StatsStream, StatsTally};
use crate::identity::MeshConfig;
use crate::metrics::{CollectorMetrics, StatsMetrics};
use crate::pipeline::{Batch, next_stream_id, wall_clock_ms};

#[derive(Debug)]
struct Shared {
    mesh: Arc<MeshConfig>,
    als: AlsConfig,
    cfg: StatsConfig,
    tx: mpsc::Sender<Batch>,
    metrics: CollectorMetrics,
    book: Mutex<CounterBook>,
    shutdown: CancellationToken,
}

/// The tonic service. Cloning is cheap (one `Arc`).
#[derive(Clone, Debug)]
pub struct StatsSinkService {
    shared: Arc<Shared>,
}

impl StatsSinkService {
    /// `tx` is the aggregator queue (shared with the access-log service, as are its message
    /// size limit and enqueue timeout); `shutdown` ends every open stream when cancelled.
    pub fn new(
        mesh: Arc<MeshConfig>,
        als: AlsConfig,
        cfg: StatsConfig,
        tx: mpsc::Sender<Batch>,
        metrics: CollectorMetrics,
        shutdown: CancellationToken,
    ) -> StatsSinkService {
        let book = Mutex::new(CounterBook::default());
        StatsSinkService { shared: Arc::new(Shared { mesh, als, cfg, tx, metrics, book, shutdown }) }
    }
}

raw_grpc_service!(StatsSinkService, "envoy.service.metrics.v3.MetricsService", STREAM_METRICS_PATH, |shared, req| {
    let mut grpc = raw_grpc(shared.als.max_message_bytes);
    grpc.client_streaming(StreamHandler(shared), req).await
});

struct StreamHandler(Arc<Shared>);

impl ClientStreamingService<Bytes> for StreamHandler {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let id = next_stream_id();
            let proven = request.extensions().get::<crate::als::ProvenIdentities>().cloned();
            let result = run_stream(&shared, id, proven, request.into_inner()).await;
            let _ = tokio::time::timeout(shared.als.enqueue_timeout, shared.tx.send(Batch::end(id))).await;
            result?;
            // StreamMetricsResponse is empty.
            Ok(Response::new(Bytes::new()))
        })
    }
}

/// Reads a stats stream to its end (or shutdown). With `proven`, the node must report as one
/// of those identities (its client certificate's), or the stream ends `PERMISSION_DENIED`.
async fn run_stream(
    shared: &Shared,
    id: u64,
    proven: Option<crate::als::ProvenIdentities>,
    mut stream: Streaming<Bytes>,
) -> Result<(), Status> {
    let m = &shared.metrics.stats;
    m.streams_open.inc();
    let _open = OpenStream(&m.streams_open);
    let mut state = StatsStream::new(shared.als.interner_capacity);
    let mut first = true;
    loop {
        let next = match next_message(&mut stream, first, &shared.als, &shared.shutdown, &m.messages_rejected).await {
            Next::Shutdown => return Ok(()),
            Next::NoIdentifier(status) => return Err(status),
            Next::Message(next) => next,
        };
        first = false;
        let bytes = match next {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(()),
            Err(status) => {
                let (reason, status) = stream_error(status);
                m.messages_rejected.with_label_values(&[reason]).inc();
                debug!(%status, reason, "stats stream ended with an error");
                return Err(status);
            }
        };
        m.messages_received.inc();
        let Ok(message) = StreamMetricsMessage::decode(bytes) else {
            m.messages_rejected.with_label_values(&["malformed"]).inc();
            continue;
        };
        if let Some(identifier) = &message.identifier {
            state.identify(identifier.node.as_ref(), &shared.mesh, &shared.cfg);
            if let (Some(p), Some(claimed)) = (&proven, state.identity())
                && !p.proves(claimed)
            {
                m.messages_rejected.with_label_values(&[crate::decode::UNPROVEN_IDENTITY]).inc();
                return Err(crate::als::ProvenIdentities::refusal(claimed));
            }
        }
        let now_ms = wall_clock_ms();
        let span = tracing::debug_span!(
            target: crate::TRACE_TARGET,
            "stats.message",
            stream = id,
            samples = tracing::field::Empty,
            records = tracing::field::Empty,
        );
        let entered = span.enter();
        let (upstream, tally) = {
            let mut book = shared.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            book.forget_idle(now_ms);
            let out = state.families(&message.envoy_metrics, &mut book, &shared.mesh, &shared.cfg, now_ms);
            m.tracked.set(i64::try_from(book.tracked()).unwrap_or(i64::MAX));
            out
        };
        span.record("samples", tally.received);
        span.record("records", upstream.len());
        drop(entered);
        publish(m, &tally);
        if !upstream.is_empty() {
            let n = upstream.len() as u64;
            let batch = Batch { stream: id, upstream, ..Batch::default() };
            if !send_or_drop(&shared.tx, shared.als.enqueue_timeout, batch).await {
                shared.metrics.reject_stats(Rejection::QueueFull.as_str(), n);
            }
        }
    }
}

fn publish(m: &StatsMetrics, t: &StatsTally) {
    m.samples_received.inc_by(t.received);
    m.samples_used.inc_by(t.used);
    m.samples_ignored.inc_by(t.ignored);
    m.counter_resets.inc_by(t.resets);
    for (reason, n) in &t.rejected {
        m.rejected.with_label_values(&[reason.as_str()]).inc_by(*n);
    }
}
