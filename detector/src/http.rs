//! The HTTP side: `/metrics`, health, and the JSON API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;
use tracing::warn;

use crate::alert::fnv;
use crate::anomaly::{Anomaly, in_units};
use crate::model::{ModelDetail, PairModel};
use crate::pairs::{PairEntry, PairTable};
use crate::score::Detector;
use crate::trust;
use meshwatch_collector::flow::Direction;
use meshwatch_collector::pipeline::wall_clock_ms;
use meshwatch_collector::window::PairKey;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    pub registry: Registry,
    pub pairs: Arc<PairTable>,
    pub detector: Arc<Mutex<Detector>>,
    /// True from when every listener is up until shutdown starts.
    pub ready: Arc<AtomicBool>,
    /// For silences and dead letters (none in unit tests of the read-only API).
    pub store: Option<crate::store::Store>,
    /// Bearer token that mutating calls must present; without one they are refused.
    pub api_token: Option<String>,
    /// Bearer token that reads (`/metrics`, `/api/v1/*`) must present (or `api_token`);
    /// without one they are open.
    pub read_token: Option<String>,
}

pub fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/pairs", get(pairs))
        .route("/api/v1/pairs/{id}", get(pair))
        .route("/api/v1/pairs/{id}/trail", get(trail))
        .route("/api/v1/anomalies", get(anomalies))
        .route("/api/v1/anomalies/{id}", get(anomaly))
        .route("/api/v1/findings", get(findings))
        .route("/api/v1/graph", get(graph))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/silences", get(silences).post(create_silence))
        .route("/api/v1/silences/{id}", axum::routing::delete(expire_silence))
        .route("/api/v1/deadletters", get(dead_letters))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), reads_need_token));
    Router::new()
        .route("/", get(ui))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(state)
}

/// With `read_token` set, a request without it (or the API token) is refused with 401.
async fn reads_need_token(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(read) = state.read_token.as_deref() {
        let headers = request.headers();
        let api = state.api_token.as_deref();
        if !bearer_is(headers, read) && !api.is_some_and(|t| bearer_is(headers, t)) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (listen.read_token)");
        }
    }
    next.run(request).await
}

/// Whether the request's bearer token is `token`, compared in constant time (it is a secret).
fn bearer_is(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    })
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

/// The web UI: one page, its script and style inline, nothing fetched but the API.
const UI: &str = include_str!("ui.html");

async fn ui() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], UI).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// A pair's id in the API: FNV-1a (64 bit) of its key, in hex.
pub fn pair_id(k: &PairKey) -> String {
    format!("{:016x}", fnv(&[&k.source, &k.destination, k.direction.as_str(), k.reporter.as_str()]))
}

/// The latest verdict of one signal, in the signal's unit.
#[derive(Debug, Serialize)]
struct SignalView {
    score: f64,
    observed: f64,
    expected: f64,
    lower: f64,
    upper: f64,
    /// Windows the verdict covers (one of `Cadence::scales`, or the half hour of a quiet
    /// pair's median).
    scale_windows: usize,
    anomalous: bool,
}

/// One pair in `GET /api/v1/pairs`.
#[derive(Debug, Serialize)]
struct PairView {
    id: String,
    source: String,
    destination: String,
    direction: &'static str,
    reporter: &'static str,
    /// `learning` until the pair has enough history to raise anomalies, then `ready`.
    state: &'static str,
    first_seen_ms: i64,
    last_seen_ms: i64,
    /// Requests plus connections, across restarts.
    total_flows: u64,
    signals: BTreeMap<&'static str, SignalView>,
}

