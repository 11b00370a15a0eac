//! `meshwatch serve`: collector and detector in one process, wired together.
//!
//! Shutdown is one path: cancelling the token stops both servers from accepting, ends every
//! access-log stream, which drops the last queue sender, so the aggregator closes its open
//! windows, the detector folds them in and flushes the store, and `run` returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use meshwatch_collector::als::{AlsService, OtlpLogsService};
use meshwatch_collector::metrics::CollectorMetrics;
use meshwatch_collector::pipeline;
use meshwatch_collector::stats_sink::StatsSinkService;
use meshwatch_collector::window::{Aggregator, Seen};
use meshwatch_detector::Routes;
use meshwatch_detector::alert::Alerts;
use meshwatch_detector::anomaly::Anomalies;
use meshwatch_detector::http::{AppState, router};
use meshwatch_detector::metrics::{DetectorCollector, ProcessCollector};
use meshwatch_detector::model::PairModel;
use meshwatch_detector::notify::{Delivery, NotifyMetrics};
use meshwatch_detector::pairs::{PairCollector, PairTable, from_record, key_from_proto};
use meshwatch_detector::score::Detector;
use meshwatch_detector::store::{Store, StoreError};
use meshwatch_detector::trust::Trust;
use prometheus::Registry;
use tokio::net::TcpListener;

use crate::listen::BoundedListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("a task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The addresses actually bound (useful when the configuration asks for port 0).
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { what, addr, source })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind { what, addr, source })?;
    Ok((listener, local))
}

/// OTLP/HTTP logs: `POST /v1/logs` with a protobuf `ExportLogsServiceRequest` (JSON is not
/// served: 415), answered with a protobuf `ExportLogsServiceResponse`. Refused (403) when
/// ingest requires client certificates, which the HTTP listener does not check.
fn otlp_http_router(service: OtlpLogsService, mutual_tls: bool) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    if mutual_tls {
        let refuse = || async {
            let why =
                "OTLP over HTTP is off while listen.tls.client_ca requires client certificates: send OTLP over gRPC\n";
            (StatusCode::FORBIDDEN, why).into_response()
        };
        return axum::Router::new().route("/v1/logs", axum::routing::post(refuse));
    }
    let limit = service.max_message_bytes();
    let export = |axum::extract::State(s): axum::extract::State<OtlpLogsService>,
                  headers: axum::http::HeaderMap,
                  body: bytes::Bytes| async move {
        let protobuf = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-protobuf"));
        if !protobuf {
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "OTLP/HTTP logs must be application/x-protobuf\n")
                .into_response();
        }
        match s.export(body, None).await {
            Ok(reply) => ([(header::CONTENT_TYPE, "application/x-protobuf")], reply).into_response(),
            Err(_) => (StatusCode::BAD_REQUEST, "not an OTLP ExportLogsServiceRequest\n").into_response(),
        }
    };
    axum::Router::new()
        .route("/v1/logs", axum::routing::post(export))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(service)
}

/// Serves `app` on `incoming` until `shutdown`, in a task of its own.
fn spawn_http<L>(
    incoming: L,
    app: axum::Router,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), ServeError>>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let http = axum::serve(incoming, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::spawn(async move { http.await.map_err(ServeError::Http) })
}

