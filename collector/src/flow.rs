//! The normalized flow record: one access-log entry, decided (who → whom, which way, what
//! happened), with nothing of the wire format left in it.

use std::fmt;
use std::sync::Arc;

/// Which way a flow crosses the trust boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From outside the trust boundary to inside.
    Ingress,
    /// Inside to inside.
    EastWest,
    /// Inside to outside (and outside to outside through a proxy of ours).
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 3] = [Direction::Ingress, Direction::EastWest, Direction::Egress];

    /// The label value on every per-pair series.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::EastWest => "east_west",
            Direction::Egress => "egress",
        }
    }

    pub fn parse(s: &str) -> Option<Direction> {
        Direction::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Decides a direction from which sides are inside the trust boundary.
    pub fn from_sides(source_inside: bool, destination_inside: bool) -> Direction {
        match (source_inside, destination_inside) {
            (true, true) => Direction::EastWest,
            (false, true) => Direction::Ingress,
            (_, false) => Direction::Egress,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which proxy logged the entry. The same request is often logged by both sidecars; the
/// reporter keeps those two views apart so neither is counted twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    /// The caller's sidecar (outbound).
    Source,
    /// The callee's sidecar (inbound).
    Destination,
    /// A gateway (ingress or egress) between the two.
    Gateway,
}

impl Reporter {
    pub const ALL: [Reporter; 3] = [Reporter::Source, Reporter::Destination, Reporter::Gateway];

    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Gateway => "gateway",
        }
    }

    pub fn parse(s: &str) -> Option<Reporter> {
        Reporter::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an entry counts as: an HTTP request or a closed TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Tcp,
}

/// The class of an HTTP response code. `None` is a request that got no response at all
/// (Envoy logs code 0, for example when the downstream went away first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusClass {
    None = 0,
    Informational = 1,
    Success = 2,
    Redirect = 3,
    ClientError = 4,
    ServerError = 5,
}

impl StatusClass {
    pub const COUNT: usize = 6;
    pub const ALL: [StatusClass; StatusClass::COUNT] = [
        StatusClass::None,
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirect,
        StatusClass::ClientError,
        StatusClass::ServerError,
    ];

    pub fn from_code(code: u32) -> StatusClass {
        match code {
            100..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirect,
            400..=499 => StatusClass::ClientError,
            500..=599 => StatusClass::ServerError,
            _ => StatusClass::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::None => "none",
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirect => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
        }
    }
}

/// Envoy response flags as a bit set: bit `n - 1` is `ResponseFlags` field `n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(pub u32);

impl ResponseFlags {
    /// Envoy's short names, indexed by field number minus one (as `%RESPONSE_FLAGS%` prints them).
    pub const NAMES: [&'static str; 28] = [
        "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX", "SI",
        "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DR",
    ];
    pub const UPSTREAM_REQUEST_TIMEOUT: u32 = 1 << 2;
    /// NR: no route (or, for TCP, no matching filter chain).
    pub const NO_ROUTE: u32 = 1 << 8;
    pub const UPSTREAM_CONNECTION_FAILURE: u32 = 1 << 5;
    pub const RATE_LIMITED: u32 = 1 << 11;
    pub const UNAUTHORIZED: u32 = 1 << 12;
    /// Flags that mean the upstream failed the request: UH, UT, LR, UR, UF, UC, UO, URX, UPE.
    pub const ERRORS: u32 =
        (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 15) | (1 << 23);

