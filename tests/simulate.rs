//! The simulator through real gRPC into the real binary: a short fast-forward run is counted
//! exactly, pair by pair and reporter by reporter, and the ground truth it writes matches
//! what meshwatch saw.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use meshwatch::sim::generate::{Generator, Truth};
use meshwatch::sim::scenario::{Scenario, parse_offset_ms};

const SCENARIO: &str = r#"
name = "test-mesh"
start = "2026-01-05"
duration = "1d"
namespace = "shop"
seed = 9
envoy_stats = true
services = [
  { name = "frontend" }, { name = "cart" }, { name = "catalog" }, { name = "db" },
  { name = "api.stripe.com", external = true },
]
[[edges]]
from = "internet"
to = "frontend"
rate = 4
[[edges]]
from = "frontend"
to = ["cart", "catalog"]
rate = 2
error_ratio = 0.01
[[edges]]
from = "catalog"
to = "db"
protocol = "tcp"
rate = 1
[[edges]]
from = "cart"
to = "api.stripe.com"
rate = 0.5
[[incidents]]
kind = "error_burst"
from = "frontend"
to = "cart"
start = "30m"
duration = "10m"
magnitude = 0.3
[[incidents]]
kind = "new_edge"
from = "catalog"
to = "cart"
start = "1h05m"
duration = "10m"
magnitude = 0.5
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_forward_run_is_counted_exactly_and_matches_its_ground_truth() {
    let dir = TempDir::new("simulate");
    let scenario = Scenario::parse(SCENARIO).unwrap();
    let (scenario_path, config) = replay_files(dir.path(), SCENARIO, "");
    let mw = Meshwatch::start(&config, &[("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())]);

    let truth_path = dir.path().join("truth.jsonl");
    let stdout = simulate_into(
        &mw,
        &scenario_path,
        &["--duration", "2h", "--seed", "5", "--rate", "max", "--truth", truth_path.to_str().unwrap()],
    );
    let sent: f64 = stdout.split_whitespace().nth(1).unwrap().parse().unwrap();

    // What the generator makes of the same scenario, seed and duration.
    let mut expected = Generator::new(scenario.clone(), 5, 10_000);
    expected.limit(parse_offset_ms("2h").unwrap());
    while expected.next_slice(0).is_some() {}
    assert_eq!(sent, expected.total_entries() as f64);

    // Every entry decoded, and every one in a pair series once the replay went idle.
    let flows =
        |m: &Metrics| m.sum("meshwatch_pair_requests_total", &[]) + m.sum("meshwatch_pair_tcp_connections_total", &[]);
    let m = mw.metrics_until(Duration::from_secs(30), |m| flows(m) >= sent).await;
    assert_eq!(m.sum("meshwatch_als_entries_decoded_total", &[]), sent);
    assert_eq!(m.sum("meshwatch_als_entries_rejected_total", &[]), 0.0, "{}", m.text);
    assert_eq!(flows(&m), sent);
    assert_eq!(m.sum("meshwatch_identities_unresolved_total", &[]), 0.0);

    let classes = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];
    for ((src, dst, dir, reporter), counts) in expected.counts() {
        let pair =
            [("source", src.as_str()), ("destination", dst.as_str()), ("direction", dir), ("reporter", reporter)];
        for (class, n) in classes.iter().zip(counts.requests) {
            let mut labels = pair.to_vec();
            labels.push(("status_class", class));
            assert_eq!(m.get("meshwatch_pair_requests_total", &labels).unwrap_or(0.0), n as f64, "{pair:?} {class}");
        }
        assert_eq!(
            m.get("meshwatch_pair_tcp_connections_total", &pair).unwrap_or(0.0),
            counts.connections as f64,
            "{pair:?}"
        );
    }

    // The callers' Envoys' stats (the stats sink, cumulative counters from a first flush
    // before any traffic): every request, 5xx and connection to each upstream inside the
    // mesh, the gateway's, the TCP one's and the new edge's included; not the external API.
    let upstream = expected.upstream_counts();
    assert_eq!(upstream.len(), 5, "{upstream:?}");
    let upstream_total = |m: &Metrics| m.sum("meshwatch_pair_upstream_requests_total", &[]);
    let all: u64 = upstream.values().map(|(r, _, _)| r).sum();
    let m = mw.metrics_until(Duration::from_secs(30), |m| upstream_total(m) >= all as f64).await;
    for ((src, dst, dir), (requests, errors, connections)) in &upstream {
        let pair = [("source", src.as_str()), ("destination", dst.as_str()), ("direction", *dir)];
        assert_eq!(m.get("meshwatch_pair_upstream_requests_total", &pair), Some(*requests as f64), "{pair:?}");
        assert_eq!(m.get("meshwatch_pair_upstream_errors_total", &pair), Some(*errors as f64), "{pair:?}");
        assert_eq!(m.get("meshwatch_pair_upstream_connections_total", &pair), Some(*connections as f64), "{pair:?}");
    }
    assert!(upstream.values().any(|(r, e, c)| *r == 0 && *e == 0 && *c > 0), "the TCP upstream: {upstream:?}");
    assert!(upstream.values().all(|(r, _, c)| *r > 0 || *c > 0), "{upstream:?}");
    assert_eq!(upstream_total(&m), all as f64);
    assert_eq!(m.sum("meshwatch_envoy_stats_rejected_total", &[]), 0.0);

    // The ground truth file: the two incidents, as the generator labels them.
    let written: Vec<Truth> =
        std::fs::read_to_string(&truth_path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(written, expected.truth());
    assert_eq!(written.len(), 2);
    // The error burst shows in its pair's 5xx: many more than the 1 % elsewhere.
    let burst = &written[0];
    assert_eq!(burst.kind, "error_burst");
    let errors = m.get(
        "meshwatch_pair_requests_total",
        &[
            ("source", &burst.source),
            ("destination", &burst.destination),
            ("reporter", "source"),
            ("status_class", "5xx"),
        ],
    );
    assert!(errors.unwrap() > 200.0, "{errors:?}");
    // The new edge appears first in the window of its start, or just after.
    let new_edge = &written[1];
    assert_eq!(new_edge.kind, "new_edge");
    let first_seen_s = m
        .get(
            "meshwatch_pair_first_seen_timestamp_seconds",
            &[("source", &new_edge.source), ("destination", &new_edge.destination), ("reporter", "source")],
        )
        .unwrap();
    let first_seen_ms = (first_seen_s * 1000.0) as i64;
    assert!(
        first_seen_ms >= new_edge.start_ms - 10_000 && first_seen_ms <= new_edge.start_ms + 30_000,
        "first seen {first_seen_ms}, incident from {}",
        new_edge.start_ms
    );
    assert!(mw.stop().success());
}

#[test]
fn eval_stops_on_sigterm_without_a_report_or_its_data_directory() {
    let dir = TempDir::new("eval-term");
    let scenario_path = dir.path().join("scenario.toml");
    std::fs::write(&scenario_path, SCENARIO).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshwatch"))
        .args(["eval", scenario_path.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let data = std::env::temp_dir().join(format!("meshwatch-eval-{}", child.id()));
    let started = std::time::Instant::now();
    while !data.exists() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(data.exists(), "eval made its data directory");
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let asked = std::time::Instant::now();
    let mut status = None;
    while status.is_none() && asked.elapsed() < Duration::from_secs(15) {
        status = child.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let status = status.expect("eval ended within 15 s of SIGTERM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success() && stderr.contains("eval interrupted"), "{status:?}: {stderr}");
    assert!(out.stdout.is_empty(), "no report");
    assert!(!data.exists(), "its data directory is removed");
}

#[tokio::test]
async fn eval_runs_end_to_end_and_nothing_is_detected_while_pairs_learn() {
    let dir = TempDir::new("eval");
    let scenario_path = dir.path().join("scenario.toml");
    std::fs::write(&scenario_path, SCENARIO).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshwatch"))
        .args(["eval", scenario_path.to_str().unwrap(), "--duration", "2h", "--json"])
        .env("MESHWATCH_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["entries_sent"], report["entries_counted"]);
    assert!(report["entries_sent"].as_u64().unwrap() > 50_000);
    let per_kind = report["quality"]["per_kind"].as_array().unwrap();
    let kinds: Vec<&str> = per_kind.iter().map(|k| k["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["error_burst", "new_edge"]);
    for k in per_kind {
        assert_eq!(k["incidents"], 1);
        assert_eq!(k["recall"], 0.0, "two hours are all warm-up (a day): nothing can be detected");
    }
    // An ideal test, which needs no warm-up, finds the error burst in its own requests; a new
    // edge has no ideal time.
    let ideal = per_kind[0]["ideal_ttd_median_s"].as_f64().expect("the burst's ideal time");
    assert!(ideal > 0.0 && ideal <= 600.0, "{ideal}");
    assert!(per_kind[1]["ideal_ttd_median_s"].is_null());
    let burst = &report["quality"]["incidents"][0];
    assert_eq!((burst["kind"].as_str(), burst["ideal_ttd_s"].as_f64()), (Some("error_burst"), Some(ideal)));
    assert_eq!(report["quality"]["detections"], 0);
}
