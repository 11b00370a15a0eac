//! The player: streams a generator's slices to meshwatch over real gRPC, one access-log
//! stream per simulated Envoy logger (and one stats-sink stream per calling Envoy, when the
//! scenario has them), as fast as meshwatch accepts them or at a set pace.
//!
//! Generation runs on its own thread (it is CPU work), a few slices ahead; each stream has a
//! small queue, so a slow stream holds the whole simulation back instead of letting streams
//! drift apart in simulated time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshwatch_collector::als::{BytesCodec, STREAM_ACCESS_LOGS_PATH};
use meshwatch_collector::envoy_stats::STREAM_METRICS_PATH;
use meshwatch_collector::pipeline::wall_clock_ms;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::generate::{Generator, Slice};

/// How fast simulated time runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// As fast as meshwatch accepts the traffic.
    Max,
    /// Simulated seconds per wall-clock second (1 is real time).
    Speed(f64),
}

/// Which time the entries carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// The scenario's own time (meshwatch must close windows by watermark).
    Simulated,
    /// The wall clock at generation (for a meshwatch on its live clock).
    Wall,
}

#[derive(Clone, Debug)]
pub struct PlayOptions {
    pub target: SocketAddr,
    pub pace: Pace,
    pub stamp: Stamp,
    /// gRPC connections the streams share.
    pub connections: usize,
}

#[derive(Clone, Debug, Default)]
pub struct PlayReport {
    pub entries: u64,
    pub messages: u64,
    pub simulated_ms: i64,
    pub wall: Duration,
    /// Streams that meshwatch ended with an error.
    pub stream_errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PlayError {
    #[error("cannot connect to meshwatch at {target}: {source}")]
    Connect { target: SocketAddr, source: tonic::transport::Error },
    #[error("the generator thread failed")]
    Generator,
}

/// Plays `generator` to its end (or until `shutdown`); returns the generator with what it
/// counted, and what was sent.
pub async fn play(
    mut generator: Generator,
    opts: &PlayOptions,
    shutdown: CancellationToken,
) -> Result<(Generator, PlayReport), PlayError> {
    let mut channels = Vec::new();
    for _ in 0..opts.connections.max(1) {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", opts.target))
            .map_err(|source| PlayError::Connect { target: opts.target, source })?
            .tcp_nodelay(true);
        channels.push(endpoint.connect().await.map_err(|source| PlayError::Connect { target: opts.target, source })?);
    }
    let stream_count = generator.streams().len();
    let callers = generator.scenario().services.len();
    let (slices_tx, mut slices_rx) = mpsc::channel::<Slice>(4);
    let stamp = opts.stamp;
    let stop = shutdown.clone();
    let producer = std::thread::spawn(move || {
        while !stop.is_cancelled() {
            let shift = match stamp {
                Stamp::Simulated => 0,
                Stamp::Wall => wall_clock_ms() - generator.now_ms(),
            };
            let Some(slice) = generator.next_slice(shift) else { break };
            if slices_tx.blocking_send(slice).is_err() {
                break;
            }
        }
        generator
    });

    let mut senders: Vec<Option<mpsc::Sender<Bytes>>> = vec![None; stream_count + callers];
    let mut tasks: Vec<JoinHandle<bool>> = Vec::new();
    let mut report = PlayReport::default();
    let started = Instant::now();
    let mut first_slice_ms = None;
    loop {
        let slice = tokio::select! {
            () = shutdown.cancelled() => break,
            s = slices_rx.recv() => match s { Some(s) => s, None => break },
        };
        let t0 = *first_slice_ms.get_or_insert(slice.start_ms);
        if let Pace::Speed(speed) = opts.pace {
            let due = Duration::from_secs_f64(((slice.start_ms - t0) as f64 / 1000.0 / speed).max(0.0));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
        report.entries += slice.entries;
        report.simulated_ms = slice.start_ms - t0;
        let access_logs = slice.messages.into_iter().map(|(i, m)| (i, m, STREAM_ACCESS_LOGS_PATH));
        let stats = slice.stats.into_iter().map(|(i, m)| (stream_count + i, m, STREAM_METRICS_PATH));
        for (stream, message, path) in access_logs.chain(stats) {
            let tx = senders[stream].get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel(2);
                let channel = channels[stream % channels.len()].clone();
                tasks.push(tokio::spawn(run_stream(channel, path, rx)));
                tx
            });
            report.messages += 1;
            if tx.send(message).await.is_err() {
                report.stream_errors += 1;
                senders[stream] = None;
            }
        }
    }
    drop(slices_rx);
    drop(senders);
    for t in tasks {
        if !t.await.unwrap_or(false) {
            report.stream_errors += 1;
        }
    }
    report.wall = started.elapsed();
    let generator = producer.join().map_err(|_| PlayError::Generator)?;
    Ok((generator, report))
}

/// One access-log or stats stream (`path`); true when meshwatch closed it cleanly.
async fn run_stream(channel: tonic::transport::Channel, path: &'static str, rx: mpsc::Receiver<Bytes>) -> bool {
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return false;
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.client_streaming(tonic::Request::new(ReceiverStream::new(rx)), path, BytesCodec).await.is_ok()
}
