//! The collector: Envoy access logs in, per-pair windows out.
//!
//! `als` is the gRPC service Envoy streams to; `otlp` decodes the OpenTelemetry logs of
//! Envoy's OpenTelemetry access logger into the same records. Each entry is decoded from the lean `wire`
//! mirrors of Envoy's protobufs by `decode` into a `flow::FlowRecord`, whose sides are named
//! and placed inside or outside the trust boundary by `identity`. Records queue (bounded) to
//! the `pipeline` task, which aggregates them per pair in event-time `window`s and hands each
//! closed window to the detector, with request durations in a `sketch`. `stats_sink` is the
//! gRPC service of Envoy's stats sink; `envoy_stats` turns its cluster stats into upstream
//! records of the same pairs, which join the flow records in the windows. `metrics` are the
//! collector's own.

pub mod als;
pub mod decode;
pub mod envoy_stats;
pub mod flow;
pub mod identity;
pub mod metrics;
pub mod otlp;
pub mod pipeline;
pub mod sketch;
pub mod stats_sink;
pub mod window;
pub mod wire;

/// The target of the spans meshwatch exports as traces of its own work (when an OTLP
/// endpoint is configured); at debug level, so that they cost nothing otherwise.
pub const TRACE_TARGET: &str = "meshwatch::trace";