fn signals(model: Option<&PairModel>, window_ms: i64) -> BTreeMap<&'static str, SignalView> {
    model
        .map(|m| {
            m.last_verdicts()
                .map(|v| {
                    let (observed, expected, lower, upper) = in_units(v, window_ms);
                    let view = SignalView {
                        score: v.score(),
                        observed,
                        expected,
                        lower,
                        upper,
                        scale_windows: v.scale,
                        anomalous: m.is_active(v.signal),
                    };
                    (v.signal.as_str(), view)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pair_view(k: &PairKey, e: &PairEntry, d: &Detector) -> PairView {
    let model = d.model(k);
    PairView {
        id: pair_id(k),
        source: k.source.to_string(),
        destination: k.destination.to_string(),
        direction: k.direction.as_str(),
        reporter: k.reporter.as_str(),
        state: if model.is_none_or(|m| m.learning(&d.cfg)) { "learning" } else { "ready" },
        first_seen_ms: e.first_seen_ms,
        last_seen_ms: e.last_seen_ms,
        total_flows: e.total_flows,
        signals: signals(model, d.window_ms),
    }
}

fn pair_views(state: &AppState) -> Vec<PairView> {
    let table = state.pairs.snapshot();
    let d = crate::lock(&state.detector);
    table.iter().map(|(k, e)| pair_view(k, e, &d)).collect()
}

#[derive(Debug, Serialize)]
struct PairsResponse {
    pairs: Vec<PairView>,
}

async fn pairs(State(state): State<AppState>) -> axum::Json<PairsResponse> {
    axum::Json(PairsResponse { pairs: pair_views(&state) })
}

/// One pair in `GET /api/v1/pairs/{id}`: as in the list, plus its model.
#[derive(Debug, Serialize)]
struct PairDetailView {
    #[serde(flatten)]
    pair: PairView,
    /// Start of the last window scored (Unix milliseconds): `recent_windows` count back from it.
    last_window_start_ms: Option<i64>,
    /// `None` before the pair's first window is scored.
    model: Option<ModelDetail>,
}

/// The pair with API id `id`.
fn pair_by_id(state: &AppState, id: &str) -> Option<(PairKey, PairEntry)> {
    state.pairs.find(|k| pair_id(k) == id)
}

fn no_pair(id: &str) -> Response {
    not_found(format!("no pair with id {id}"))
}

async fn pair(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some((key, entry)) = pair_by_id(&state, &id) else { return no_pair(&id) };
    let d = crate::lock(&state.detector);
    let next_ms = d.last_start_ms.map_or(0, |t| t + d.window_ms);
    let model = d.model(&key).map(|m| m.detail(next_ms, d.window_ms, &d.cfg));
    let view = PairDetailView { pair: pair_view(&key, &entry, &d), last_window_start_ms: d.last_start_ms, model };
    axum::Json(view).into_response()
}

/// The last hours of a pair's signals (`trail::Trails`): empty for a pair without a trail.
async fn trail(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some((key, _)) = pair_by_id(&state, &id) else { return no_pair(&id) };
    let d = crate::lock(&state.detector);
    axum::Json(d.trails.view(&key)).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct AnomalyQuery {
    /// Only anomalies that started at or after this time (Unix milliseconds), or are active.
    since: Option<i64>,
    /// `critical` or `warning`.
    severity: Option<String>,
    /// Only active (`true`) or only ended (`false`) anomalies.
    active: Option<bool>,
}

#[derive(Debug, Serialize)]
struct AnomaliesResponse {
    anomalies: Vec<Anomaly>,
}

async fn anomalies(State(state): State<AppState>, Query(q): Query<AnomalyQuery>) -> Response {
    if let Some(s) = q.severity.as_deref()
        && !matches!(s, "critical" | "warning")
    {
        return (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({"error": "severity is critical or warning"})))
            .into_response();
    }
    let d = crate::lock(&state.detector);
    let list = d
        .anomalies
        .iter()
        .filter(|a| q.since.is_none_or(|t| a.started_ms >= t || a.ended_ms.is_none()))
        .filter(|a| q.severity.as_deref().is_none_or(|s| a.severity == s))
        .filter(|a| q.active.is_none_or(|act| act == a.ended_ms.is_none()))
        .cloned()
        .collect();
    axum::Json(AnomaliesResponse { anomalies: list }).into_response()
}

async fn anomaly(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let d = crate::lock(&state.detector);
    match id.parse::<u64>().ok().and_then(|id| d.anomalies.iter().find(|a| a.id == id)) {
        Some(a) => axum::Json(a.clone()).into_response(),
        None => not_found(format!("no anomaly or finding with id {id}")),
    }
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message.into() }))).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct AlertQuery {
    /// `pending`, `firing` or `resolved`.
    state: Option<String>,
}

async fn alerts(State(state): State<AppState>, Query(q): Query<AlertQuery>) -> Response {
    if let Some(s) = q.state.as_deref()
        && !matches!(s, "pending" | "firing" | "resolved")
    {
        return bad_request("state is pending, firing or resolved".into());
    }
    let d = crate::lock(&state.detector);
    let list: Vec<_> =
        d.alerts.iter().filter(|a| q.state.as_deref().is_none_or(|s| a.state.as_str() == s)).cloned().collect();
    axum::Json(serde_json::json!({ "alerts": list })).into_response()
}

async fn silences(State(state): State<AppState>) -> Response {
    let d = crate::lock(&state.detector);
    axum::Json(serde_json::json!({ "silences": d.silences })).into_response()
}

/// The refusal of a mutating call without the configured bearer token, if it is one.
fn refusal(state: &AppState, headers: &axum::http::HeaderMap) -> Option<Response> {
    let Some(token) = state.api_token.as_deref() else {
        return Some(error(StatusCode::FORBIDDEN, "changes are disabled: set alerting.api_token"));
    };
    (!bearer_is(headers, token)).then(|| error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    matchers: Vec<crate::alert::Matcher>,
    /// RFC 3339; now when absent.
    #[serde(rename = "startsAt")]
    starts_at: Option<String>,
    #[serde(rename = "endsAt")]
    ends_at: String,
    #[serde(rename = "createdBy")]
    created_by: String,
    comment: String,
}

/// Limits of a silence's fields, in bytes (and of its matchers, in number).
const SILENCE_MAX_MATCHERS: usize = 32;
const SILENCE_MAX_NAME: usize = 128;
const SILENCE_MAX_VALUE: usize = 1_024;
const SILENCE_MAX_CREATED_BY: usize = 256;
const SILENCE_MAX_COMMENT: usize = 4_096;
/// Silences active or pending at once, and expired ones kept listed (the newest, within
/// `SILENCE_RETENTION_MS`).
pub const MAX_SILENCES: usize = 1_000;
/// How long an expired silence stays listed before it is purged (Alertmanager keeps five days).
pub const SILENCE_RETENTION_MS: i64 = 5 * 86_400_000;

/// A problem with a text field: over `max` bytes, or holding control characters.
fn text_problem(what: &str, value: &str, max: usize) -> Option<String> {
    if value.len() > max {
        Some(format!("{what}: {} bytes, at most {max}", value.len()))
    } else if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        Some(format!("{what}: control characters"))
    } else {
        None
    }
}

fn validate_silence(body: &[u8]) -> Result<crate::alert::Silence, String> {
    let new: NewSilence = serde_json::from_slice(body).map_err(|e| format!("not a silence: {e}"))?;
    let mut problems = Vec::new();
    if new.matchers.is_empty() {
        problems.push("matchers: at least one".to_string());
    }
    if new.matchers.len() > SILENCE_MAX_MATCHERS {
        problems.push(format!("matchers: {}, at most {SILENCE_MAX_MATCHERS}", new.matchers.len()));
    }
    for (i, m) in new.matchers.iter().enumerate().take(SILENCE_MAX_MATCHERS) {
        if m.name.is_empty() {
            problems.push(format!("matchers[{i}].name: empty"));
        }
        problems.extend(text_problem(&format!("matchers[{i}].name"), &m.name, SILENCE_MAX_NAME));
        problems.extend(text_problem(&format!("matchers[{i}].value"), &m.value, SILENCE_MAX_VALUE));
        if m.is_regex
            && m.value.len() <= SILENCE_MAX_VALUE
            && regex::RegexBuilder::new(&m.value).size_limit(1 << 20).build().is_err()
        {
            problems.push(format!("matchers[{i}].value: `{}` is not a regular expression", m.value));
        }
    }
    if new.created_by.trim().is_empty() {
        problems.push("createdBy: empty".into());
    }
    problems.extend(text_problem("createdBy", &new.created_by, SILENCE_MAX_CREATED_BY));
    if new.comment.trim().is_empty() {
        problems.push("comment: empty".into());
    }
    problems.extend(text_problem("comment", &new.comment, SILENCE_MAX_COMMENT));
    let now = wall_clock_ms();
    let starts = match new.starts_at.as_deref().map(crate::timefmt::parse_ms) {
        None => now,
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            problems.push(format!("startsAt: {e}"));
            now
        }
    };
    let ends = crate::timefmt::parse_ms(&new.ends_at).unwrap_or_else(|e| {
        problems.push(format!("endsAt: {e}"));
        now
    });
    if ends <= starts.max(now) && problems.is_empty() {
        problems.push("endsAt: must be after startsAt and in the future".into());
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let id = format!(
        "{:016x}",
        crate::alert::fnv(&[&now.to_string(), &new.created_by, &new.comment, &format!("{:?}", new.matchers)])
    );
    Ok(crate::alert::Silence {
        id,
        matchers: new.matchers,
        starts_at_ms: starts,
        ends_at_ms: ends,
        created_by: new.created_by,
        comment: new.comment,
    })
}

/// Saves a silence, purging those expired for longer than `SILENCE_RETENTION_MS` (or beyond
/// the newest `MAX_SILENCES` expired); the error response if that failed, or if
/// `MAX_SILENCES` are active or pending already.
async fn save_silence(state: &AppState, silence: crate::alert::Silence) -> Option<Response> {
    let now = wall_clock_ms();
    let (purged, current) = {
        let d = crate::lock(&state.detector);
        let others = || d.silences.iter().filter(|s| s.id != silence.id);
        let current = others().filter(|s| s.ends_at_ms > now).count();
        // Expired ones: the newest `MAX_SILENCES` of the last five days stay listed.
        let mut expired: Vec<_> = others().filter(|s| s.ends_at_ms <= now).collect();
        expired.sort_by_key(|s| std::cmp::Reverse(s.ends_at_ms));
        let purged: Vec<String> = expired
            .iter()
            .enumerate()
            .filter(|(i, s)| *i >= MAX_SILENCES || s.ends_at_ms < now - SILENCE_RETENTION_MS)
            .map(|(_, s)| s.id.clone())
            .collect();
        (purged, current)
    };
    if silence.ends_at_ms > now && current >= MAX_SILENCES {
        return Some(error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{current} silences are active or pending already (at most {MAX_SILENCES}): expire some"),
        ));
    }
    if let Some(store) = state.store.clone() {
        let (s, p) = (silence.clone(), purged.clone());
        if !matches!(tokio::task::spawn_blocking(move || store.save_silence(&s, &p)).await, Ok(Ok(()))) {
            return Some(error(StatusCode::INTERNAL_SERVER_ERROR, "cannot save the silence"));
        }
    }
    let mut d = crate::lock(&state.detector);
    d.silences.retain(|x| x.id != silence.id && !purged.contains(&x.id));
    d.silences.push(silence);
    None
}

