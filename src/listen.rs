//! Bounded listeners: no client can hold what the others need. Per listener, at most
//! `max_connections` are open (one more is accepted and closed at once, counted); a connection
//! that sends nothing for `idle` is closed (half-open and forgotten connections); on the HTTP
//! listener, a request that is not answered within `answer_within` of its first byte is
//! closed (a client that drips its request, a byte at a time, never gets one). When a
//! listener is full, a new connection closes an open one instead of being refused: on HTTP the
//! one that has gone longest without an answer (since it was accepted or last answered), on
//! gRPC the oldest that has never sent a byte (an Envoy speaks at once). A flood of slow or
//! silent connections cannot keep a probe, a scrape or an Envoy out.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, futures::OwnedNotified};
use tokio::time::{Instant, Sleep, sleep};
use tracing::warn;

/// What bounds one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Nothing read for this long closes a connection.
    pub idle: Duration,
    /// Read, and nothing written back for this long, closes a connection (HTTP only: on
    /// gRPC, a stream of access logs is read for as long as it lasts and never answered).
    pub answer_within: Option<Duration>,
}

/// `meshwatch_connections_*{listener}`.
#[derive(Clone, Debug)]
pub struct ConnectionMetrics {
    open: IntGaugeVec,
    refused: IntCounterVec,
    closed: IntCounterVec,
}

impl ConnectionMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<ConnectionMetrics> {
        let open = IntGaugeVec::new(Opts::new("meshwatch_connections_open", "Connections open."), &["listener"])?;
        let refused = IntCounterVec::new(
            Opts::new(
                "meshwatch_connections_refused_total",
                "Connections closed as soon as accepted: the listener had limits.max_connections open.",
            ),
            &["listener"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "meshwatch_connections_closed_total",
                "Connections meshwatch closed: `idle` (nothing read for limits.connection_idle), `unanswered` (a request not complete within limits.request_timeout), `evicted` (the listener was full: on HTTP the one longest without an answer, on gRPC the oldest that never sent a byte, made room).",
            ),
            &["listener", "reason"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        Ok(ConnectionMetrics { open, refused, closed })
    }
}

/// Admits connections to one listener.
#[derive(Clone, Debug)]
struct Gate {
    limits: ConnectionLimits,
    open: IntGauge,
    refused: IntCounter,
    idle: IntCounter,
    unanswered: IntCounter,
    evicted: IntCounter,
    /// The open connections (evicted ones still closing included): how many there are, and
    /// which one a new one may close when the listener is full.
    evictable: Evictable,
    /// Any connection may be closed for a new one (HTTP), or only one that never spoke (gRPC).
    evict_any: bool,
}

/// Open connections by admission id.
type Evictable = Arc<Mutex<BTreeMap<u64, Arc<Slot>>>>;

/// One open connection, as the listener sees it for eviction.
#[derive(Debug)]
struct Slot {
    /// When it was accepted or last answered, as a count of such moments (older is smaller).
    since: AtomicU64,
    evict: Arc<Notify>,
    evicted: AtomicBool,
    /// It has sent at least one byte.
    spoken: AtomicBool,
}

/// Moments of acceptance and answer, in order, across listeners.
static MOMENTS: AtomicU64 = AtomicU64::new(1);

fn moment() -> u64 {
    MOMENTS.fetch_add(1, Ordering::Relaxed)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Gate {
    fn new(name: &str, limits: ConnectionLimits, m: &ConnectionMetrics) -> Gate {
        Gate {
            limits,
            open: m.open.with_label_values(&[name]),
            refused: m.refused.with_label_values(&[name]),
            idle: m.closed.with_label_values(&[name, "idle"]),
            unanswered: m.closed.with_label_values(&[name, "unanswered"]),
            evicted: m.closed.with_label_values(&[name, "evicted"]),
            evictable: Arc::default(),
            evict_any: limits.answer_within.is_some(),
        }
    }

    /// The connection, guarded; `None` (and the connection closed) at the cap, unless an
    /// open one can be closed for it (then it is let in while that one closes).
    fn admit(&self, stream: TcpStream) -> Option<Guarded> {
        let max = self.limits.max_connections;
        let slot = {
            let mut open = lock(&self.evictable);
            // Over the cap only while evicted ones close, and never past twice it.
            if open.len() >= max && !(open.len() < 2 * max && self.evict_oldest(&open)) {
                self.refused.inc();
                return None;
            }
            let slot = Arc::new(Slot {
                since: AtomicU64::new(moment()),
                evict: Arc::default(),
                evicted: false.into(),
                spoken: false.into(),
            });
            let id = moment();
            open.insert(id, slot.clone());
            (id, slot)
        };
        let _ = stream.set_nodelay(true);
        self.open.inc();
        let evict = Box::pin(slot.1.evict.clone().notified_owned());
        Some(Guarded {
            inner: stream,
            read_by: Box::pin(sleep(self.limits.idle)),
            answer_by: None,
            gate: self.clone(),
            slot,
            evict: Some(evict),
        })
    }

    /// Tells the open connection longest without an answer (on gRPC, of those that never
    /// spoke) to close; whether there was one.
    fn evict_oldest(&self, open: &BTreeMap<u64, Arc<Slot>>) -> bool {
        let oldest = open
            .values()
            .filter(|s| !s.evicted.load(Ordering::Relaxed) && (self.evict_any || !s.spoken.load(Ordering::Relaxed)))
            .min_by_key(|s| s.since.load(Ordering::Relaxed));
        let Some(slot) = oldest else { return false };
        slot.evicted.store(true, Ordering::Relaxed);
        slot.evict.notify_one();
        true
    }
}

/// A connection that closes itself when idle or unanswered.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    read_by: Pin<Box<Sleep>>,
    /// Armed by the first byte read after the last one written.
    answer_by: Option<Pin<Box<Sleep>>>,
    gate: Gate,
    /// Its place among the open connections, and the signal to close for a new one.
    slot: (u64, Arc<Slot>),
    evict: Option<Pin<Box<OwnedNotified>>>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.gate.open.dec();
        lock(&self.gate.evictable).remove(&self.slot.0);
    }
}

