//! Outbound connections: one peer's control connection (Raft) and its data connections
//! (requests multiplexed by id), dialled lazily and redialled with a capped backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::handshake::{self, Channel, HandshakeError};
use super::wire::{Frame, FrameReader, Outgoing};
use super::{Counters, OpenGuard, RAFT_QUEUE, Response, Shared, TaskGuard, TransportError};

const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Frames queued per data connection's writer.
const WRITE_QUEUE: usize = 256;
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// Connects to `addr` and runs the client handshake, each within `connect_timeout`.
pub(crate) async fn dial(
    shared: &Shared,
    addr: &str,
    channel: Channel,
    expect: Option<u64>,
) -> Result<(u64, TcpStream), TransportError> {
    let limit = shared.cfg.connect_timeout;
    let connect_err = |source| TransportError::Connect { addr: addr.to_string(), source };
    let mut s = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(r) => r.map_err(connect_err)?,
        Err(_) => return Err(connect_err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))),
    };
    super::sockopt::tune(&s, shared.cfg.dead_peer_timeout);
    let keys = shared.keys();
    let r = match tokio::time::timeout(limit, handshake::client(&mut s, &keys, channel, expect)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))),
    };
    match r {
        Ok(id) => Ok((id, s)),
        Err(HandshakeError::Refused(reason)) => {
            shared.refused(addr, &reason);
            Err(TransportError::Refused { addr: addr.to_string(), reason })
        }
        Err(HandshakeError::Io(e)) => Err(connect_err(e)),
    }
}

/// Writes frames from `rx` until it closes or a write fails; flushes when the queue is empty.
/// A frame that takes longer than `stall` to write means the peer is gone.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Outgoing>,
    counters: Arc<Counters>,
    stall: Duration,
) -> Result<(), TransportError> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next {
            tokio::time::timeout(stall, out.write_to(&mut w)).await.map_err(|_| {
                TransportError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))
            })??;
            counters.sent(out.wire_len());
            next = rx.try_recv().ok();
        }
        tokio::time::timeout(stall, w.flush())
            .await
            .map_err(|_| TransportError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "flush stalled")))??;
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// When to dial a peer again after a failure, and the failure to report meanwhile.
#[derive(Default)]
struct Backoff {
    delay: Duration,
    next: Option<Instant>,
    last: Option<(std::io::ErrorKind, String, bool)>,
}

impl Backoff {
    /// The error to fail with while waiting, or `None` when a dial may be tried.
    fn waiting(&self, addr: &str) -> Option<TransportError> {
        let next = self.next?;
        let now = Instant::now();
        if now >= next {
            return None;
        }
        let (kind, msg, refused) = self.last.clone()?;
        let left = next - now;
        Some(if refused {
            TransportError::Refused { addr: addr.to_string(), reason: msg }
        } else {
            TransportError::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(kind, format!("{msg} (backing off, next dial in {left:?})")),
            }
        })
    }

    fn failed(&mut self, e: &TransportError) {
        self.delay = if self.delay.is_zero() { BACKOFF_FIRST } else { (self.delay * 2).min(BACKOFF_MAX) };
        self.next = Some(Instant::now() + self.delay);
        self.last = Some(match e {
            TransportError::Refused { reason, .. } => (std::io::ErrorKind::PermissionDenied, reason.clone(), true),
            TransportError::Connect { source, .. } => (source.kind(), source.to_string(), false),
            other => (std::io::ErrorKind::Other, other.to_string(), false),
        });
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// One entry of the address book with its outbound connections.
pub(crate) struct Peer {
    pub id: u64,
    pub addr: String,
    /// Feeds the control task; dropping the peer ends it.
    pub raft_tx: mpsc::Sender<Bytes>,
    slots: Vec<tokio::sync::Mutex<Option<Arc<DataConn>>>>,
    next_slot: AtomicUsize,
    backoff: Arc<Mutex<Backoff>>,
}

impl Peer {
    pub fn new(shared: &Arc<Shared>, id: u64, addr: String) -> Arc<Peer> {
        let (raft_tx, raft_rx) = mpsc::channel(RAFT_QUEUE);
        shared.rt.spawn(control_loop(shared.clone(), id, addr.clone(), raft_rx));
        let slots = (0..shared.cfg.data_connections).map(|_| tokio::sync::Mutex::new(None)).collect();
        Arc::new(Peer { id, addr, raft_tx, slots, next_slot: AtomicUsize::new(0), backoff: Default::default() })
    }

    /// The next data connection in turn, dialled if it is not open. Fails at once while backing
    /// off from a failed dial.
    pub async fn data_conn(&self, shared: &Arc<Shared>) -> Result<Arc<DataConn>, TransportError> {
        let i = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref()
            && c.alive()
        {
            return Ok(c.clone());
        }
        *slot = None;
        if let Some(e) = self.backoff.lock().expect("backoff lock").waiting(&self.addr) {
            return Err(e);
        }
        match DataConn::open(shared, &self.addr, Some(self.id)).await {
            Ok(c) => {
                self.backoff.lock().expect("backoff lock").succeeded();
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                tracing::debug!(to = self.id, addr = %self.addr, error = %e, "data connection failed");
                self.backoff.lock().expect("backoff lock").failed(&e);
                Err(e)
            }
        }
    }
}

type Reply = oneshot::Sender<Result<(Response, Bytes), TransportError>>;

/// What a data connection's caller and reader share.
#[derive(Default)]
struct ConnState {
    pending: Mutex<HashMap<u64, Reply>>,
    alive: AtomicBool,
}

impl ConnState {
    /// Marks the connection dead and fails every call waiting on it.
    fn fail_all(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        for (_, reply) in pending {
            let _ = reply.send(Err(TransportError::Closed));
        }
    }
}

/// Removes a call's entry when the call ends, answered, failed, timed out or dropped.
struct PendingGuard<'a>(&'a ConnState, u64);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().expect("pending lock").remove(&self.1);
    }
}