async fn create_silence(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    let silence = match validate_silence(&body) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let id = silence.id.clone();
    match save_silence(&state, silence).await {
        None => axum::Json(serde_json::json!({ "silenceID": id })).into_response(),
        Some(r) => r,
    }
}

/// Expires a silence now (it stays listed, as in Alertmanager).
async fn expire_silence(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    let found = crate::lock(&state.detector).silences.iter().find(|s| s.id == id).cloned();
    let Some(mut silence) = found else { return not_found(format!("no silence with id {id}")) };
    silence.ends_at_ms = silence.ends_at_ms.min(wall_clock_ms());
    match save_silence(&state, silence).await {
        None => axum::Json(serde_json::json!({ "expired": id })).into_response(),
        Some(r) => r,
    }
}

#[derive(Debug, serde::Deserialize)]
struct DeadLetterQuery {
    /// One receiver's.
    receiver: Option<String>,
    /// At most this many, the newest first (default 100, at most 1,000).
    limit: Option<usize>,
}

async fn dead_letters(State(state): State<AppState>, Query(q): Query<DeadLetterQuery>) -> Response {
    let Some(store) = state.store.clone() else {
        return axum::Json(serde_json::json!({ "dead_letters": [], "total": 0 })).into_response();
    };
    match tokio::task::spawn_blocking(move || store.dead_letters()).await {
        Ok(Ok(mut list)) => {
            list.retain(|d| q.receiver.as_ref().is_none_or(|r| &d.receiver == r));
            let total = list.len();
            list.reverse();
            list.truncate(q.limit.unwrap_or(100).min(1_000));
            axum::Json(serde_json::json!({ "dead_letters": list, "total": total })).into_response()
        }
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the dead letters"),
    }
}

