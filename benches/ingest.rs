//! Ingest benchmark: realistic HTTP access-log batches streamed over loopback gRPC into the
//! real `meshwatch serve`, next to the single-thread decode-only rate of the same bytes.
//!
//!     cargo bench --bench ingest
//!
//! Environment: `BENCH_SECONDS` (load duration, default 10), `BENCH_CONNECTIONS` (default 8).
//! The workload: 60 services each calling 5 others (300 pairs), every request logged by the
//! client-side sidecar (Istio-style outbound cluster) and by the server-side sidecar (mTLS,
//! caller and callee SPIFFE IDs): 120 streams, one per sidecar and direction, in batches of
//! about 16 KiB (Envoy's default `buffer_size_bytes`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use meshwatch::sim::envoy::{FlowSpec, HttpSpec, http_entry, http_message, identifier};
use meshwatch_collector::als::{BytesCodec, STREAM_ACCESS_LOGS_PATH};
use meshwatch_collector::decode::StreamDecoder;
use meshwatch_collector::identity::MeshConfig;
use prost::Message;
use tokio_stream::StreamExt;

const SERVICES: usize = 60;
const FANOUT: usize = 5;
const BATCH_BYTES: usize = 16 * 1024;
const MESSAGES_PER_STREAM: usize = 4;

/// One simulated access-log stream: its messages (with their entry counts), the first
/// carrying the identifier.
struct Stream {
    first: (Bytes, u64),
    rest: Vec<(Bytes, u64)>,
}

fn spiffe(i: usize) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/svc-{i:02}")
}

fn ip(i: usize) -> String {
    format!("10.1.{}.{}", i / 200, 10 + i % 200)
}

fn workload(start_ms: i64) -> Vec<Stream> {
    let mut streams = Vec::new();
    let mut seq = 0u64;
    for inbound in [false, true] {
        for svc in 0..SERVICES {
            let me = spiffe(svc);
            let mut entries = Vec::new();
            let mut messages = Vec::new();
            while messages.len() <= MESSAGES_PER_STREAM {
                seq += 1;
                let peer = (svc + 1 + (seq as usize % FANOUT)) % SERVICES;
                let (caller, callee) = if inbound { (peer, svc) } else { (svc, peer) };
                let cluster = if inbound {
                    "inbound|8080||".to_string()
                } else {
                    format!("outbound|8080||svc-{callee:02}.shop.svc.cluster.local")
                };
                let authority = format!("svc-{callee:02}.shop:8080");
                let (caller_id, callee_id) = (spiffe(caller), spiffe(callee));
                let code = if seq.is_multiple_of(50) { 503 } else { 200 };
                entries.push(http_entry(&HttpSpec {
                    flow: FlowSpec {
                        start_ms: start_ms + (seq % 1000) as i64,
                        duration_us: 2_000 + (seq % 40) * 500,
                        downstream_ip: &ip(caller),
                        upstream_ip: &ip(callee),
                        upstream_cluster: &cluster,
                        flags: 0,
                        peer_spiffe: inbound.then_some(caller_id.as_str()),
                        local_spiffe: inbound.then_some(callee_id.as_str()),
                        seq,
                    },
                    authority: &authority,
                    path: "/api/v1/items/42",
                    code,
                    request_body_bytes: if seq.is_multiple_of(3) { 512 } else { 0 },
                    response_body_bytes: 1_800,
                }));
                let size: usize = entries.iter().map(Message::encoded_len).sum();
                if size >= BATCH_BYTES {
                    let n = entries.len() as u64;
                    let id = messages.is_empty().then(|| {
                        identifier(
                            &format!("svc-{svc:02}-1"),
                            &format!("svc-{svc:02}"),
                            Some(&me),
                            if inbound { "inbound" } else { "outbound" },
                        )
                    });
                    messages.push((http_message(id, std::mem::take(&mut entries)), n));
                }
            }
            let first = messages.remove(0);
            streams.push(Stream { first, rest: messages });
        }
    }
    streams
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); here, after pid and comm, 11 and 12.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