/// One outbound data connection: calls are sent through its writer task and answered by id
/// from its reader. Dropping it closes the connection.
pub(crate) struct DataConn {
    pub peer_id: u64,
    tx: mpsc::Sender<Outgoing>,
    state: Arc<ConnState>,
    next_id: AtomicU64,
}

impl DataConn {
    pub async fn open(shared: &Arc<Shared>, addr: &str, expect: Option<u64>) -> Result<Arc<DataConn>, TransportError> {
        let (peer_id, stream) = dial(shared, addr, Channel::Data, expect).await?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let state = Arc::new(ConnState { pending: Mutex::new(HashMap::new()), alive: AtomicBool::new(true) });
        shared.rt.spawn(data_conn_task(shared.clone(), peer_id, addr.to_string(), stream, rx, state.clone()));
        Ok(Arc::new(DataConn { peer_id, tx, state, next_id: AtomicU64::new(1) }))
    }

    pub fn alive(&self) -> bool {
        self.state.alive.load(Ordering::SeqCst)
    }

    /// Sends one request and waits for its answer (no time limit: the caller sets one).
    pub async fn call(&self, req: super::Request, body: Bytes) -> Result<(Response, Bytes), TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let out = Outgoing::new(&Frame::Request { id, req }, body)?;
        let (reply, answer) = oneshot::channel();
        self.state.pending.lock().expect("pending lock").insert(id, reply);
        let _guard = PendingGuard(&self.state, id);
        // Checked after inserting: `fail_all` clears `alive` before draining, so a call is
        // either drained or sees the connection dead here.
        if !self.alive() {
            return Err(TransportError::Closed);
        }
        self.tx.send(out).await.map_err(|_| TransportError::Closed)?;
        answer.await.map_err(|_| TransportError::Closed)?
    }
}

async fn data_conn_task(
    shared: Arc<Shared>,
    peer_id: u64,
    addr: String,
    stream: TcpStream,
    rx: mpsc::Receiver<Outgoing>,
    state: Arc<ConnState>,
) {
    let _task = TaskGuard::new(&shared);
    let counters = shared.counters(peer_id);
    let _open = OpenGuard::new(counters.clone());
    let (r, w) = stream.into_split();
    let mut writer = shared.rt.spawn(write_loop(w, rx, counters.clone(), shared.cfg.call_timeout));
    let mut stop = shared.stop.subscribe();
    let reader = read_answers(&shared, peer_id, r, &state, &counters);
    let outcome = tokio::select! {
        r = reader => r.err().map(|e| e.to_string()),
        w = &mut writer => match w {
            Ok(Err(e)) => Some(e.to_string()),
            _ => None,
        },
        _ = stop.wait_for(|s| *s) => None,
    };
    writer.abort();
    state.fail_all();
    match outcome {
        Some(e) => tracing::debug!(to = peer_id, %addr, error = %e, "data connection closed"),
        None => tracing::debug!(to = peer_id, %addr, "data connection closed"),
    }
}