#[derive(Debug, serde::Deserialize)]
struct FindingQuery {
    /// Only findings that started at or after this time (Unix milliseconds), or are active.
    since: Option<i64>,
    /// One finding kind (`new_edge`, `mtls_downgrade`, …).
    kind: Option<String>,
    active: Option<bool>,
}

#[derive(Debug, Serialize)]
struct FindingsResponse {
    findings: Vec<Anomaly>,
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn findings(State(state): State<AppState>, Query(q): Query<FindingQuery>) -> Response {
    if let Some(k) = q.kind.as_deref()
        && !trust::is_finding(k)
    {
        return bad_request(format!("kind `{k}` is none of {}", trust::KINDS.join(", ")));
    }
    let d = crate::lock(&state.detector);
    let list = d
        .anomalies
        .iter()
        .filter(|a| trust::is_finding(&a.kind))
        .filter(|a| q.kind.as_deref().is_none_or(|k| a.kind == k))
        .filter(|a| q.since.is_none_or(|t| a.started_ms >= t || a.ended_ms.is_none()))
        .filter(|a| q.active.is_none_or(|act| act == a.ended_ms.is_none()))
        .cloned()
        .collect();
    axum::Json(FindingsResponse { findings: list }).into_response()
}

/// A node of `GET /api/v1/graph`, in the fields Grafana's Node Graph panel reads.
#[derive(Debug, Serialize)]
struct GraphNode {
    id: String,
    title: String,
    /// `mesh`, `outside` (an external destination or the internet) or `foreign` (a SPIFFE
    /// ID of another trust domain).
    subtitle: &'static str,
    /// Requests and connections per second received, in the last window.
    mainstat: f64,
    /// Requests and connections per second sent, in the last window.
    secondarystat: f64,
}

/// An edge of `GET /api/v1/graph`.
#[derive(Debug, Serialize)]
struct GraphEdge {
    id: String,
    source: String,
    target: String,
    /// Requests and connections per second, in the last window.
    mainstat: f64,
    /// Error ratio in the last window (null without requests).
    secondarystat: Option<f64>,
    direction: &'static str,
    /// Share of the requests the destination's sidecar received over mTLS (null when no
    /// destination sidecar reports).
    mtls_share: Option<f64>,
    first_seen_ms: i64,
    last_seen_ms: i64,
    /// `learning`, `known`, or the kind of a finding active on the edge.
    state: &'static str,
    highlighted: bool,
    #[serde(rename = "detail__direction")]
    detail_direction: &'static str,
    #[serde(rename = "detail__state")]
    detail_state: &'static str,
}

#[derive(Debug, Serialize)]
struct GraphResponse {
    nodes: Vec<GraphNode>,
    edges: Vec<GraphEdge>,
}

fn short_name(identity: &str) -> String {
    match identity.strip_prefix("spiffe://") {
        Some(rest) => rest.rsplit('/').next().unwrap_or(rest).to_string(),
        None => identity.to_string(),
    }
}

async fn graph(State(state): State<AppState>) -> axum::Json<GraphResponse> {
    let d = crate::lock(&state.detector);
    let t = &d.trust;
    let learning = d.last_start_ms.is_none_or(|at| !t.learned(at));
    let mut nodes: BTreeMap<String, GraphNode> = BTreeMap::new();
    let mut edges = Vec::new();
    let mut book: Vec<_> = t.edges().collect();
    book.sort_by(|a, b| a.0.cmp(b.0));
    for (k, e) in book {
        let (src, dst, dir) = (&*k.source, &*k.destination, k.direction.as_str());
        let (rate, error_ratio) = t.last_rates(k);
        let finding = trust::KINDS.into_iter().find(|kind| d.anomalies.is_active(src, dst, dir, kind));
        let state = match finding {
            Some(kind) => kind,
            None if learning => "learning",
            None => "known",
        };
        let seen = e.mtls + e.plaintext;
        edges.push(GraphEdge {
            id: format!("{:016x}", fnv(&[src, dst, dir])),
            source: src.to_string(),
            target: dst.to_string(),
            mainstat: rate,
            secondarystat: error_ratio,
            direction: dir,
            mtls_share: (seen > 0).then(|| e.mtls as f64 / seen as f64),
            first_seen_ms: e.first_ms,
            last_seen_ms: e.last_ms,
            state,
            highlighted: finding.is_some(),
            detail_direction: dir,
            detail_state: state,
        });
        for (id, inside, received) in [(src, k.direction != Direction::Ingress, false), (dst, dir != "egress", true)] {
            let node = nodes.entry(id.to_string()).or_insert_with(|| GraphNode {
                id: id.to_string(),
                title: short_name(id),
                subtitle: "mesh",
                mainstat: 0.0,
                secondarystat: 0.0,
            });
            if !inside {
                node.subtitle = if id.starts_with("spiffe://") { "foreign" } else { "outside" };
            }
            if received {
                node.mainstat += rate;
            } else {
                node.secondarystat += rate;
            }
        }
    }
    axum::Json(GraphResponse { nodes: nodes.into_values().collect(), edges })
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
        let detector = Arc::new(Mutex::new(Detector::new(crate::model::DetectorConfig::default(), 10_000)));
        AppState {
            registry,
            pairs,
            detector,
            ready: Arc::new(AtomicBool::new(false)),
            store: None,
            api_token: None,
            read_token: None,
        }
    }