struct Server {
    child: Child,
    grpc: String,
    http: String,
}

impl Server {
    fn start(data: &std::path::Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshwatch"));
        cmd.arg("serve")
            .env("MESHWATCH_DATA_DIR", data)
            .env("MESHWATCH_LISTEN__GRPC", "127.0.0.1:0")
            .env("MESHWATCH_LISTEN__HTTP", "127.0.0.1:0")
            .env("MESHWATCH_LOG", "warn,meshwatch::serve=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = loop {
            let l = lines.next().expect("meshwatch printed where it listens").unwrap();
            if l.contains(" listening ") {
                break l;
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let field = |name: &str| {
            let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[at..].split_whitespace().next().unwrap().to_string()
        };
        Server { grpc: field("grpc"), http: field("http"), child }
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

async fn scrape(http: &str, name: &str) -> f64 {
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits for the pipeline to drain what was sent; returns the entries decoded since `before`.
async fn drained(http: &str, before: f64) -> f64 {
    let mut decoded = scrape(http, "meshwatch_als_entries_decoded_total").await - before;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = scrape(http, "meshwatch_als_entries_decoded_total").await - before;
        if now == decoded {
            return decoded;
        }
        decoded = now;
    }
}

async fn stream_for(channel: tonic::transport::Channel, stream: Arc<Stream>, until: Instant, sent: Arc<AtomicU64>) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_ACCESS_LOGS_PATH);
    let s2 = stream.clone();
    let messages = tokio_stream::iter(
        std::iter::once(stream.first.clone()).chain((0..).map(move |i| s2.rest[i % s2.rest.len()].clone())),
    )
    .take_while(move |_| Instant::now() < until)
    .map(move |(m, n)| {
        sent.fetch_add(n, Ordering::Relaxed);
        m
    });
    let _ = grpc.client_streaming(tonic::Request::new(messages), path, BytesCodec).await;
}

fn decode_only(streams: &[Stream], seconds: f64) -> (f64, f64) {
    let messages: Vec<(usize, &Bytes)> = streams
        .iter()
        .enumerate()
        .flat_map(|(i, s)| std::iter::once((i, &s.first.0)).chain(s.rest.iter().map(move |(m, _)| (i, m))))
        .collect();
    let prost_rate = {
        let t = Instant::now();
        let mut entries = 0usize;
        while t.elapsed().as_secs_f64() < seconds {
            for (_, m) in &messages {
                let msg = StreamAccessLogsMessage::decode(m.as_ref()).unwrap();
                entries += match msg.log_entries {
                    Some(envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries::HttpLogs(h)) => h.log_entry.len(),
                    _ => 0,
                };
            }
        }
        entries as f64 / t.elapsed().as_secs_f64()
    };
    let meshwatch_rate = {
        let mesh = MeshConfig::default();
        let mut decoders: Vec<StreamDecoder> = streams.iter().map(|_| StreamDecoder::new(4096)).collect();
        let t = Instant::now();
        let mut entries = 0usize;
        while t.elapsed().as_secs_f64() < seconds {
            for (i, m) in &messages {
                let (records, _) = decoders[*i].message(&mesh, (*m).clone());
                entries += records.len();
            }
        }
        entries as f64 / t.elapsed().as_secs_f64()
    };
    (prost_rate, meshwatch_rate)
}

async fn memory_per_pair(data: &std::path::Path) -> (f64, f64) {
    const PAIRS: usize = 100_000;
    let server = Server::start(data, &[("MESHWATCH_LIMITS__MAX_PAIRS", "200000"), ("MESHWATCH_WINDOW__GRACE", "120s")]);
    let pid = server.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = common::rss_mib(&pid.to_string());
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let messages: Vec<Bytes> = (0..PAIRS / 1000)
        .map(|b| {
            let entries = (0..1000)
                .map(|i| {
                    let caller = format!("spiffe://cluster.local/ns/load/sa/caller-{}", b * 1000 + i);
                    http_entry(&HttpSpec {
                        flow: FlowSpec {
                            start_ms: now_ms,
                            duration_us: 3_000,
                            downstream_ip: "10.2.0.1",
                            upstream_ip: "10.2.0.2",
                            upstream_cluster: "inbound|8080||",
                            flags: 0,
                            peer_spiffe: Some(&caller),
                            local_spiffe: Some("spiffe://cluster.local/ns/shop/sa/api"),
                            seq: (b * 1000 + i) as u64,
                        },
                        authority: "api.shop:8080",
                        path: "/",
                        code: 200,
                        request_body_bytes: 0,
                        response_body_bytes: 100,
                    })
                })
                .collect();
            http_message((b == 0).then(|| identifier("api-1", "api", None, "inbound")), entries)
        })
        .collect();
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", server.grpc)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_ACCESS_LOGS_PATH);
    grpc.client_streaming(tonic::Request::new(tokio_stream::iter(messages)), path, BytesCodec).await.unwrap();
    while scrape(&server.http, "meshwatch_pairs_tracked").await < PAIRS as f64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = common::rss_mib(&pid.to_string());
    server.stop();
    (after - before, (after - before) * 1024.0 * 1024.0 / PAIRS as f64)
}

/// The same requests as OTLP logs of Envoy's OpenTelemetry access logger (the attribute set
/// README recommends): one Export request per sidecar and direction.
fn otlp_messages(entries_per_message: usize, start_ms: i64) -> Vec<Bytes> {
    let mut messages = Vec::new();
    for inbound in [false, true] {
        for svc in 0..SERVICES {
            let resource = vec![
                ("node_name".to_string(), format!("svc-{svc:02}-0")),
                ("cluster_name".to_string(), format!("svc-{svc:02}")),
                ("log_name".to_string(), if inbound { "inbound_otel" } else { "outbound_otel" }.to_string()),
                ("meshwatch.identity".to_string(), spiffe(svc)),
            ];
            let records: Vec<(u64, Vec<(String, String)>)> = (0..entries_per_message)
                .map(|i| {
                    let peer = (svc + 1 + i % FANOUT) % SERVICES;
                    let (caller, callee) = if inbound { (peer, svc) } else { (svc, peer) };
                    let a = |k: &str, v: String| (k.to_string(), v);
                    let attrs = vec![
                        a("downstream.peer.uri_san", if inbound { spiffe(caller) } else { "-".into() }),
                        a("downstream.local.uri_san", if inbound { spiffe(callee) } else { "-".into() }),
                        a("upstream.peer.uri_san", if inbound { "-".into() } else { spiffe(callee) }),
                        a("upstream.cluster", format!("outbound|8080||svc-{callee:02}.shop.svc.cluster.local")),
                        a("response.code", "200".into()),
                        a("response.flags", "-".into()),
                        a("duration_ms", (5 + i % 40).to_string()),
                        a("bytes.received", "300".into()),
                        a("bytes.sent", "2000".into()),
                        a("downstream.remote_address", format!("{}:{}", ip(caller), 30_000 + i)),
                        a("upstream.host", format!("{}:8080", ip(callee))),
                        a("authority", format!("svc-{callee:02}.shop:8080")),
                        a("path", "/api/items".into()),
                        a("protocol", "HTTP/1.1".into()),
                    ];
                    ((start_ms as u64 + i as u64) * 1_000_000, attrs)
                })
                .collect();
            messages.push(meshwatch_collector::otlp::encode_export(&[(resource, records)]));
        }
    }
    messages
}

/// The OTLP messages decoded to flow records on one thread; entries per second.
fn otlp_decode_only(messages: &[Bytes], entries_per_message: usize, seconds: f64) -> f64 {
    let mesh = MeshConfig::default();
    let mut interners: Vec<_> = messages.iter().map(|_| meshwatch_collector::identity::Interner::new(4096)).collect();
    let t = Instant::now();
    let mut entries = 0usize;
    while t.elapsed().as_secs_f64() < seconds {
        for (m, interner) in messages.iter().zip(&mut interners) {
            let (records, _) = meshwatch_collector::otlp::export(m.clone(), &mesh, interner, None);
            entries += records.len();
        }
    }
    println!(
        "  (OTLP workload: {} bytes per message of {entries_per_message} records, {} bytes per record)",
        messages[0].len(),
        messages[0].len() / entries_per_message
    );
    entries as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let connections: usize = std::env::var("BENCH_CONNECTIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let start_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let streams = workload(start_ms);
    let (message_bytes, entries_per_message) = (streams[0].rest[0].0.len(), streams[0].rest[0].1 as usize);
    println!(
        "workload: {} streams, {} pairs x 2 reporters, {} entries per message, {} bytes per message ({} bytes per entry)",
        streams.len(),
        SERVICES * FANOUT,
        entries_per_message,
        message_bytes,
        message_bytes / entries_per_message
    );

    // The simulator alone: the shop scenario, one thread, one simulated day.
    {
        let scenario = meshwatch::sim::scenario::Scenario::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scenarios/shop.toml"
        )))
        .unwrap();
        let mut generator = meshwatch::sim::generate::Generator::new(scenario, 2, 10_000);
        generator.limit(86_400_000);
        let t = Instant::now();
        let mut bytes = 0usize;
        while let Some(slice) = generator.next_slice(0) {
            bytes += slice.messages.iter().map(|(_, m)| m.len()).sum::<usize>();
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "simulator alone, one thread, shop scenario, 1 simulated day: {} entries in {secs:.2} s, {:.0} entries/s ({} bytes per entry)",
            generator.total_entries(),
            generator.total_entries() as f64 / secs,
            bytes / generator.total_entries().max(1) as usize
        );
    }
    let (prost_rate, meshwatch_rate) = decode_only(&streams, 3.0);
    println!("decode only, one thread, envoy-types (prost) full decode: {:>10.0} entries/s", prost_rate);
    println!("decode only, one thread, meshwatch decode to flow records: {:>8.0} entries/s", meshwatch_rate);
    let otlp = otlp_messages(entries_per_message, start_ms);
    let otlp_rate = otlp_decode_only(&otlp, entries_per_message, 3.0);
    println!("decode only, one thread, meshwatch OTLP logs to flow records: {:>6.0} entries/s", otlp_rate);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let data = std::env::temp_dir().join(format!("meshwatch-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let server = Server::start(&data, &[("MESHWATCH_WINDOW__GRACE", "120s")]);
        let pid = server.child.id();
        let streams: Vec<Arc<Stream>> = streams.into_iter().map(Arc::new).collect();
        let mut channels = Vec::new();
        for _ in 0..connections {
            channels.push(
                tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
        }
        let sent = Arc::new(AtomicU64::new(0));
        let decoded_before = scrape(&server.http, "meshwatch_als_entries_decoded_total").await;
        let cpu_before = cpu_seconds(pid);
        let own_cpu_before = cpu_seconds(std::process::id());
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(seconds);
        let tasks: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, s)| tokio::spawn(stream_for(channels[i % connections].clone(), s.clone(), until, sent.clone())))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let decoded = drained(&server.http, decoded_before).await;
        let elapsed = t0.elapsed().as_secs_f64() - 0.1;
        let cpu = cpu_seconds(pid) - cpu_before;
        let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
        let rejected = scrape(&server.http, "meshwatch_als_entries_rejected_total").await;
        let rss = common::rss_mib(&pid.to_string());
        let sent = sent.load(Ordering::Relaxed) as f64;
        server.stop();
        // Everything decoded went through windows into the store: count it there.
        let server = Server::start(&data, &[]);
        let processed = {
            let mut s = tokio::net::TcpStream::connect(&server.http).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /api/v1/pairs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            let json = &body[body.find("\r\n\r\n").unwrap() + 4..];
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            v["pairs"].as_array().unwrap().iter().map(|p| p["total_flows"].as_f64().unwrap()).sum::<f64>()
        };
        let pairs = scrape(&server.http, "meshwatch_pairs_tracked").await;
        server.stop();
        println!("pipeline ({connections} connections, {seconds} s of load):");
        println!("  entries sent            {sent:>12.0}");
        println!("  entries decoded         {decoded:>12.0}   rejected {rejected:.0}");
        println!("  entries in the store    {processed:>12.0}   ({pairs:.0} pairs)");
        println!("  throughput              {:>12.0} entries/s", decoded / elapsed);
        println!(
            "  meshwatch CPU           {:>12.2} s for {elapsed:.1} s ({:.2} cores), {:.2} us per entry",
            cpu,
            cpu / elapsed,
            cpu / decoded * 1e6
        );
        println!("  load generator CPU      {:>12.2} s ({:.2} cores)", own_cpu, own_cpu / elapsed);
        println!("  meshwatch resident      {:>12.1} MiB", rss);
        println!(
            "  vs decode-only (meshwatch decode, one thread): {:.0} %",
            100.0 * decoded / elapsed / meshwatch_rate
        );
        let _ = std::fs::remove_dir_all(&data);

        otlp_pipeline(Arc::new(otlp), entries_per_message as u64, connections, seconds, otlp_rate).await;

        let mem_data = std::env::temp_dir().join(format!("meshwatch-bench-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&mem_data);
        let (delta_mib, bytes_per_pair) = memory_per_pair(&mem_data).await;
        println!("memory: 100000 tracked pairs add {delta_mib:.1} MiB resident, {bytes_per_pair:.0} bytes per pair");
        let _ = std::fs::remove_dir_all(&mem_data);
    });
}

/// The same method with OTLP logs: Export calls (four in flight per connection) into a fresh
/// `meshwatch serve` for `seconds`, counting what it decoded.
async fn otlp_pipeline(
    messages: Arc<Vec<Bytes>>,
    per_message: u64,
    connections: usize,
    seconds: u64,
    decode_rate: f64,
) {
    let data = std::env::temp_dir().join(format!("meshwatch-bench-otlp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data, &[("MESHWATCH_WINDOW__GRACE", "120s")]);
    let pid = server.child.id();
    let decoded_before = scrape(&server.http, "meshwatch_als_entries_decoded_total").await;
    let cpu_before = cpu_seconds(pid);
    let sent = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", server.grpc)).unwrap().connect().await.unwrap();
        for k in 0..4 {
            let (channel, messages, sent) = (channel.clone(), messages.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let mut grpc = tonic::client::Grpc::new(channel);
                let path =
                    tonic::codegen::http::uri::PathAndQuery::from_static(meshwatch_collector::otlp::EXPORT_LOGS_PATH);
                let mut i = c * 4 + k;
                while Instant::now() < until {
                    grpc.ready().await.unwrap();
                    let m = messages[i % messages.len()].clone();
                    grpc.unary(tonic::Request::new(m), path.clone(), BytesCodec).await.unwrap();
                    sent.fetch_add(per_message, Ordering::Relaxed);
                    i += connections * 4;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let decoded = drained(&server.http, decoded_before).await;
    let elapsed = t0.elapsed().as_secs_f64() - 0.1;
    let cpu = cpu_seconds(pid) - cpu_before;
    let rejected = scrape(&server.http, "meshwatch_als_entries_rejected_total").await;
    server.stop();
    let _ = std::fs::remove_dir_all(&data);
    println!("pipeline, OTLP logs over gRPC ({connections} connections, 4 calls in flight each, {seconds} s of load):");
    println!("  records sent            {:>12.0}", sent.load(Ordering::Relaxed) as f64);
    println!("  records decoded         {decoded:>12.0}   rejected {rejected:.0}");
    println!("  throughput              {:>12.0} records/s", decoded / elapsed);
    println!(
        "  meshwatch CPU           {cpu:>12.2} s ({:.2} cores), {:.2} us per record",
        cpu / elapsed,
        cpu / decoded * 1e6
    );
    println!("  vs decode-only (OTLP, one thread): {:.0} %", 100.0 * decoded / elapsed / decode_rate);
}
