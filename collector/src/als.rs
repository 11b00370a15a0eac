//! The gRPC access-log service (`envoy.service.accesslog.v3.AccessLogService`).
//!
//! A thin adapter: it keeps per-stream state (the node, which Envoy sends only in a stream's
//! first message), turns each message into flow records with `decode`, and hands them to the
//! window aggregator through a bounded queue. Messages are received as raw bytes and entries
//! are decoded one by one, so a bad entry costs only itself, never its batch or its stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, http};
use tonic::server::{ClientStreamingService, Grpc, UnaryService};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::decode::{Rejection, StreamDecoder, Tally};
use crate::identity::{Interner, MeshConfig};
use crate::metrics::CollectorMetrics;
use crate::pipeline::Batch;

/// The full path of the one method.
pub const STREAM_ACCESS_LOGS_PATH: &str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";

/// A gRPC codec that passes message bytes through untouched, both ways. The server decodes
/// entries itself; load generators send pre-encoded messages with it.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Settings of the access-log service, validated.
#[derive(Clone, Debug)]
pub struct AlsConfig {
    /// Largest accepted gRPC message; a larger one ends its stream with `RESOURCE_EXHAUSTED`.
    pub max_message_bytes: usize,
    /// How long a stream waits for room in a full queue before it drops a batch (counted).
    pub enqueue_timeout: Duration,
    /// Identities kept interned per stream.
    pub interner_capacity: usize,
    /// A stream whose first message (its identifier) has not come by then is ended.
    pub identify_within: Duration,
}

impl Default for AlsConfig {
    fn default() -> Self {
        AlsConfig {
            max_message_bytes: 4 << 20,
            enqueue_timeout: Duration::from_secs(1),
            interner_capacity: 4096,
            identify_within: Duration::from_secs(30),
        }
    }
}

/// What waiting for a stream's next message gave.
pub(crate) enum Next {
    Shutdown,
    /// The stream's first message did not come within `identify_within` (counted as
    /// `no_identifier`): a stream that never says who it is holds a slot for nothing.
    NoIdentifier(Status),
    Message(Result<Option<Bytes>, Status>),
}

/// The next message of a stream; the first must come within `identify_within`.
pub(crate) async fn next_message(
    stream: &mut tonic::Streaming<Bytes>,
    first: bool,
    cfg: &AlsConfig,
    shutdown: &tokio_util::sync::CancellationToken,
    rejected: &prometheus::IntCounterVec,
) -> Next {
    let within = if first { cfg.identify_within } else { Duration::MAX };
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Next::Shutdown,
        next = tokio::time::timeout(within, stream.message()) => match next {
            Ok(message) => Next::Message(message),
            Err(_) => {
                rejected.with_label_values(&["no_identifier"]).inc();
                Next::NoIdentifier(Status::deadline_exceeded("no message (with the node identifier) in time"))
            }
        },
    }
}

/// Counters resolved once, so the per-message path does not hash label values.
#[derive(Debug)]
struct Handles {
    all: CollectorMetrics,
    received: [prometheus::IntCounter; 2],
    decoded: [prometheus::IntCounter; 2],
    intermediate: [prometheus::IntCounter; 2],
    unresolved_source: prometheus::IntCounter,
    unresolved_destination: prometheus::IntCounter,
}

impl Handles {
    fn new(m: CollectorMetrics) -> Handles {
        let by_protocol =
            |v: &prometheus::IntCounterVec| [v.with_label_values(&["http"]), v.with_label_values(&["tcp"])];
        Handles {
            received: by_protocol(&m.entries_received),
            decoded: by_protocol(&m.entries_decoded),
            intermediate: by_protocol(&m.entries_intermediate),
            unresolved_source: m.identities_unresolved.with_label_values(&["source"]),
            unresolved_destination: m.identities_unresolved.with_label_values(&["destination"]),
            all: m,
        }
    }
}

#[derive(Debug)]
struct Shared {
    mesh: Arc<MeshConfig>,
    cfg: AlsConfig,
    tx: mpsc::Sender<Batch>,
    metrics: Handles,
    shutdown: CancellationToken,
}

/// The tonic service. Cloning is cheap (one `Arc`).
#[derive(Clone, Debug)]
pub struct AlsService {
    shared: Arc<Shared>,
}

