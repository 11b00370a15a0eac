//! Zero-trust findings, measured: a scenario with one incident of every finding kind runs
//! through `meshwatch eval` (the real binary, real gRPC, watermark clock), and each incident
//! must be found, the structural ones within two windows, with nothing false.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

const SCENARIO: &str = r#"
name = "zero-trust"
start = "2026-01-05"
duration = "5h"
namespace = "shop"
seed = 7
policy = "policy.toml"
services = [
  { name = "frontend" },
  { name = "cart" },
  { name = "catalog" },
  { name = "payments" },
  { name = "db" },
  { name = "api.stripe.com", external = true },
  { name = "paste.example.net", external = true },
  { name = "reports" },
  { name = "partner-sync", trust_domain = "partner.example" },
]
[[edges]]
from = "internet"
to = "frontend"
rate = 5
[[edges]]
from = "frontend"
to = ["catalog", "cart"]
rate = 3
[[edges]]
from = "cart"
to = "payments"
rate = 1
[[edges]]
from = "payments"
to = "api.stripe.com"
rate = 1
request_bytes = 900
[[edges]]
from = "catalog"
to = "db"
protocol = "tcp"
rate = 1

[[incidents]]
kind = "new_edge"
from = "catalog"
to = "payments"
start = "1h20m"
duration = "10m"
[[incidents]]
kind = "identity_flood"
from = "internet"
to = "catalog"
start = "1h35m"
duration = "20m"
[[incidents]]
kind = "new_egress"
from = "cart"
to = "paste.example.net"
start = "1h40m"
duration = "10m"
[[incidents]]
kind = "mtls_downgrade"
from = "frontend"
to = "cart"
start = "2h"
duration = "10m"
[[incidents]]
kind = "new_principal"
from = "reports"
to = "catalog"
start = "2h20m"
duration = "10m"
[[incidents]]
kind = "foreign_principal"
from = "partner-sync"
to = "cart"
start = "2h40m"
duration = "10m"
[[incidents]]
kind = "policy_violation"
from = "frontend"
to = "db"
start = "3h"
duration = "10m"
[[incidents]]
kind = "fan_out_scan"
from = "cart"
start = "3h20m"
duration = "10m"
magnitude = 4
[[incidents]]
kind = "denial_surge"
from = "frontend"
to = "catalog"
start = "3h40m"
duration = "10m"
magnitude = 0.4
[[incidents]]
kind = "rate_limit_surge"
from = "internet"
to = "frontend"
start = "4h"
duration = "10m"
[[incidents]]
kind = "egress_bytes_surge"
from = "payments"
to = "api.stripe.com"
start = "4h20m"
duration = "10m"
[[incidents]]
kind = "denial_spread"
from = "frontend"
start = "4h40m"
duration = "10m"
[[incidents]]
kind = "plaintext_edge"
from = "catalog"
to = "cart"
start = "4h45m"
duration = "10m"
"#;

const POLICY: &str = r#"
[[allow]]
from = "external"
to = "spiffe://cluster.local/ns/shop/sa/frontend"
direction = "ingress"
[[allow]]
from = "spiffe://cluster.local/ns/shop/sa/*"
to = "spiffe://cluster.local/ns/shop/sa/*"
direction = "east_west"
[[allow]]
from = "spiffe://cluster.local/ns/shop/sa/payments"
to = "api.stripe.com"
"#;

/// Structural findings: found within two windows of 10 s (the new egress destination while
/// a flood of made-up identities fills the pair cap).
const STRUCTURAL: [&str; 8] = [
    "new_edge",
    "new_egress",
    "mtls_downgrade",
    "new_principal",
    "foreign_principal",
    "policy_violation",
    "plaintext_edge",
    "identity_flood",
];

#[test]
fn every_finding_kind_is_found_and_nothing_else() {
    let dir = TempDir::new("zero-trust");
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
    let config = dir.path().join("meshwatch.toml");
    // Low thresholds for volume and path scans, so that this small mesh's incidents reach them;
    // a pair cap of 40 (the scenario has 30 pairs), which the flood fills at once.
    std::fs::write(
        &config,
        "[detector]\nwarmup = \"1h\"\n\n[zero_trust]\nlearning = \"1h\"\nnew_egress_volume_bytes = 50000\nscan_min_paths = 8\nrequire_mtls = true\n\n[limits]\nmax_pairs = 40\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshwatch"))
        .args(["eval", scenario.to_str().unwrap(), "--config", config.to_str().unwrap(), "--json"])
        .env("MESHWATCH_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let quality = &report["quality"];
    let kinds = quality["per_kind"].as_array().unwrap();
    let get = |kind: &str| kinds.iter().find(|k| k["kind"] == kind).unwrap_or_else(|| panic!("{kind}: {report:#}"));
    for kind in STRUCTURAL {
        let k = get(kind);
        assert_eq!(k["recall"], 1.0, "{kind}: {k}");
        assert!(k["ttd_median_s"].as_f64().unwrap() <= 20.0, "{kind}: {k}");
    }
    for kind in ["fan_out_scan", "denial_surge", "rate_limit_surge", "egress_bytes_surge", "denial_spread"] {
        assert_eq!(get(kind)["recall"], 1.0, "{kind}: {}", get(kind));
    }
    // The new egress destination is found twice: as new, then for the volume sent to it.
    assert_eq!(get("new_egress")["detections"], 2, "{}", get("new_egress"));
    assert_eq!(get("new_egress")["precision"], 1.0);
    // The scan is found as such (destinations, and 404 paths), not only as the new edges it
    // makes; denials across the frontend's destinations as the source's surge.
    assert_eq!(get("fan_out_scan")["detections"], 2, "{}", get("fan_out_scan"));
    assert_eq!(get("denial_spread")["detections"], 1, "{}", get("denial_spread"));
    // The flood (200 made-up callers a second for 20 minutes, the pair cap full within a second)
    // is one finding, not thousands.
    assert_eq!(get("identity_flood")["detections"], 1, "{}", get("identity_flood"));
    // With mTLS required, the plaintext edge is found as plaintext, not only as new.
    assert_eq!(get("plaintext_edge")["detections"], 1, "{}", get("plaintext_edge"));
    assert_eq!(quality["false_detections"], 0, "{:#}", quality["false_examples"]);
}
