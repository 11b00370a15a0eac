//! Detector benchmark: memory per pair with full daily and weekly seasonality, 100,000 pairs
//! held, the time to score a window of all of them, and the restart time (checkpoint to sled,
//! then open, load and decode every model).
//!
//!     cargo bench --bench detector
//!
//! With `BENCH_UPSTREAM=1` every pair also has Envoy stats of its upstream (the signals of
//! the stats sink), the most a pair holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use meshwatch_collector::flow::UpstreamCounts;
use meshwatch_collector::flow::{Direction, Reporter};
use meshwatch_collector::window::{ClosedWindow, PairKey, PairStats, UpstreamStats};
use meshwatch_detector::anomaly::Anomalies;
use meshwatch_detector::model::{DetectorConfig, PairModel};
use meshwatch_detector::pairs::key_from_proto;
use meshwatch_detector::score::Detector;
use meshwatch_detector::store::Store;
use meshwatch_detector::trust::{Trust, TrustConfig};

const PAIRS: usize = 100_000;
const WINDOW_MS: i64 = 10_000;

fn window(keys: &[PairKey], start_ms: i64, round: u64, upstream: bool) -> ClosedWindow {
    let pairs = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut s = PairStats::default();
            let n = 5 + (i as u64 + round) % 20;
            s.requests[2] = n;
            s.request_bytes = n * 400;
            s.response_bytes = n * 2_000;
            for j in 0..n {
                s.latency.add(10_000 + (j * 997 + i as u64) % 20_000);
            }
            if upstream {
                s.upstream = UpstreamStats {
                    counts: UpstreamCounts { requests: n, connections: 1, ..UpstreamCounts::default() },
                    hosts: Some((3, 3)),
                    flushes: 2,
                };
            }
            (k.clone(), s)
        })
        .collect();
    ClosedWindow { start_ms, end_ms: start_ms + WINDOW_MS, pairs, evicted: Vec::new(), ..Default::default() }
}

fn main() {
    let upstream = std::env::var_os("BENCH_UPSTREAM").is_some_and(|v| v == "1");
    if upstream {
        println!("every pair with Envoy stats of its upstream too");
    }
    println!(
        "PairModel: {} bytes inline, {} bytes encoded when fresh",
        std::mem::size_of::<PairModel>(),
        PairModel::default().to_bytes().len()
    );
    let keys: Vec<PairKey> = (0..PAIRS)
        .map(|i| PairKey {
            source: Arc::from(format!("spiffe://cluster.local/ns/load/sa/caller-{}", i / 10).as_str()),
            destination: Arc::from(format!("spiffe://cluster.local/ns/load/sa/callee-{}", i % 1000).as_str()),
            direction: Direction::EastWest,
            reporter: Reporter::Destination,
        })
        .collect();
    let cfg = DetectorConfig { warmup_windows: 30, ..DetectorConfig::default() };
    let before = common::rss_mib("self");
    let mut detector = Detector::new(cfg, WINDOW_MS);
    // 215 windows: every ring and every half hour of medians full, every baseline past its
    // first 30 windows.
    let mut scoring = Vec::new();
    for w in 0..215 {
        let win = window(&keys, w * WINDOW_MS, w as u64, upstream);
        let t = Instant::now();
        detector.process(&win);
        scoring.push(t.elapsed().as_secs_f64());
    }
    let held = common::rss_mib("self") - before;
    let encoded: usize = detector.models().map(|(_, m)| m.to_bytes().len()).sum();
    scoring.sort_by(f64::total_cmp);
    println!(
        "{PAIRS} pairs held: {held:.0} MiB resident ({:.0} bytes per pair, process total {:.0} MiB)",
        held * 1024.0 * 1024.0 / PAIRS as f64,
        common::rss_mib("self")
    );
    println!("models encoded: {:.0} bytes per pair", encoded as f64 / PAIRS as f64);
    println!(
        "scoring one window of {PAIRS} pairs: median {:.0} ms ({:.2} us per pair)",
        scoring[scoring.len() / 2] * 1e3,
        scoring[scoring.len() / 2] * 1e6 / PAIRS as f64
    );

    let dir = std::env::temp_dir().join(format!("meshwatch-bench-detector-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
    let t = Instant::now();
    let checkpoint = detector.checkpoint();
    store.save_checkpoint(&checkpoint, &[]).unwrap();
    store.flush().unwrap();
    println!("checkpoint of {PAIRS} models to sled: {:.2} s", t.elapsed().as_secs_f64());
    drop((store, detector, checkpoint));

    let t = Instant::now();
    let store = Store::open(&dir).unwrap();
    let loaded = store.load_checkpoint().unwrap();
    let models: Vec<_> =
        loaded.models.iter().filter_map(|(k, b)| Some((key_from_proto(k)?, PairModel::from_bytes(b)?))).collect();
    let anomalies = loaded.anomalies.and_then(|b| Anomalies::from_bytes(&b)).unwrap_or_default();
    let trust = loaded.trust.and_then(|b| Trust::from_bytes(TrustConfig::default(), &b)).unwrap_or_default();
    let n = models.len();
    let restored = Detector::restore(cfg, WINDOW_MS, models, anomalies, trust, loaded.last_start_ms);
    println!("restart: open, load and decode {n} models: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(restored.models().count(), PAIRS);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