    pub fn contains(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// The flags that are set, as (index, short name).
    pub fn iter(self) -> impl Iterator<Item = (usize, &'static str)> {
        Self::NAMES.iter().enumerate().filter(move |(i, _)| self.0 & (1 << i) != 0).map(|(i, name)| (i, *name))
    }
}

/// A workload identity, interned: cloning is a reference-count increment.
pub type Identity = Arc<str>;

/// One normalized access-log entry.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRecord {
    /// Event time, Unix milliseconds: when the request (or connection) ended, that is start
    /// time plus duration. The end, not the start, so that a long request or connection lands
    /// in a window that is still open when its entry arrives.
    pub end_ms: i64,
    pub reporter: Reporter,
    pub source: Identity,
    pub destination: Identity,
    pub direction: Direction,
    pub protocol: Protocol,
    /// The HTTP response code, 0 when there was none (and for TCP).
    pub response_code: u16,
    pub response_flags: ResponseFlags,
    /// Whole request (or connection) duration, microseconds; `None` when Envoy did not say.
    pub duration_us: Option<u64>,
    /// Bytes from source to destination (request headers and body, or TCP bytes received
    /// from the downstream).
    pub bytes_sent: u64,
    /// Bytes from destination to source.
    pub bytes_received: u64,
    /// The downstream connection presented a client certificate (mTLS).
    pub mtls: bool,
    /// For a 404: a hash of the path without its query (distinct paths of a scan), else 0.
    pub not_found_path: u64,
}

/// FNV-1a (64 bit) of a request path up to its query, never 0 (0 means no path).
pub fn path_hash(path: &[u8]) -> u64 {
    let end = path.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(path.len());
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for &b in &path[..end] {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

impl FlowRecord {
    pub fn status_class(&self) -> StatusClass {
        StatusClass::from_code(u32::from(self.response_code))
    }
}

/// Upstream counters of one cluster, as deltas over a stats flush (or a window), from Envoy's
/// `cluster.<name>.*` stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCounts {
    /// `upstream_rq_total`.
    pub requests: u64,
    /// `upstream_rq_5xx`.
    pub errors: u64,
    /// `upstream_rq_timeout`.
    pub timeouts: u64,
    /// `upstream_rq_retry`.
    pub retries: u64,
    /// `upstream_cx_total`.
    pub connections: u64,
    /// `upstream_cx_connect_fail`.
    pub connect_failures: u64,
    /// `upstream_rq_pending_overflow` (the circuit breaker's pending-request limit).
    pub pending_overflows: u64,
    /// `outlier_detection.ejections_enforced_total`.
    pub ejections: u64,
}

impl UpstreamCounts {
    /// Every counter with its name as the `meshwatch_pair_upstream_*` families use it.
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        [
            ("requests", self.requests),
            ("errors", self.errors),
            ("timeouts", self.timeouts),
            ("retries", self.retries),
            ("connections", self.connections),
            ("connect_failures", self.connect_failures),
            ("pending_overflows", self.pending_overflows),
            ("ejections", self.ejections),
        ]
    }

    pub fn fields_mut(&mut self) -> [&mut u64; 8] {
        [
            &mut self.requests,
            &mut self.errors,
            &mut self.timeouts,
            &mut self.retries,
            &mut self.connections,
            &mut self.connect_failures,
            &mut self.pending_overflows,
            &mut self.ejections,
        ]
    }

    pub fn merge(&mut self, o: &UpstreamCounts) {
        for (a, (_, b)) in self.fields_mut().into_iter().zip(o.fields()) {
            *a = a.saturating_add(b);
        }
    }

    pub fn is_zero(&self) -> bool {
        self.fields().iter().all(|(_, v)| *v == 0)
    }
}

/// What one Envoy's stats said about one upstream cluster at one flush: the pair is the
/// reporting node (source) and the cluster's service (destination).
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamRecord {
    /// Envoy's snapshot time, Unix milliseconds.
    pub time_ms: i64,
    pub reporter: Reporter,
    pub source: Identity,
    pub destination: Identity,
    pub direction: Direction,
    /// Increments since the previous flush.
    pub counts: UpstreamCounts,
    /// Hosts of the cluster (`membership_total`) and how many are healthy
    /// (`membership_healthy`), when the flush had both gauges.
    pub hosts: Option<(u64, u64)>,
}
