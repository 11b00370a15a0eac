//! The web UI in a real headless Chromium: meshwatch is fed a simulated replay with a latency
//! incident and a new edge over real gRPC, and the page it serves at `/` (its script run by
//! the browser against the real API) must show every pair of the replay in the graph, the new
//! edge marked as new, the latency anomaly with its reason, and on the pair's page the band
//! and the detection. Screenshots are written under the target directory as artefacts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The latency scenario of `detect.rs` with a new edge added near its end.
fn scenario() -> String {
    format!(
        "{LATENCY_SCENARIO}{}",
        r#"
[[incidents]]
kind = "new_edge"
from = "cart"
to = "db"
start = "1h55m"
duration = "1h"
magnitude = 2
"#
    )
}

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CATALOG: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
        })
        .expect("chromium (Debian package chromium) is installed")
}

/// Opens `url` in headless Chromium, lets its script run for a few seconds of (virtual) time,
/// writes a screenshot to `shot` and returns the DOM as the script left it.
fn open(url: &str, profile: &Path, shot: &Path) -> String {
    let run = |extra: &[String]| {
        let out = Command::new(chromium())
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--window-size=1400,1100", "--virtual-time-budget=8000"])
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[format!("--screenshot={}", shot.display())]);
    assert!(shot.metadata().is_ok_and(|m| m.len() > 10_000), "no screenshot at {}", shot.display());
    run(&["--dump-dom".to_string()])
}

