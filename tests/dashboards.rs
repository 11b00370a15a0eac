//! The operator's view, checked against the real thing: a real Prometheus scrapes a meshwatch
//! fed by the simulator and loads meshwatch's rules; every query of every dashboard panel and
//! template variable, and every rule expression, must parse and return data. The dashboards'
//! JSON is checked for structure, the rules with promtool, the exposition with
//! `promtool check metrics`, compose.yaml with docker-compose and its Envoy configs with Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const DASHBOARDS: [&str; 4] =
    ["meshwatch-overview.json", "meshwatch-pair.json", "meshwatch-zero-trust.json", "meshwatch-self.json"];

const SCENARIO: &str = r#"
name = "dashboards"
start = "2026-01-05"
duration = "2h"
namespace = "shop"
seed = 11
services = [
  { name = "frontend" }, { name = "cart" }, { name = "catalog" }, { name = "db" }, { name = "reports" },
  { name = "api.stripe.com", external = true },
]
[[edges]]
from = "internet"
to = "frontend"
rate = 6
[[edges]]
from = "frontend"
to = ["catalog", "cart"]
rate = 4
error_ratio = 0.01
[[edges]]
from = "cart"
to = "api.stripe.com"
rate = 1
[[edges]]
from = "catalog"
to = "db"
protocol = "tcp"
rate = 1
[[incidents]]
kind = "mtls_downgrade"
from = "frontend"
to = "cart"
start = "40m"
duration = "10m"
[[incidents]]
kind = "new_edge"
from = "frontend"
to = "reports"
start = "1h50m"
duration = "10m"
"#;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CATALOG: &str = "spiffe://cluster.local/ns/shop/sa/catalog";

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Grafana's variables, as a dashboard would have them for the frontend → catalog pair.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$source", FRONTEND)
        .replace("$destination", CATALOG)
        .replace("$direction", "east_west")
        .replace("$job", "meshwatch")
}

struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(dir: &Path, target: std::net::SocketAddr) -> Prometheus {
        let rules = repo_root().join("deploy/prometheus/meshwatch-rules.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: meshwatch\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = closed_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus) is installed");
        let p = Prometheus { child, addr: format!("127.0.0.1:{port}").parse().unwrap() };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(p.addr).await.is_ok() && http_get(p.addr, "/-/ready").await.0 == 200 {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus did not start: {}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default());
    }

    async fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.addr, path).await;
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {status} {body}"))
    }

    /// The result of an instant query, or the error Prometheus gave.
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", percent_encode(expr))).await;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// As `query`, asking again for a few seconds while the result is empty (a recording
    /// rule's first evaluation may have come before its second scrape).
    async fn query_data(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        for _ in 0..20 {
            let r = self.query(expr).await?;
            if !r.is_empty() {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(Vec::new())
    }
}

/// Every panel, rows' nested panels included.
fn panels(d: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

fn load(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo_root().join("dashboards").join(name)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Metric names an expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (expr[i..].starts_with("meshwatch_") || expr[i..].starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':'));
        if starts {
            let end = expr[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(expr.len(), |e| i + e);
            names.insert(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_rule_returns_data_from_a_real_prometheus() {
    let dir = TempDir::new("dashboards");
    let hook = Recorder::start(Answer::Status(200, None)).await;
    let settings = format!(
        "[detector]\nwarmup = \"30m\"\n\n[zero_trust]\nlearning = \"10m\"\n\n[alerting]\n[[alerting.receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"{}/\"\nsecret = \"s\"",
        hook.url()
    );
    let (scenario_path, config) = replay_files(dir.path(), SCENARIO, &settings);
    let env = [("MESHWATCH_DATA_DIR", dir.path().join("data").display().to_string())];
    let mw = Meshwatch::start(&config, &env);
    simulate_into(&mw, &scenario_path, &[]);
    let m = mw
        .metrics_until(Duration::from_secs(60), |m| {
            m.get("meshwatch_windows_open", &[]) == Some(0.0) && m.sum("meshwatch_notifications_sent_total", &[]) >= 2.0
        })
        .await;
    assert!(m.sum("meshwatch_findings_total", &[]) >= 2.0, "{}", m.text);

    // The live exposition passes promtool.
    promtool_check_metrics(&m.text);
    let families: HashSet<String> = m
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();

    let prom = Prometheus::start(dir.path(), mw.http).await;
    // Enough scrapes for rates over a minute, and rules evaluated.
    for _ in 0..150 {
        let up = prom.query("count_over_time(up{job=\"meshwatch\"}[1m])").await.unwrap_or_default();
        let samples = up.first().and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok()).unwrap_or(0.0);
        let rules = prom.api("/api/v1/rules").await;
        let evaluated = rules["data"]["groups"]
            .as_array()
            .is_some_and(|g| g.iter().all(|g| g["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001"))));
        if samples >= 4.0 && evaluated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut failures = Vec::new();
    let mut queries = 0;
    for name in DASHBOARDS {
        let d = load(name);
        // Structure.
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
            "{name}: no datasource variable"
        );
        let schema = d["schemaVersion"].as_i64().unwrap();
        assert!((38..=41).contains(&schema), "{name}: schemaVersion {schema} (Grafana 10 and 11)");
        assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "{name}: uid");
        let all = panels(&d);
        let ids: Vec<i64> = all.iter().map(|p| p["id"].as_i64().unwrap()).collect();
        assert_eq!(ids.len(), ids.iter().collect::<HashSet<_>>().len(), "{name}: duplicate panel ids {ids:?}");
        for p in all.iter().filter(|p| p["type"] != "row") {
            let title = p["title"].as_str().unwrap();
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name} / {title}: panel datasource");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{name} / {title}: no query");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{name} / {title}: target datasource");
                let expr = t["expr"].as_str().unwrap();
                assert!(!expr.trim().is_empty(), "{name} / {title}: empty query");
                for metric in metric_names(expr) {
                    let family = ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|s| metric.strip_suffix(s).filter(|base| families.contains(*base)))
                        .unwrap_or(&metric);
                    assert!(families.contains(family), "{name} / {title}: {metric} is not on /metrics");
                }
                // Against Prometheus.
                queries += 1;
                match prom.query_data(&substitute(expr)).await {
                    Ok(r) if !r.is_empty() => {}
                    Ok(_) => failures.push(format!("{name} / {title}: no data for {expr}")),
                    Err(e) => failures.push(format!("{name} / {title}: {e} in {expr}")),
                }
            }
        }
        // Template variables: label_values(SELECTOR, LABEL) has values.
        for v in vars.iter().filter(|v| v["type"] == "query") {
            let q = v["query"]["query"].as_str().unwrap();
            let inner = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')).unwrap();
            let (selector, label) = inner.rsplit_once(',').unwrap();
            let path = format!(
                "/api/v1/label/{}/values?match[]={}",
                label.trim(),
                percent_encode(&substitute(selector.trim()))
            );
            let r = prom.api(&path).await;
            if r["data"].as_array().is_none_or(|a| a.is_empty()) {
                failures.push(format!("{name}: variable {} has no values ({q}): {r}", v["name"]));
            }
        }
    }

    // Rules: loaded and healthy; every recording rule's expression has data, and so has the
    // left side of every alerting rule's comparison (the condition itself holds only when
    // something is wrong).
    let rules = prom.api("/api/v1/rules").await;
    let mut seen = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            seen += 1;
            let name = rule["name"].as_str().unwrap();
            assert_eq!(rule["health"], "ok", "{name}: {}", rule["lastError"]);
            let expr = rule["query"].as_str().unwrap();
            // A recording rule's expression itself (its group is evaluated every 30 s, so its
            // series may not exist yet).
            let probe = if rule["type"] == "recording" {
                expr.to_string()
            } else {
                let ops = [" >= ", " > ", " == ", " <= ", " < "];
                let at =
                    ops.iter().filter_map(|op| expr.rfind(op)).max().unwrap_or_else(|| panic!("{name}: no comparison"));
                expr[..at].to_string()
            };
            queries += 1;
            match prom.query_data(&probe).await {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => failures.push(format!("rule {name}: no data for {probe}")),
                Err(e) => failures.push(format!("rule {name}: {e} in {probe}")),
            }
        }
    }
    assert_eq!(seen, 12, "{rules}");
    assert!(failures.is_empty(), "{} of {queries} queries failed:\n{}", failures.len(), failures.join("\n"));
    assert!(mw.stop().success());
}

