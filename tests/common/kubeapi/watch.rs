//! A watch response: newline-delimited JSON events over a chunked body, one chunk per
//! event so the client has it at once.
//!
//! A task per watch moves events from the store's bounded queue to the connection.
//! When the client reads slowly the task waits on the connection, not the writers; the
//! store's queue fills and the store cuts the watcher off, which ends the stream with
//! a 410 ERROR. `drop_watches` aborts the connection mid-stream (no terminating
//! chunk), which is what a client sees when the API server restarts.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::control::Shared;
use super::media::Render;
use super::resources::ResourceDef;
use super::status::ApiError;
use super::store::{Subscription, WatchEvent};

pub struct WatchOptions {
    pub def: &'static ResourceDef,
    pub render: Render,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: a BOOKMARK annotated `k8s.io/initial-events-end` follows
    /// the initial events (streaming lists, kube-rs' `StreamingList`).
    pub initial_events_end: bool,
    pub timeout: Option<Duration>,
}

type Chunk = Result<Bytes, io::Error>;

/// The body of a watch that ends at once with a 410, for a resourceVersion that is too old.
pub fn expired_body(message: String) -> Body {
    let event = line("ERROR", &ApiError::expired(message).to_status());
    // Streamed like every watch (chunked), not as a sized body.
    Body::from_stream(futures_util::stream::once(async move { Ok::<_, io::Error>(event) }))
}

pub fn spawn(shared: Arc<Shared>, sub: Subscription, opts: WatchOptions) -> Body {
    // One chunk in flight: the connection, not this channel, is where a slow client waits.
    let (tx, rx) = mpsc::channel::<Chunk>(1);
    tokio::spawn(run(shared, sub, opts, tx));
    Body::from_stream(ReceiverStream::new(rx))
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON values serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn bookmark(def: &ResourceDef, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": meta})
}

struct Stream {
    tx: mpsc::Sender<Chunk>,
    cut: CancellationToken,
    opts: WatchOptions,
}

/// Why the stream stopped early.
enum End {
    ClientGone,
    Cut,
}

impl Stream {
    async fn send(&self, chunk: Bytes) -> Result<(), End> {
        tokio::select! {
            sent = self.tx.send(Ok(chunk)) => sent.map_err(|_| End::ClientGone),
            () = self.cut.cancelled() => Err(End::Cut),
        }
    }

    async fn event(&self, event: &WatchEvent) -> Result<(), End> {
        let object = self.opts.render.object(self.opts.def, &event.object);
        self.send(line(event.kind.as_str(), &object)).await
    }

    async fn bookmark(&self, rv: u64, initial_end: bool) -> Result<(), End> {
        self.send(line("BOOKMARK", &bookmark(self.opts.def, rv, initial_end))).await
    }
}

async fn run(shared: Arc<Shared>, mut sub: Subscription, opts: WatchOptions, tx: mpsc::Sender<Chunk>) {
    let _open = shared.watch_opened();
    let stream = Stream { tx, cut: shared.watch_cut_token(), opts };
    if let Err(End::Cut) = pump(&shared, &mut sub, &stream).await {
        // An error chunk makes hyper abort the connection instead of ending the body.
        let _ = stream.tx.try_send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch cut by the emulator")));
    }
}

async fn pump(shared: &Shared, sub: &mut Subscription, stream: &Stream) -> Result<(), End> {
    for event in std::mem::take(&mut sub.initial) {
        stream.event(&event).await?;
    }
    if stream.opts.initial_events_end {
        stream.bookmark(sub.rv, true).await?;
    }
    let deadline = stream.opts.timeout.map(|t| Instant::now() + t);
    let period = shared.config.bookmark_interval;
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stream.cut.cancelled() => return Err(End::Cut),
            () = stream.tx.closed() => return Err(End::ClientGone),
            () = sleep_until(deadline) => return Ok(()),
            event = sub.rx.recv() => match event {
                Some(event) => stream.event(&event).await?,
                None => {
                    if sub.too_slow.load(Ordering::SeqCst) {
                        let why = "watch too slow: the client fell behind and was dropped";
                        let status = ApiError::expired(why).to_status();
                        stream.send(line("ERROR", &status)).await?;
                    }
                    return Ok(());
                }
            },
            _ = ticks.tick(), if stream.opts.bookmarks => {
                let (queued, rv) = shared.store.sync_point(&mut sub.rx);
                for event in &queued {
                    stream.event(event).await?;
                }
                stream.bookmark(rv, false).await?;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