/// The opening tags in `dom` that start with `<tag` and hold every one of `attrs`.
fn tags<'a>(dom: &'a str, tag: &str, attrs: &[(&str, &str)]) -> Vec<&'a str> {
    dom.match_indices(&format!("<{tag} "))
        .filter_map(|(i, _)| dom[i..].find('>').map(|end| &dom[i..i + end]))
        .filter(|t| attrs.iter().all(|(k, v)| t.contains(&format!("{k}=\"{v}\""))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_mesh_the_new_edge_the_anomaly_and_the_pair_band() {
    let dir = TempDir::new("web-ui");
    let (scenario_path, config) =
        replay_files(dir.path(), &scenario(), "[detector]\nwarmup = \"1h\"\n\n[zero_trust]\nlearning = \"1h\"");
    let env = [("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())];
    let mw = Meshwatch::start(&config, &env);
    simulate_into(&mw, &scenario_path, &["--duration", "2h"]);
    mw.metrics_until(Duration::from_secs(60), |m| {
        m.get("meshwatch_windows_open", &[]) == Some(0.0) && m.sum("meshwatch_windows_closed_total", &[]) >= 700.0
    })
    .await;

    let (_, pairs) = http_get(mw.http, "/api/v1/pairs").await;
    let pairs: serde_json::Value = serde_json::from_str(&pairs).unwrap();
    let pairs = pairs["pairs"].as_array().unwrap();
    let edges: BTreeSet<(&str, &str, &str)> = pairs
        .iter()
        .map(|p| (p["source"].as_str().unwrap(), p["destination"].as_str().unwrap(), p["direction"].as_str().unwrap()))
        .collect();
    // The internet through the gateway to the frontend (as the gateway and as the frontend's
    // sidecar see it), frontend → catalog and cart, catalog → db, and the new cart → db.
    assert_eq!(edges.len(), 6, "{edges:?}");

    let artefacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-ui");
    std::fs::create_dir_all(&artefacts).unwrap();
    let profile = dir.path().join("chromium");
    let base = format!("http://{}/", mw.http);
    let dom = open(&base, &profile, &artefacts.join("mesh.png"));
    assert!(dom.contains(r#"data-rendered="mesh""#), "the page did not render: {dom}");
    for (source, target, direction) in &edges {
        let found = tags(&dom, "g", &[("data-source", source), ("data-target", target), ("data-direction", direction)]);
        assert_eq!(found.len(), 1, "{source} → {target} ({direction}) is not one edge of the graph");
    }
    let new = tags(&dom, "g", &[("data-source", CART), ("data-target", DB)]);
    assert!(new[0].contains(r#"data-state="new""#), "the new edge is not marked new: {}", new[0]);
    let known = tags(&dom, "g", &[("data-source", FRONTEND), ("data-target", CART)]);
    assert!(known[0].contains(r#"data-state="normal""#), "{}", known[0]);
    // Services are grouped by namespace.
    assert_eq!(tags(&dom, "g", &[("data-namespace", "shop")]).len(), 1, "{dom}");

    let row = dom
        .split("<tr ")
        .find(|r| r.contains(r#"data-kind="latency_p50""#))
        .unwrap_or_else(|| panic!("no latency anomaly in the list: {dom}"));
    assert!(row.contains("latency p50") && row.contains("expected"), "no reason in the row: {row}");
    assert!(row.contains("frontend") && row.contains("catalog"), "{row}");
    // The new edge is listed as a finding (db never heard from cart: a new principal for it).
    let finding = dom.split("<tr ").find(|r| r.contains(r#"data-finding="true""#)).expect("a finding in the list");
    assert!(
        ["new_edge", "new_principal"]
            .iter()
            .any(|k| finding.starts_with(&format!(r#"class="anomaly" data-kind="{k}""#))),
        "{finding}"
    );
    assert!(finding.contains("cart → db"), "{finding}");

    // The anomaly's link leads to its pair's page: the band, the observed line, the detection.
    let latency_pair = pairs
        .iter()
        .find(|p| p["source"] == FRONTEND && p["destination"] == CATALOG && p["reporter"] == "source")
        .unwrap();
    let id = latency_pair["id"].as_str().unwrap();
    assert!(row.contains(&format!("href=\"#/pair/{id}\"")), "{row}");
    let page = open(&format!("{base}#/pair/{id}"), &profile, &artefacts.join("pair.png"));
    assert!(page.contains(&format!(r#"data-rendered="pair/{id}""#)), "the pair page did not render: {page}");
    let chart = page
        .split("<svg ")
        .find(|c| c.starts_with(r#"class="chart" data-signal="latency_p50""#))
        .unwrap_or_else(|| panic!("no latency p50 chart: {page}"));
    let band = tags(chart, "path", &[("class", "band")]);
    // One point a minute over the replay's two hours: a band of ~120 points each way.
    assert!(band.len() == 1 && band[0].matches('L').count() > 200, "{band:?}");
    assert!(!tags(chart, "path", &[("class", "observed")]).is_empty());
    assert_eq!(tags(chart, "rect", &[("class", "detection")]).len(), 1, "one latency detection: {chart}");
    assert!(chart.contains(r#"class="hot""#), "hot windows are marked");
    assert!(mw.stop().success());

    // With a read token, the page opened as /#token=… reads with it; opened without, it says
    // what it needs and draws nothing.
    let with_token = [env[0].clone(), ("MESHWATCH_LISTEN__READ_TOKEN", "s3cret".to_string())];
    let mw = Meshwatch::start(&config, &with_token);
    assert_eq!(http_get(mw.http, "/api/v1/pairs").await.0, 401);
    let base = format!("http://{}/", mw.http);
    let dom = open(&format!("{base}#token=s3cret"), &profile, &artefacts.join("mesh-token.png"));
    assert!(dom.contains(r#"data-rendered="mesh""#), "the page did not render with its token: {dom}");
    for (source, target, direction) in &edges {
        let found = tags(&dom, "g", &[("data-source", source), ("data-target", target), ("data-direction", direction)]);
        assert_eq!(found.len(), 1, "{source} → {target} ({direction}) is not one edge of the graph");
    }
    let dom = open(&base, &profile, &artefacts.join("mesh-no-token.png"));
    assert!(!dom.contains(r#"data-rendered="#), "rendered without the token: {dom}");
    assert!(dom.contains("needs its read token"), "{dom}");
    println!("screenshots: {}", artefacts.display());
    assert!(mw.stop().success());
}