#[test]
fn rules_pass_promtool_checks_and_unit_tests() {
    let dir = repo_root().join("deploy/prometheus");
    for args in [vec!["check", "rules", "meshwatch-rules.yml"], vec!["test", "rules", "meshwatch-rules.test.yml"]] {
        let out = Command::new("promtool").args(&args).current_dir(&dir).output().expect("promtool is installed");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn compose_file_and_its_envoy_configs_are_valid() {
    let root = repo_root();
    let out = Command::new("docker-compose")
        .args(["-f", "compose.yaml", "config", "-q"])
        .current_dir(&root)
        .output()
        .expect("docker-compose (Debian package docker-compose) is installed");
    assert!(out.status.success(), "docker-compose config: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(root.join("compose.yaml")).unwrap();
    for line in text.lines().filter(|l| l.trim_start().starts_with("- \"") && l.contains(':')) {
        assert!(line.contains("\"127.0.0.1:"), "a published port not bound to 127.0.0.1: {line}");
    }
    // Every file compose.yaml mounts from the repository exists.
    for line in text.lines() {
        if let Some(path) = line.trim().strip_prefix("- ./").and_then(|l| l.split(':').next()) {
            assert!(root.join(path).exists(), "compose.yaml mounts ./{path}, which does not exist");
        }
    }
    // The Envoy configs compose runs pass Envoy's own validation.
    let work = TempDir::new("compose-envoy");
    let certs = work.path().join("certs");
    gen_certs(&certs);
    for name in ["gateway", "sidecar-frontend", "sidecar-backend"] {
        let config = std::fs::read_to_string(root.join(format!("deploy/compose/envoy/{name}.yaml"))).unwrap();
        let file = work.path().join(format!("{name}.yaml"));
        std::fs::write(&file, config.replace("/etc/meshwatch/certs/", &format!("{}/", certs.display()))).unwrap();
        let out = Command::new(envoy_bin())
            .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // meshwatch's config for compose is valid.
    let out = Command::new(env!("CARGO_BIN_EXE_meshwatch"))
        .args(["check-config", root.join("deploy/compose/meshwatch.toml").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
