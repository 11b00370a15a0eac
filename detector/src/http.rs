//! The HTTP side: `/metrics`, health, and the JSON API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;
use tracing::warn;

use crate::pairs::PairTable;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    pub registry: Registry,
    pub pairs: Arc<PairTable>,
    /// True from when every listener is up until shutdown starts.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/pairs", get(pairs))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let families = state.registry.gather();
    let mut body = Vec::with_capacity(64 * 1024);
    match TextEncoder::new().encode(&families, &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(error) => {
            warn!(%error, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// One pair in `GET /api/v1/pairs`.
#[derive(Debug, Serialize)]
struct PairView {
    source: String,
    destination: String,
    direction: &'static str,
    reporter: &'static str,
    first_seen_ms: i64,
    last_seen_ms: i64,
    /// Requests plus connections, across restarts.
    total_flows: u64,
}

#[derive(Debug, Serialize)]
struct PairsResponse {
    pairs: Vec<PairView>,
}

async fn pairs(State(state): State<AppState>) -> axum::Json<PairsResponse> {
    let pairs = state
        .pairs
        .snapshot()
        .into_iter()
        .map(|(k, e)| PairView {
            source: k.source.to_string(),
            destination: k.destination.to_string(),
            direction: k.direction.as_str(),
            reporter: k.reporter.as_str(),
            first_seen_ms: e.first_seen_ms,
            last_seen_ms: e.last_seen_ms,
            total_flows: e.total_flows,
        })
        .collect();
    axum::Json(PairsResponse { pairs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use meshwatch_collector::flow::{Direction, Reporter};
    use meshwatch_collector::window::{ClosedWindow, PairKey, PairStats};
    use tower::ServiceExt;

    fn state() -> AppState {
        let registry = Registry::new();
        let pairs = Arc::new(PairTable::default());
        registry
            .register(Box::new(crate::pairs::PairCollector::new(pairs.clone()).expect("collector")))
            .expect("register");
        AppState { registry, pairs, ready: Arc::new(AtomicBool::new(false)) }
    }

    async fn get(app: Router, uri: &str) -> (StatusCode, String) {
        let resp = app.oneshot(Request::get(uri).body(Body::empty()).expect("request")).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_follows_the_flag() {
        let s = state();
        assert_eq!(get(router(s.clone()), "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        s.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(router(s.clone()), "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(router(s), "/healthz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn pairs_show_in_metrics_and_api() {
        let s = state();
        let mut stats = PairStats::default();
        stats.requests[2] = 4;
        stats.requests[5] = 1;
        stats.duration_buckets[3] = 5;
        stats.duration_sum_us = 40_000;
        stats.response_flags[5] = 1;
        let key = PairKey {
            source: Arc::from("web"),
            destination: Arc::from("api.example.com"),
            direction: Direction::Egress,
            reporter: Reporter::Source,
        };
        s.pairs.apply(&ClosedWindow { start_ms: 10_000, end_ms: 20_000, pairs: vec![(key, stats)] });
        let (status, text) = get(router(s.clone()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let labels = r#"source="web",destination="api.example.com",direction="egress",reporter="source""#;
        for line in [
            format!("meshwatch_pair_requests_total{{{labels},status_class=\"2xx\"}} 4"),
            format!("meshwatch_pair_requests_total{{{labels},status_class=\"5xx\"}} 1"),
            format!("meshwatch_pair_request_duration_seconds_count{{{labels}}} 5"),
            format!("meshwatch_pair_request_duration_seconds_bucket{{{labels},le=\"0.01\"}} 5"),
            format!("meshwatch_pair_request_duration_seconds_bucket{{{labels},le=\"0.005\"}} 0"),
            format!("meshwatch_pair_response_flags_total{{{labels},flag=\"UF\"}} 1"),
            format!("meshwatch_pair_first_seen_timestamp_seconds{{{labels}}} 10"),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        let (_, json) = get(router(s), "/api/v1/pairs").await;
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["pairs"][0]["destination"], "api.example.com");
        assert_eq!(v["pairs"][0]["total_flows"], 5);
    }
}
