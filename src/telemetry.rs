//! meshwatch's own telemetry: logs through `tracing` to stderr (filtered by `MESHWATCH_LOG`),
//! and, when `[telemetry] otlp_endpoint` is set, traces of its work over OTLP/gRPC: access-log,
//! OTLP and stats messages decoded, windows closed, windows scored and persisted,
//! notifications delivered. Those spans are at debug level under one target
//! (`meshwatch_collector::TRACE_TARGET`): without an endpoint no layer wants them, so they
//! cost a check of a cached flag.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{ENV_LOG, TracesConfig};

/// Keeps the trace pipeline; `shutdown` exports what is still buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter. Call while the Tokio runtime
    /// the exporter was built in still runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "cannot export the last traces");
        }
    }
}

/// Installs the global subscriber. With `traces`, must run inside a Tokio runtime (the gRPC
/// exporter's connection lives there).
pub fn init(traces: Option<&TracesConfig>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env(ENV_LOG).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    let Some(cfg) = traces else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry::default());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(&cfg.endpoint).build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio))))
        .with_resource(Resource::builder().with_service_name(cfg.service_name.clone()).build())
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("meshwatch"))
        .with_filter(Targets::new().with_target(meshwatch_collector::TRACE_TARGET, Level::DEBUG));
    tracing_subscriber::registry().with(logs).with(spans).init();
    tracing::info!(endpoint = %cfg.endpoint, sample_ratio = cfg.sample_ratio, "exporting traces over OTLP");
    Ok(Telemetry { provider: Some(provider) })
}