impl AlsService {
    /// `tx` is the aggregator queue; `shutdown` ends every open stream when cancelled.
    pub fn new(
        mesh: Arc<MeshConfig>,
        cfg: AlsConfig,
        tx: mpsc::Sender<Batch>,
        metrics: CollectorMetrics,
        shutdown: CancellationToken,
    ) -> AlsService {
        let shared = Shared { mesh, cfg, tx, metrics: Handles::new(metrics), shutdown };
        AlsService { shared: Arc::new(shared) }
    }
}

/// The gRPC handling of raw messages, with a message size limit.
pub(crate) fn raw_grpc(max_message_bytes: usize) -> Grpc<BytesCodec> {
    Grpc::new(BytesCodec).apply_max_message_size_config(Some(max_message_bytes), None)
}

pub(crate) fn unknown_method() -> BoxFuture<http::Response<Body>, Infallible> {
    Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) })
}

/// How a stream that ended with an error is counted — `too_large` (a message over the size
/// limit) or `stream_error` — and the status it ends with: a message over the limit is
/// `RESOURCE_EXHAUSTED`, as gRPC says of a message larger than the receiver accepts (tonic's
/// decoder says `OUT_OF_RANGE`).
pub(crate) fn stream_error(status: Status) -> (&'static str, Status) {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            ("too_large", Status::resource_exhausted(status.message().to_string()))
        }
        _ => ("stream_error", status),
    }
}

/// Implements tonic's `NamedService` and `Service` for a service (with a `shared` field) of
/// one method over raw message bytes: a request to `$path` is answered by `$serve`, awaited
/// with `$shared` (a clone of the service's `shared`) and `$req`; anything else is
/// `UNIMPLEMENTED`.
macro_rules! raw_grpc_service {
    ($ty:ty, $name:expr, $path:expr, |$shared:ident, $req:ident| $serve:expr) => {
        impl tonic::server::NamedService for $ty {
            const NAME: &'static str = $name;
        }

        impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for $ty
        where
            B: tonic::codegen::Body + Send + 'static,
            B::Error: Into<tonic::codegen::StdError> + Send + 'static,
        {
            type Response = tonic::codegen::http::Response<tonic::body::Body>;
            type Error = std::convert::Infallible;
            type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

            fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, $req: tonic::codegen::http::Request<B>) -> Self::Future {
                if $req.uri().path() != $path {
                    return $crate::als::unknown_method();
                }
                let $shared = self.shared.clone();
                Box::pin(async move { Ok($serve) })
            }
        }
    };
}
pub(crate) use raw_grpc_service;

raw_grpc_service!(AlsService, "envoy.service.accesslog.v3.AccessLogService", STREAM_ACCESS_LOGS_PATH, |shared, req| {
    let mut grpc = raw_grpc(shared.cfg.max_message_bytes);
    grpc.client_streaming(StreamHandler(shared), req).await
});

impl AlsService {
    /// The OpenTelemetry logs service, sharing this service's queue, settings and counters.
    pub fn otlp_logs(&self) -> OtlpLogsService {
        OtlpLogsService { shared: self.shared.clone() }
    }
}

/// `opentelemetry.proto.collector.logs.v1.LogsService`: OTLP logs (gRPC) from Envoy's
/// OpenTelemetry access logger, decoded by `otlp`. Each call is its own short stream for the
/// watermark; its records are counted with the access log's (`meshwatch_als_*`).
#[derive(Clone, Debug)]
pub struct OtlpLogsService {
    shared: Arc<Shared>,
}

raw_grpc_service!(
    OtlpLogsService,
    "opentelemetry.proto.collector.logs.v1.LogsService",
    crate::otlp::EXPORT_LOGS_PATH,
    |shared, req| {
        let mut grpc = raw_grpc(shared.cfg.max_message_bytes);
        grpc.unary(ExportHandler(shared), req).await
    }
);

struct ExportHandler(Arc<Shared>);

impl UnaryService<Bytes> for ExportHandler {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let service = OtlpLogsService { shared: self.0.clone() };
        let proven = request.extensions().get::<ProvenIdentities>().cloned();
        Box::pin(async move { service.export(request.into_inner(), proven.as_ref()).await.map(Response::new) })
    }
}