    #[tokio::test]
    async fn with_a_read_token_reads_need_it_or_the_api_token_and_probes_stay_open() {
        let s = AppState { api_token: Some("change".into()), read_token: Some("read".into()), ..state() };
        let get = |path: &str, token: Option<&str>| {
            let mut request = Request::get(path);
            if let Some(t) = token {
                request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            router(s.clone()).oneshot(request.body(Body::empty()).expect("request"))
        };
        for path in ["/metrics", "/api/v1/pairs", "/api/v1/anomalies", "/api/v1/silences", "/api/v1/deadletters"] {
            assert_eq!(get(path, None).await.expect("response").status(), StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(get(path, Some("reader")).await.expect("response").status(), StatusCode::UNAUTHORIZED, "{path}");
        }
        for token in ["read", "change"] {
            assert_eq!(get("/api/v1/pairs", Some(token)).await.expect("response").status(), StatusCode::OK);
            assert_eq!(get("/metrics", Some(token)).await.expect("response").status(), StatusCode::OK);
        }
        for path in ["/healthz", "/"] {
            assert_eq!(get(path, None).await.expect("response").status(), StatusCode::OK, "{path}");
        }
        assert_eq!(get("/readyz", None).await.expect("response").status(), StatusCode::SERVICE_UNAVAILABLE);
        // Without a read token, reads are open.
        let open = router(state()).oneshot(Request::get("/api/v1/pairs").body(Body::empty()).expect("request"));
        assert_eq!(open.await.expect("response").status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn silences_expired_for_five_days_are_purged_and_active_ones_are_capped() {
        let s = AppState { api_token: Some("t".into()), ..state() };
        let now = wall_clock_ms();
        let silence = |id: &str, ends_at_ms: i64| crate::alert::Silence {
            id: id.into(),
            matchers: Vec::new(),
            starts_at_ms: 0,
            ends_at_ms,
            created_by: "ops".into(),
            comment: "c".into(),
        };
        {
            let mut d = crate::lock(&s.detector);
            d.silences.push(silence("old", now - SILENCE_RETENTION_MS - 1_000));
            d.silences.push(silence("recent", now - 1_000));
        }
        let ends = crate::timefmt::format_ms(now + 60_000);
        let posted = std::sync::atomic::AtomicU32::new(0);
        // Each with its own comment: a silence posted again within the same millisecond is the same one.
        let post = |s: &AppState| {
            let n = posted.fetch_add(1, Ordering::Relaxed);
            let body = format!(
                r#"{{"matchers":[{{"name":"kind","value":"x"}}],"endsAt":"{ends}","createdBy":"ops","comment":"c{n}"}}"#
            );
            router(s.clone()).oneshot(
                Request::post("/api/v1/silences")
                    .header(header::AUTHORIZATION, "Bearer t")
                    .body(Body::from(body))
                    .expect("request"),
            )
        };
        assert_eq!(post(&s).await.expect("response").status(), StatusCode::OK);
        let ids: Vec<String> = crate::lock(&s.detector).silences.iter().map(|x| x.id.clone()).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&"recent".to_string()) && !ids.contains(&"old".to_string()), "{ids:?}");
        // With the one posted, MAX_SILENCES are active.
        let more = (1..MAX_SILENCES).map(|i| silence(&i.to_string(), now + 60_000));
        crate::lock(&s.detector).silences.extend(more);
        assert_eq!(post(&s).await.expect("response").status(), StatusCode::TOO_MANY_REQUESTS);
        // Expiring one makes room.
        let expire = Request::delete("/api/v1/silences/7").header(header::AUTHORIZATION, "Bearer t");
        let resp = router(s.clone()).oneshot(expire.body(Body::empty()).expect("request")).await;
        assert_eq!(resp.expect("response").status(), StatusCode::OK);
        assert_eq!(post(&s).await.expect("response").status(), StatusCode::OK);
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
        stats.errors = 2;
        for us in [6_000, 7_000, 8_000, 9_000, 10_000] {
            stats.latency.add(us);
        }
        let key = PairKey {
            source: Arc::from("web"),
            destination: Arc::from("api.example.com"),
            direction: Direction::Egress,
            reporter: Reporter::Source,
        };
        let window = ClosedWindow {
            start_ms: 10_000,
            end_ms: 20_000,
            pairs: vec![(key, stats)],
            evicted: Vec::new(),
            ..Default::default()
        };
        s.pairs.apply(&window);
        let (status, text) = get(router(s.clone()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let labels = concat!(
            r#"source="web",destination="api.example.com",direction="egress",reporter="source","#,
            r#"source_workload_namespace="unknown",destination_workload_namespace="unknown","#,
            r#"source_principal="unknown",destination_principal="unknown""#
        );
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
        let (_, json) = get(router(s.clone()), "/api/v1/pairs").await;
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["pairs"][0]["destination"], "api.example.com");
        assert_eq!(v["pairs"][0]["total_flows"], 5);
        assert_eq!(v["pairs"][0]["state"], "learning");
        let id = v["pairs"][0]["id"].as_str().expect("id").to_string();
        let (status, one) = get(router(s.clone()), &format!("/api/v1/pairs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{one}");
        let one: serde_json::Value = serde_json::from_str(&one).expect("json");
        assert_eq!(one["destination"], "api.example.com");
        assert!(one["model"].is_null(), "no window scored yet: {one}");
        crate::lock(&s.detector).process(&window);
        let (_, one) = get(router(s.clone()), &format!("/api/v1/pairs/{id}")).await;
        let one: serde_json::Value = serde_json::from_str(&one).expect("json");
        assert_eq!(one["last_window_start_ms"], 10_000);
        let model = &one["model"];
        assert_eq!(model["windows"], 1);
        assert_eq!(model["recent_windows"][0]["requests"], 5.0);
        assert_eq!(model["recent_windows"][0]["errors"], 2.0, "the 5xx and the UF-flagged request");
        // The first window teaches the request level and the median latency.
        assert!(model["baselines"]["request_rate"]["level_per_s"].as_f64().expect("level") > 0.0, "{model}");
        assert!(model["baselines"]["latency_p50"]["expected_seconds"].as_f64().expect("p50") > 0.0, "{model}");
        assert!(model["baselines"]["latency_p99"].is_null(), "five requests do not teach a p99");
        assert_eq!(get(router(s.clone()), "/api/v1/pairs/nope").await.0, StatusCode::NOT_FOUND);
        let (status, body) = get(router(s.clone()), "/api/v1/anomalies?since=0&severity=critical").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"anomalies":[]}"#));
        assert_eq!(get(router(s), "/api/v1/anomalies?severity=bad").await.0, StatusCode::BAD_REQUEST);
    }
}