/// Runs until `signal` is cancelled: then `/readyz` answers 503 for `config.shutdown_drain`
/// while everything else goes on (a load balancer's probe sees it and stops sending), and
/// then it drains within `config.shutdown_grace`. `on_bound` is called once both listeners
/// are up.
pub async fn run(config: Config, signal: CancellationToken, on_bound: impl FnOnce(Bound)) -> Result<(), ServeError> {
    let shutdown = CancellationToken::new();
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir)).await??;
    let loader = store.clone();
    let records = tokio::task::spawn_blocking(move || loader.load_pairs()).await??;
    let restored: Vec<_> = records.iter().filter_map(from_record).collect();
    let loader = store.clone();
    let checkpoint = tokio::task::spawn_blocking(move || loader.load_checkpoint()).await??;
    let last_start = checkpoint.last_start_ms;
    let models: Vec<_> = checkpoint
        .models
        .iter()
        .filter_map(|(k, bytes)| Some((key_from_proto(k)?, PairModel::from_bytes(bytes)?)))
        .collect();
    let anomalies = checkpoint.anomalies.and_then(|b| Anomalies::from_bytes(&b)).unwrap_or_default();
    let trust = checkpoint
        .trust
        .and_then(|b| Trust::from_bytes(config.trust.clone(), &b))
        .unwrap_or_else(|| Trust::new(config.trust.clone()));
    info!(pairs = restored.len(), models = models.len(), anomalies_active = anomalies.active_count(), data_dir = %config.data_dir.display(), "store opened");
    let mut detector =
        Detector::restore(config.detector, config.window.length_ms, models, anomalies, trust, last_start);
    detector.alerts = checkpoint.alerts.and_then(|b| Alerts::from_bytes(&b)).unwrap_or_default();
    detector.silences = checkpoint.silences;
    detector.alert_cfg = config.alerting.rules.clone();
    let detector = Arc::new(Mutex::new(detector));

    let registry = Registry::new();
    let collector_metrics = CollectorMetrics::new(&registry)?;
    let aggregator = Aggregator::new(
        config.window,
        restored.iter().map(|(k, e)| (k.clone(), Seen { last_ms: e.last_seen_ms, flows: e.total_flows })),
    );
    collector_metrics.pairs_tracked.set(i64::try_from(aggregator.pair_count()).unwrap_or(i64::MAX));
    let table = Arc::new(PairTable::restore(restored));
    registry.register(Box::new(PairCollector::new(table.clone())?))?;
    registry.register(Box::new(DetectorCollector::new(detector.clone())?))?;
    registry.register(Box::new(ProcessCollector::new()?))?;

    let (grpc_listener, grpc_addr) = bind("grpc", config.grpc_listen).await?;
    let (http_listener, http_addr) = bind("http", config.http_listen).await?;

    let (records_tx, records_rx) = mpsc::channel(config.queue_batches);
    let (windows_tx, windows_rx) = mpsc::channel(64);
    let aggregator_task = tokio::spawn(pipeline::run_aggregator(
        records_rx,
        windows_tx,
        aggregator,
        config.clock,
        collector_metrics.clone(),
        shutdown.clone(),
    ));
    let notify_metrics = NotifyMetrics::new(&registry)?;
    let client = meshwatch_detector::notify::client(config.alerting.delivery.timeout);
    let mut routes = Routes::default();
    let mut senders = Vec::new();
    for receiver in &config.alerting.receivers {
        let wake = Arc::new(tokio::sync::Notify::new());
        routes.receivers.push((receiver.clone(), wake.clone()));
        let delivery = Delivery {
            store: store.clone(),
            receiver: receiver.clone(),
            cfg: config.alerting.delivery.clone(),
            metrics: notify_metrics.clone(),
            wake,
            detector: detector.clone(),
            client: client.clone(),
        };
        senders.push(tokio::spawn(delivery.run(shutdown.clone())));
    }
    let detector_task =
        tokio::spawn(meshwatch_detector::run(windows_rx, table.clone(), detector.clone(), store.clone(), routes));

    let mut als_config = config.als.clone();
    if config.clock == meshwatch_collector::pipeline::Clock::Watermark {
        // A replay has no Envoy to protect from a slow consumer: it waits instead of dropping.
        als_config.enqueue_timeout = std::time::Duration::from_secs(3600);
    }
    let mesh = Arc::new(config.mesh.clone());
    let stats_sink = StatsSinkService::new(
        mesh.clone(),
        als_config.clone(),
        config.stats.clone(),
        records_tx.clone(),
        collector_metrics.clone(),
        shutdown.clone(),
    );
    let als = AlsService::new(mesh, als_config, records_tx, collector_metrics, shutdown.clone());
    let mutual_tls = config.grpc_tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some());
    let otlp_http = otlp_http_router(als.otlp_logs(), mutual_tls);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AlsService>().await;
    health.set_serving::<OtlpLogsService>().await;
    health.set_serving::<StatsSinkService>().await;
    let connection_metrics = crate::listen::ConnectionMetrics::register(&registry)?;
    let grpc_incoming = BoundedListener::new(grpc_listener, "grpc", config.grpc_connections, &connection_metrics);
    let http_incoming = BoundedListener::new(http_listener, "http", config.http_connections, &connection_metrics);
    // Pings keep a quiet access-log stream's connection from counting as idle (an Envoy
    // answers them) and find peers that are gone.
    let ping = (config.grpc_connections.idle / 3).max(std::time::Duration::from_secs(1));
    let mut grpc_server = tonic::transport::Server::builder();
    let (mut allowed, mut bind) = (Vec::new(), false);
    if let Some(tls) = &config.grpc_tls {
        grpc_server = grpc_server.tls_config(tls.server_config())?;
        (allowed, bind) = (tls.allowed_identities.clone(), tls.bind_node_identity);
    }
    let admission = crate::tls::admission(allowed, bind, crate::tls::refused_counter(&registry)?);
    let grpc = grpc_server
        .layer(tonic::service::InterceptorLayer::new(admission))
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping))
        .add_service(health_service)
        .add_service(als.otlp_logs())
        .add_service(als)
        .add_service(stats_sink)
        .serve_with_incoming_shutdown(grpc_incoming, shutdown.clone().cancelled_owned());
    let ready = Arc::new(AtomicBool::new(false));
    let app = router(AppState {
        registry,
        pairs: table,
        detector,
        ready: ready.clone(),
        store: Some(store),
        api_token: config.alerting.api_token.clone(),
        read_token: config.read_token.clone(),
    })
    .merge(otlp_http);
    let http_task = match config.grpc_tls.as_ref().filter(|t| t.http) {
        Some(tls) => {
            let rustls = Arc::new(tls.http_config().map_err(ServeError::Tls)?);
            let within = config.http_connections.answer_within.unwrap_or(std::time::Duration::from_secs(10));
            spawn_http(crate::listen::TlsListener::new(http_incoming, rustls, within), app, &shutdown)
        }
        None => spawn_http(http_incoming, app, &shutdown),
    };
    let grpc_task = tokio::spawn(grpc);

    let tls = config.grpc_tls.as_ref().map_or_else(|| "off".to_string(), crate::tls::TlsSettings::describe);
    ready.store(true, Ordering::Relaxed);
    info!(grpc = %grpc_addr, http = %http_addr, grpc_tls = tls, "listening");
    on_bound(Bound { grpc: grpc_addr, http: http_addr });

    signal.cancelled().await;
    ready.store(false, Ordering::Relaxed);
    if !config.shutdown_drain.is_zero() {
        info!(drain = ?config.shutdown_drain, "not ready; serving on while probes see it");
        tokio::time::sleep(config.shutdown_drain).await;
    }
    shutdown.cancel();
    info!(grace = ?config.shutdown_grace, "shutting down");
    // Windows and the store first, and in full: what was learnt must not be cut short by a
    // client that does not hang up. The grace period is for the servers.
    aggregator_task.await?;
    detector_task.await?;
    // Senders stop between attempts; what they had not delivered stays queued.
    for sender in senders {
        sender.await?;
    }
    let servers = async {
        grpc_task.await??;
        http_task.await??;
        Ok::<(), ServeError>(())
    };
    match tokio::time::timeout(config.shutdown_grace, servers).await {
        Ok(result) => result?,
        Err(_) => warn!("shutdown grace period over with connections still open"),
    }
    info!("stopped");
    Ok(())
}