impl OtlpLogsService {
    /// Takes one encoded `ExportLogsServiceRequest` (from gRPC or OTLP/HTTP) in: its records
    /// go to the aggregator. Returns the encoded `ExportLogsServiceResponse`, with a
    /// `partial_success` when records were rejected; `INVALID_ARGUMENT` when the body is not a
    /// request, `PERMISSION_DENIED` when a node is not one of `proven` (the client's
    /// certificate's identities, when nodes are bound to them).
    pub async fn export(&self, body: Bytes, proven: Option<&ProvenIdentities>) -> Result<Bytes, Status> {
        let shared = &self.shared;
        let stream = crate::pipeline::next_stream_id();
        let mut interner = Interner::new(shared.cfg.interner_capacity);
        let span = tracing::debug_span!(
            target: crate::TRACE_TARGET,
            "otlp.export",
            bytes = body.len(),
            records = tracing::field::Empty,
            rejected = tracing::field::Empty,
        );
        let (records, tally) = span.in_scope(|| crate::otlp::export(body, &shared.mesh, &mut interner, proven));
        span.record("records", records.len());
        span.record("rejected", tally.rejected.iter().map(|(_, n)| n).sum::<u64>());
        publish(&shared.metrics, &tally);
        if let Some(claimed) = &tally.unproven {
            return Err(ProvenIdentities::refusal(claimed));
        }
        if tally.message_rejected.is_some() {
            return Err(Status::invalid_argument("not an OTLP ExportLogsServiceRequest"));
        }
        if !records.is_empty() {
            enqueue(shared, Batch { stream, records, ..Batch::default() }).await;
        }
        let end = Batch::end(stream);
        let _ = tokio::time::timeout(shared.cfg.enqueue_timeout, shared.tx.send(end)).await;
        // ExportLogsServiceResponse: partial_success (field 1) with rejected_log_records
        // (field 1) and error_message (field 2) when records were rejected.
        let rejected: u64 = tally.rejected.iter().map(|(_, n)| n).sum();
        if rejected == 0 {
            return Ok(Bytes::new());
        }
        // The reasons, as they are counted: "log records rejected: missing_time 1, missing_peer 2".
        let reasons: Vec<String> = tally.rejected.iter().map(|(r, n)| format!("{} {n}", r.as_str())).collect();
        let message = format!("log records rejected: {}", reasons.join(", "));
        let mut inner = Vec::new();
        prost::encoding::int64::encode(1, &i64::try_from(rejected).unwrap_or(i64::MAX), &mut inner);
        prost::encoding::string::encode(2, &message, &mut inner);
        let mut out = Vec::new();
        prost::encoding::bytes::encode(1, &inner, &mut out);
        Ok(Bytes::from(out))
    }

    /// The largest request body accepted.
    pub fn max_message_bytes(&self) -> usize {
        self.shared.cfg.max_message_bytes
    }
}

/// The identities (URI SANs) a gRPC client's certificate proves, put in a call's extensions
/// when nodes must report as what their certificate proves (`listen.tls.bind_node_identity`).
#[derive(Clone, Debug)]
pub struct ProvenIdentities(pub Arc<[String]>);

impl ProvenIdentities {
    /// Whether the certificate proves `identity`.
    pub fn proves(&self, identity: &str) -> bool {
        self.0.iter().any(|i| i == identity)
    }

    /// The refusal of a node that reports as `claimed` without the certificate proving it.
    pub fn refusal(claimed: &str) -> Status {
        debug!(%claimed, "ingest refused: a node claims an identity its certificate does not prove");
        Status::permission_denied(format!("the node reports as {claimed}, which its client certificate does not prove"))
    }
}

struct StreamHandler(Arc<Shared>);

impl ClientStreamingService<Bytes> for StreamHandler {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let stream = crate::pipeline::next_stream_id();
            let proven = request.extensions().get::<ProvenIdentities>().cloned();
            let result = run_stream(&shared, stream, proven, request.into_inner()).await;
            // Tell the aggregator this stream's event time no longer holds anything back.
            let end = Batch::end(stream);
            let _ = tokio::time::timeout(shared.cfg.enqueue_timeout, shared.tx.send(end)).await;
            result?;
            // StreamAccessLogsResponse is empty; Envoy never reads it.
            Ok(Response::new(Bytes::new()))
        })
    }
}