impl Guarded {
    /// A write that sent bytes answers what was read: the answer deadline is off.
    fn answered(&mut self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.answer_by = None;
            self.slot.1.since.store(moment(), Ordering::Relaxed);
        }
        r
    }
}

fn closed(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, why)
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(evict) = this.evict.as_mut()
            && evict.as_mut().poll(cx).is_ready()
        {
            this.evict = None;
            this.gate.evicted.inc();
            return Poll::Ready(Err(closed("evicted")));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.slot.1.spoken.store(true, Ordering::Relaxed);
                    this.read_by.as_mut().reset(Instant::now() + this.gate.limits.idle);
                    if let (None, Some(within)) = (&this.answer_by, this.gate.limits.answer_within) {
                        this.answer_by = Some(Box::pin(sleep(within)));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.read_by.as_mut().poll(cx).is_ready() {
                    this.gate.idle.inc();
                    return Poll::Ready(Err(closed("idle")));
                }
                if let Some(deadline) = this.answer_by.as_mut()
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    this.gate.unanswered.inc();
                    return Poll::Ready(Err(closed("unanswered")));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.answered(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.answered(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A bounded listener, for tonic (a stream of connections) and axum (`Listener`).
#[derive(Debug)]
pub struct BoundedListener {
    listener: TcpListener,
    gate: Gate,
    /// After an accept error (out of file descriptors): wait before the next accept.
    backoff: Option<Pin<Box<Sleep>>>,
}

impl BoundedListener {
    pub fn new(listener: TcpListener, name: &str, limits: ConnectionLimits, m: &ConnectionMetrics) -> Self {
        BoundedListener { listener, gate: Gate::new(name, limits, m), backoff: None }
    }

    fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<(Guarded, std::net::SocketAddr)> {
        loop {
            if let Some(b) = self.backoff.as_mut() {
                if b.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, addr))) => {
                    if let Some(g) = self.gate.admit(stream) {
                        return Poll::Ready((g, addr));
                    }
                }
                Poll::Ready(Err(error)) => {
                    // Per-connection errors (reset before accept) and resource exhaustion
                    // alike: the listener stays up.
                    warn!(%error, "cannot accept a connection");
                    self.backoff = Some(Box::pin(sleep(Duration::from_millis(100))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl tokio_stream::Stream for BoundedListener {
    type Item = io::Result<Guarded>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_admit(cx).map(|(g, _)| Some(Ok(g)))
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        std::future::poll_fn(|cx| self.poll_admit(cx)).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// The HTTP listener over TLS: handshakes run beside the accept loop (a client that never
/// finishes one holds only its own connection, until `handshake_within`), and only finished
/// ones are handed to the server.
pub struct TlsListener {
    inner: BoundedListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_within: Duration,
    handshakes: tokio::task::JoinSet<Option<(tokio_rustls::server::TlsStream<Guarded>, std::net::SocketAddr)>>,
}

impl TlsListener {
    pub fn new(
        inner: BoundedListener,
        config: Arc<tokio_rustls::rustls::ServerConfig>,
        handshake_within: Duration,
    ) -> Self {
        TlsListener {
            inner,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            handshake_within,
            handshakes: tokio::task::JoinSet::new(),
        }
    }
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener").field("inner", &self.inner).field("handshakes", &self.handshakes.len()).finish()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<Guarded>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                (io, addr) = std::future::poll_fn(|cx| self.inner.poll_admit(cx)) => {
                    let (acceptor, within) = (self.acceptor.clone(), self.handshake_within);
                    self.handshakes.spawn(async move {
                        match tokio::time::timeout(within, acceptor.accept(io)).await {
                            Ok(Ok(tls)) => Some((tls, addr)),
                            Ok(Err(error)) => {
                                tracing::debug!(%error, %addr, "TLS handshake failed");
                                None
                            }
                            Err(_) => None,
                        }
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.listener.local_addr()
    }
}