/// Hands each answer to its waiting call until the connection ends.
async fn read_answers(
    shared: &Shared,
    peer_id: u64,
    r: OwnedReadHalf,
    state: &ConnState,
    counters: &Counters,
) -> Result<(), TransportError> {
    let mut frames = FrameReader::new(tokio::io::BufReader::with_capacity(WRITE_BUFFER_BYTES, r));
    while let Some((frame, body, len)) = frames.next().await? {
        counters.received(len);
        match frame {
            Frame::Response { id, resp } => {
                if shared.is_blocked(peer_id) {
                    continue;
                }
                let reply = state.pending.lock().expect("pending lock").remove(&id);
                if let Some(reply) = reply {
                    let _ = reply.send(Ok((resp, body)));
                }
            }
            other => {
                return Err(TransportError::Decode(format!(
                    "unexpected frame on an outbound data connection frame={other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// An open control connection: the writer, and the reader kept only to notice the peer closing.
struct Control {
    r: OwnedReadHalf,
    w: BufWriter<OwnedWriteHalf>,
    _open: OpenGuard,
}

/// Resolves when the peer closes the control connection (it never sends anything on it).
async fn closed(c: &mut Option<Control>) {
    match c {
        Some(c) => {
            let mut buf = [0u8; 64];
            loop {
                match c.r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        }
        None => std::future::pending().await,
    }
}

enum Event {
    Stop,
    Msg(Option<Bytes>),
    Closed,
}

/// The writer of one peer's control connection: Raft messages in queue order, dialled when
/// needed, dropped while the peer is unreachable.
async fn control_loop(shared: Arc<Shared>, id: u64, addr: String, mut rx: mpsc::Receiver<Bytes>) {
    let _task = TaskGuard::new(&shared);
    let mut stop = shared.stop.subscribe();
    let counters = shared.counters(id);
    let mut conn: Option<Control> = None;
    let mut backoff = Backoff::default();
    loop {
        let ev = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Event::Stop,
            m = rx.recv() => Event::Msg(m),
            _ = closed(&mut conn) => Event::Closed,
        };
        let msg = match ev {
            Event::Stop | Event::Msg(None) => break,
            Event::Closed => {
                tracing::debug!(to = id, %addr, "control connection closed by peer");
                conn = None;
                continue;
            }
            Event::Msg(Some(m)) => m,
        };
        let drop_msg = |why: &str| {
            counters.raft_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(to = id, %addr, why, "raft message dropped");
        };
        if shared.is_blocked(id) {
            drop_msg("blocked");
            continue;
        }
        if conn.is_none() {
            if backoff.waiting(&addr).is_some() {
                drop_msg("backing off");
                continue;
            }
            match dial(&shared, &addr, Channel::Control, Some(id)).await {
                Ok((_, s)) => {
                    backoff.succeeded();
                    let (r, w) = s.into_split();
                    let w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
                    conn = Some(Control { r, w, _open: OpenGuard::new(counters.clone()) });
                }
                Err(e) => {
                    tracing::debug!(to = id, %addr, error = %e, "control connection failed");
                    backoff.failed(&e);
                    drop_msg("unreachable");
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        if let Err(e) = write_raft_batch(&shared, id, c, msg, &mut rx, &counters).await {
            tracing::debug!(to = id, %addr, error = %e, "control connection write failed");
            conn = None;
        }
    }
}

/// Writes `first` and whatever else is queued, then flushes.
async fn write_raft_batch(
    shared: &Shared,
    id: u64,
    c: &mut Control,
    first: Bytes,
    rx: &mut mpsc::Receiver<Bytes>,
    counters: &Counters,
) -> Result<(), TransportError> {
    let stall = shared.cfg.call_timeout;
    let mut next = Some(first);
    while let Some(msg) = next {
        let out = Outgoing::new(&Frame::Raft, msg)?;
        tokio::time::timeout(stall, out.write_to(&mut c.w))
            .await
            .map_err(|_| TransportError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled")))??;
        counters.sent(out.wire_len());
        next = rx.try_recv().ok();
        if next.is_some() && shared.is_blocked(id) {
            next = None;
        }
    }
    tokio::time::timeout(stall, c.w.flush())
        .await
        .map_err(|_| TransportError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "flush stalled")))??;
    Ok(())
}