/// Decrements the open-streams gauge however the stream ends.
pub(crate) struct OpenStream<'a>(pub(crate) &'a prometheus::IntGauge);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads a stream to its end (or shutdown). A transport or framing error (a message over the
/// size limit, for one) ends the stream and is returned to the client.
async fn run_stream(
    shared: &Shared,
    id: u64,
    proven: Option<ProvenIdentities>,
    mut stream: Streaming<Bytes>,
) -> Result<(), Status> {
    let m = &shared.metrics;
    m.all.streams_opened.inc();
    m.all.streams_open.inc();
    let _open = OpenStream(&m.all.streams_open);
    let mut decoder = StreamDecoder::bound(shared.cfg.interner_capacity, proven);
    let mut first = true;
    loop {
        let next = match next_message(&mut stream, first, &shared.cfg, &shared.shutdown, &m.all.messages_rejected).await
        {
            Next::Shutdown => return Ok(()),
            Next::NoIdentifier(status) => return Err(status),
            Next::Message(next) => next,
        };
        first = false;
        match next {
            Ok(Some(bytes)) => {
                let (records, tally) = {
                    let span = tracing::debug_span!(
                        target: crate::TRACE_TARGET,
                        "als.message",
                        stream = id,
                        bytes = bytes.len(),
                        records = tracing::field::Empty,
                        rejected = tracing::field::Empty,
                    );
                    let _entered = span.enter();
                    let (records, tally) = decoder.message(&shared.mesh, bytes);
                    span.record("records", records.len());
                    span.record("rejected", tally.rejected.iter().map(|(_, n)| n).sum::<u64>());
                    (records, tally)
                };
                publish(m, &tally);
                if let Some(claimed) = &tally.unproven {
                    return Err(ProvenIdentities::refusal(claimed));
                }
                if !records.is_empty() {
                    enqueue(shared, Batch { stream: id, records, ..Batch::default() }).await;
                }
            }
            Ok(None) => return Ok(()),
            Err(status) => {
                let (reason, status) = stream_error(status);
                m.all.messages_rejected.with_label_values(&[reason]).inc();
                debug!(%status, reason, "access-log stream ended with an error");
                return Err(status);
            }
        }
    }
}

/// Publishes what decoding one message counted, one increment per counter.
fn publish(m: &Handles, t: &Tally) {
    m.all.messages_received.inc();
    if let Some(reason) = t.message_rejected {
        m.all.messages_rejected.with_label_values(&[reason]).inc();
    }
    for p in 0..2 {
        m.received[p].inc_by(t.received[p]);
        m.decoded[p].inc_by(t.decoded[p]);
        m.intermediate[p].inc_by(t.intermediate[p]);
    }
    m.unresolved_source.inc_by(t.unresolved[0]);
    m.unresolved_destination.inc_by(t.unresolved[1]);
    for (reason, n) in &t.rejected {
        m.all.reject(*reason, *n);
    }
}

/// Hands records to the aggregator. The access-log protocol is lossy by design: when the
/// queue stays full past the timeout, the batch is dropped and counted rather than letting
/// one slow consumer stall every Envoy.
async fn enqueue(shared: &Shared, batch: Batch) {
    let n = batch.records.len() as u64;
    if !send_or_drop(&shared.tx, shared.cfg.enqueue_timeout, batch).await {
        shared.metrics.all.reject(Rejection::QueueFull, n);
    }
}

/// Sends a batch, waiting at most `timeout` for room; false when it was dropped (a warning at
/// most once a minute).
pub(crate) async fn send_or_drop(tx: &mpsc::Sender<Batch>, timeout: Duration, batch: Batch) -> bool {
    let n = (batch.records.len() + batch.upstream.len()) as u64;
    let batch = match tx.try_send(batch) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Full(batch)) => batch,
        Err(mpsc::error::TrySendError::Closed(_)) => return false,
    };
    match tokio::time::timeout(timeout, tx.send(batch)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) | Err(_) => {
            warn_rate_limited(n);
            false
        }
    }
}

/// At most one warning a minute about dropped batches; the counter has the full story.
fn warn_rate_limited(dropped: u64) {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_WARN_S: AtomicI64 = AtomicI64::new(0);
    let now = crate::pipeline::wall_clock_ms() / 1000;
    let last = LAST_WARN_S.load(Ordering::Relaxed);
    if now - last >= 60 && LAST_WARN_S.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        warn!(
            dropped,
            "pipeline queue full, dropping records (see the rejected_total counters, reason=\"queue_full\")"
        );
    }
}
