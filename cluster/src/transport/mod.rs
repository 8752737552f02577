//! Node-to-node transport: framed binary messages over TCP, authenticated with the cluster secret.
//!
//! It carries Raft messages (fire and forget, in order, on a dedicated *control* connection per
//! peer so that they never wait behind block data) and requests with answers (block reads and
//! writes, forwarded metadata writes, joins) on a few *data* connections per peer, multiplexed
//! by request id. It owns sockets, the handshake and the framing; it does not own what a
//! request means (that is the [`Handler`]) nor who the peers are (the caller keeps the address
//! book up to date with [`Transport::set_peer`]).
//!
//! # Connections
//!
//! Every connection is opened by the sender and carries one direction of traffic: node A's Raft
//! messages to B travel on A's control connection to B, B's to A on B's own. Outbound
//! connections are opened lazily on first use; a failed connect is retried with a capped
//! exponential backoff (50 ms .. 2 s), and while backing off a call fails at once and a Raft
//! message is dropped (Raft retransmits). Each connection has a writer task fed by a channel
//! and a reader; an inbound connection's reader spawns a task per request, at most
//! [`TransportConfig::max_in_flight`] at a time per connection (it stops reading beyond that,
//! which pushes back on the sender through TCP). Every socket gets `TCP_NODELAY` and
//! kernel dead-peer detection (keepalive, `TCP_USER_TIMEOUT`; see
//! [`TransportConfig::dead_peer_timeout`]), so a silently cut network closes the connections
//! and a healed one is redialled within seconds.
//!
//! # Handshake
//!
//! Mutual challenge-response with HMAC-SHA256 keyed by the cluster secret; the secret never
//! crosses the wire. Handshake messages are `[u32 LE len][postcard Handshake]`, len <= 4 KiB.
//!
//! ```text
//! client                                                     server
//!   | "TPCL" | u16 LE version |                                  |   fixed 6 bytes, checked first
//!   | Hello { cluster_id, node_id, nonce_c: [u8; 32], channel } ->|   channel = Control | Data
//!   |<- Challenge { node_id, nonce_s: [u8; 32], mac_s }           |
//!   | Proof { mac_c } ------------------------------------------->|
//!   |<- Accepted                                                  |
//!
//! mac_s = HMAC(secret, "tidepool server" || nonce_c || nonce_s || u32 LE len(cluster_id) || cluster_id || u64 LE server_id)
//! mac_c = HMAC(secret, "tidepool client" || nonce_c || nonce_s || u32 LE len(cluster_id) || cluster_id || u64 LE client_id)
//! ```
//!
//! The server refuses another version ("unsupported version") or cluster id ("other cluster
//! id") right after the Hello, and a wrong `mac_c` ("wrong cluster secret"); the client refuses
//! a wrong `mac_s` ("wrong cluster secret") or a node id other than the address book's. The
//! refusing side sends `Refused { reason }` before closing, so the caller's
//! [`TransportError::Refused`] says why; both sides log `peer refused: ...` and count it in
//! [`TransportStats::refused_handshakes`]. Tags are checked in constant time. The handshake
//! authenticates; it does not encrypt (run the cluster on a private network).
//!
//! # Frames
//!
//! ```text
//! +----------------+----------------+---------------------------+---------------------+
//! | header_len u32 | body_len u32   | header: postcard Frame    | body: raw bytes     |
//! | LE, <= 1 MiB   | LE, <= 64 MiB  | (header_len bytes)        | (body_len bytes)    |
//! +----------------+----------------+---------------------------+---------------------+
//!
//! Frame = Raft                          body = protobuf raft::eraftpb::Message
//!       | Request  { id: u64, req }     body = block bytes for PutBlock, else empty
//!       | Response { id: u64, resp }    body = block bytes for Block; for Joined, the cluster's
//!                                     node key sealed under the cluster secret (the binary's
//!                                     `cluster.rs`); else empty
//! ```
//!
//! A frame over either bound closes the connection (the other connections are unaffected).
//! The sender checks the bounds too ([`TransportError::TooLarge`]); a Raft message over 64 MiB
//! (only a big snapshot can be) is dropped with an error log: large snapshots need a streaming
//! path of their own, not built yet. A call that fails with [`TransportError::Closed`] or
//! [`TransportError::Timeout`] may or may not have been handled by the peer.
//! [`Request`], [`Response`] and the handshake messages are postcard enums: their variant order
//! is the wire format; new variants go at the end, anything else bumps [`PROTOCOL_VERSION`].

mod conn;
mod handshake;
mod server;
mod sockopt;
mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use protobuf::Message as _;
use tokio::sync::{Notify, watch};
use tracing::Instrument as _;

pub use handshake::Channel;
pub use wire::{ErrKind, Frame, MAX_BODY_BYTES, MAX_HEADER_BYTES, Request, Response};

use conn::{DataConn, Peer};

/// First bytes of every connection.
pub const MAGIC: &[u8; 4] = b"TPCL";
/// The protocol version spoken; a peer with another one is refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// Shortest cluster secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;
/// Raft messages queued per peer before new ones are dropped.
pub const RAFT_QUEUE: usize = 4096;

/// Settings of one node's transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// This node's id (never 0: raft-rs reserves it).
    pub node_id: u64,
    /// A node of another cluster is refused even with the same secret.
    pub cluster_id: String,
    /// Address to listen on, e.g. "127.0.0.2:7100"; port 0 picks a free one. Default 127.0.0.1:0.
    pub listen: String,
    /// The cluster secret, at least [`MIN_SECRET_BYTES`]. Default empty, which `bind` refuses.
    pub secret: Vec<u8>,
    /// A call is answered or failed within this. Default 10 s.
    pub call_timeout: Duration,
    /// TCP connect, and then the handshake, each within this. Default 1 s.
    pub connect_timeout: Duration,
    /// Outbound data connections per peer. Default 4.
    pub data_connections: usize,
    /// Requests handled at once per inbound connection; beyond it the connection is not read.
    /// Default 64.
    pub max_in_flight: usize,
    /// A connection whose peer stops acknowledging data or keepalive probes this long is closed
    /// by the kernel (Linux; see `sockopt`), so a silently cut network heals promptly. Default 6 s.
    pub dead_peer_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            node_id: 1,
            cluster_id: String::new(),
            listen: "127.0.0.1:0".to_string(),
            secret: Vec::new(),
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            data_connections: 4,
            max_in_flight: 64,
            dead_peer_timeout: Duration::from_secs(6),
        }
    }
}

impl TransportConfig {
    fn validate(&self) -> Result<(), TransportError> {
        if self.secret.len() < MIN_SECRET_BYTES {
            return Err(TransportError::Config(format!(
                "cluster secret too short: at least {MIN_SECRET_BYTES} bytes needed secret_bytes={}",
                self.secret.len()
            )));
        }
        if self.node_id == 0 {
            return Err(TransportError::Config("node id 0 is reserved node_id=0".to_string()));
        }
        if self.data_connections == 0 || self.max_in_flight == 0 {
            return Err(TransportError::Config(format!(
                "data_connections and max_in_flight must be at least 1 data_connections={} max_in_flight={}",
                self.data_connections, self.max_in_flight
            )));
        }
        if self.call_timeout.is_zero() || self.connect_timeout.is_zero() || self.dead_peer_timeout.is_zero() {
            return Err(TransportError::Config("timeouts must be non-zero".to_string()));
        }
        Ok(())
    }
}

/// What this node does with what its peers send.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// One Raft message from an authenticated peer. Must not block (it runs on the connection's
    /// reader): queue it.
    fn raft(&self, from: u64, msg: ::raft::eraftpb::Message);
    /// One request; its answer. `body` is the raw bytes after the header (block data).
    /// [`Request::Ping`] is answered by the transport and never reaches here.
    async fn request(&self, from: u64, req: Request, body: Bytes) -> (Response, Bytes);
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("unknown peer node_id={0}")]
    UnknownPeer(u64),
    #[error("connect failed addr={addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed: wrong secret, other cluster id, unsupported version.
    #[error("peer refused: {reason} addr={addr}")]
    Refused { addr: String, reason: String },
    #[error("call timed out to={to} after={after:?}")]
    Timeout { to: String, after: Duration },
    #[error("connection closed")]
    Closed,
    #[error("transport i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("transport decode: {0}")]
    Decode(String),
    #[error("transport config: {0}")]
    Config(String),
    /// A frame over the bounds of the wire format (checked before sending, and on receipt).
    #[error("frame too large what={what} len={len} max={max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
}

/// Traffic with one peer, both directions, all connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub node_id: u64,
    /// From the address book; `None` for a peer that only connected to us.
    pub addr: Option<String>,
    /// At least one connection to or from it is open.
    pub connected: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Raft messages dropped (queue full, peer unreachable or blocked).
    pub raft_dropped: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub peers: Vec<PeerStats>,
    /// Handshakes that failed on this node, either side refusing.
    pub refused_handshakes: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub raft_dropped: AtomicU64,
    /// Open connections with this peer, both directions.
    pub open: AtomicUsize,
}

impl Counters {
    pub fn sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
    }
    pub fn received(&self, bytes: u64) {
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.messages_received.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a connection open while it lives.
pub(crate) struct OpenGuard(Arc<Counters>);

impl OpenGuard {
    pub fn new(c: Arc<Counters>) -> Self {
        c.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(c)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps `shutdown` waiting while a connection task lives.
pub(crate) struct TaskGuard(Arc<Shared>);

impl TaskGuard {
    pub fn new(s: &Arc<Shared>) -> Self {
        s.tasks.fetch_add(1, Ordering::SeqCst);
        TaskGuard(s.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.tasks_done.notify_waiters();
        }
    }
}

/// What every task of one transport shares. Tasks hold this, never the [`Transport`], so that
/// dropping the transport stops them.
pub(crate) struct Shared {
    pub cfg: TransportConfig,
    pub handler: Arc<dyn Handler>,
    pub rt: tokio::runtime::Handle,
    pub stop: watch::Sender<bool>,
    pub blocked: RwLock<HashSet<u64>>,
    pub counters: Mutex<HashMap<u64, Arc<Counters>>>,
    pub refused: AtomicU64,
    pub tasks: AtomicUsize,
    pub tasks_done: Notify,
}

impl Shared {
    pub fn counters(&self, peer: u64) -> Arc<Counters> {
        // Invariant: nothing panics while holding this lock.
        self.counters.lock().expect("counters lock").entry(peer).or_default().clone()
    }

    pub fn is_blocked(&self, peer: u64) -> bool {
        self.blocked.read().expect("blocked lock").contains(&peer)
    }

    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Logs and counts a failed handshake.
    pub fn refused(&self, addr: &str, reason: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node_id = self.cfg.node_id, %addr, %reason, "peer refused: {reason} addr={addr}");
    }

    pub fn keys(&self) -> handshake::Keys<'_> {
        handshake::Keys { secret: &self.cfg.secret, cluster_id: &self.cfg.cluster_id, node_id: self.cfg.node_id }
    }
}

/// One node's end of the node-to-node transport. Use it as `Arc<Transport>`.
pub struct Transport {
    shared: Arc<Shared>,
    local: SocketAddr,
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl Transport {
    /// Listens on `cfg.listen` and serves peers with `handler`. Must be called within a tokio
    /// runtime; the transport's tasks run on it.
    pub async fn bind(cfg: TransportConfig, handler: Arc<dyn Handler>) -> Result<Arc<Transport>, TransportError> {
        cfg.validate()?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| TransportError::Connect { addr: cfg.listen.clone(), source: e })?;
        let local = listener.local_addr()?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg,
            handler,
            rt: tokio::runtime::Handle::current(),
            stop,
            blocked: RwLock::new(HashSet::new()),
            counters: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            tasks: AtomicUsize::new(0),
            tasks_done: Notify::new(),
        });
        let accept = shared.rt.spawn(server::accept_loop(shared.clone(), listener));
        tracing::info!(node_id = shared.cfg.node_id, %local, "transport listening");
        Ok(Arc::new(Transport {
            shared,
            local,
            peers: RwLock::new(HashMap::new()),
            accept: Mutex::new(Some(accept)),
            stopped: AtomicBool::new(false),
        }))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn node_id(&self) -> u64 {
        self.shared.cfg.node_id
    }

    /// Adds or updates a peer in the address book. A changed address drops the connections to
    /// the old one. Raft messages and calls to an id not in the book fail or are dropped.
    pub fn set_peer(&self, id: u64, addr: String) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let mut peers = self.peers.write().expect("peers lock");
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        peers.insert(id, Peer::new(&self.shared, id, addr));
    }

    /// Forgets a peer and closes the connections to it.
    pub fn remove_peer(&self, id: u64) {
        self.peers.write().expect("peers lock").remove(&id);
    }

    /// The address book.
    pub fn peers(&self) -> Vec<(u64, String)> {
        let mut v: Vec<_> = self.peers.read().expect("peers lock").values().map(|p| (p.id, p.addr.clone())).collect();
        v.sort();
        v
    }

    fn peer(&self, id: u64) -> Option<Arc<Peer>> {
        self.peers.read().expect("peers lock").get(&id).cloned()
    }

    /// Queues one Raft message to `to`; never blocks (callable from a plain thread). Messages to
    /// one peer arrive in order on its control connection. Dropped, with a debug log, when the
    /// peer is unknown, unreachable, blocked or its queue is full: Raft retransmits.
    pub fn send_raft(&self, to: u64, msg: ::raft::eraftpb::Message) {
        if self.shared.stopped() || self.shared.is_blocked(to) {
            return;
        }
        let Some(peer) = self.peer(to) else {
            tracing::debug!(to, msg_type = ?msg.get_msg_type(), "raft message to an unknown peer dropped");
            return;
        };
        let bytes = match msg.write_to_bytes() {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::warn!(to, error = %e, "raft message does not encode; dropped");
                return;
            }
        };
        if bytes.len() > MAX_BODY_BYTES {
            // Only a snapshot gets this big; it needs a streaming path (not built yet).
            self.shared.counters(to).raft_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                to,
                len = bytes.len(),
                max = MAX_BODY_BYTES,
                "raft message too large for one frame; dropped"
            );
            return;
        }
        if let Err(e) = peer.raft_tx.try_send(bytes) {
            self.shared.counters(to).raft_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(to, error = %e, "raft queue full or closed; message dropped");
        }
    }

    /// One request to peer `to` on one of its data connections; answered or failed within
    /// `call_timeout`. A peer that is down fails fast with [`TransportError::Connect`].
    pub async fn call(&self, to: u64, req: Request, body: Bytes) -> Result<(Response, Bytes), TransportError> {
        if self.shared.stopped() {
            return Err(TransportError::Closed);
        }
        let peer = self.peer(to).ok_or(TransportError::UnknownPeer(to))?;
        if self.shared.is_blocked(to) {
            return Err(TransportError::Connect {
                addr: peer.addr.clone(),
                source: std::io::Error::new(std::io::ErrorKind::HostUnreachable, "peer blocked by set_blocked"),
            });
        }
        let after = self.shared.cfg.call_timeout;
        let span = tracing::debug_span!("transport_call", to, kind = req.kind());
        let work = async {
            let conn = peer.data_conn(&self.shared).await?;
            conn.call(req, body).await
        };
        tokio::time::timeout(after, work.instrument(span))
            .await
            .unwrap_or_else(|_| Err(TransportError::Timeout { to: format!("node {to} at {}", peer.addr), after }))
    }

    /// One request to an address whose node id is not known yet (joining), on a connection of
    /// its own that is closed afterwards. Returns the answering node's id too.
    pub async fn call_addr(
        &self,
        addr: &str,
        req: Request,
        body: Bytes,
    ) -> Result<(u64, Response, Bytes), TransportError> {
        if self.shared.stopped() {
            return Err(TransportError::Closed);
        }
        let after = self.shared.cfg.call_timeout;
        let span = tracing::debug_span!("transport_call_addr", %addr, kind = req.kind());
        let work = async {
            let conn = DataConn::open(&self.shared, addr, None).await?;
            if self.shared.is_blocked(conn.peer_id) {
                return Err(TransportError::Connect {
                    addr: addr.to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::HostUnreachable, "peer blocked by set_blocked"),
                });
            }
            let (resp, body) = conn.call(req, body).await?;
            Ok((conn.peer_id, resp, body))
        };
        tokio::time::timeout(after, work.instrument(span))
            .await
            .unwrap_or_else(|_| Err(TransportError::Timeout { to: addr.to_string(), after }))
    }

    /// Test hook: while set, everything to and from `peer` is dropped (Raft messages, requests,
    /// answers), as if the network between the two were cut; calls to it fail at once.
    pub fn set_blocked(&self, peer: u64, blocked: bool) {
        let mut set = self.shared.blocked.write().expect("blocked lock");
        if blocked {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }

    pub fn stats(&self) -> TransportStats {
        let book: HashMap<u64, String> = self.peers().into_iter().collect();
        let counters: Vec<(u64, Arc<Counters>)> =
            self.shared.counters.lock().expect("counters lock").iter().map(|(k, v)| (*k, v.clone())).collect();
        let mut ids: Vec<u64> = book.keys().copied().chain(counters.iter().map(|(k, _)| *k)).collect();
        ids.sort();
        ids.dedup();
        let peers = ids
            .into_iter()
            .map(|id| {
                let mut s = PeerStats { node_id: id, addr: book.get(&id).cloned(), ..Default::default() };
                if let Some((_, c)) = counters.iter().find(|(k, _)| *k == id) {
                    s.connected = c.open.load(Ordering::Relaxed) > 0;
                    s.bytes_sent = c.bytes_sent.load(Ordering::Relaxed);
                    s.bytes_received = c.bytes_received.load(Ordering::Relaxed);
                    s.messages_sent = c.messages_sent.load(Ordering::Relaxed);
                    s.messages_received = c.messages_received.load(Ordering::Relaxed);
                    s.raft_dropped = c.raft_dropped.load(Ordering::Relaxed);
                }
                s
            })
            .collect();
        TransportStats { peers, refused_handshakes: self.shared.refused.load(Ordering::Relaxed) }
    }

    /// Stops accepting, closes every connection and waits (up to 2 s) for their tasks to end.
    pub async fn shutdown(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.shared.stop.send_replace(true);
        self.peers.write().expect("peers lock").clear();
        let accept = self.accept.lock().expect("accept lock").take();
        if let Some(h) = accept {
            let _ = h.await;
        }
        let wait = async {
            loop {
                let done = self.shared.tasks_done.notified();
                if self.shared.tasks.load(Ordering::SeqCst) == 0 {
                    return;
                }
                done.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

/// Helpers for tests that must speak the protocol by hand (e.g. to send a malformed frame).
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// Connects to `addr` and completes the handshake as `cfg`'s node; returns the server's
    /// node id and the authenticated socket, ready for frames.
    pub async fn connect_raw(
        cfg: &TransportConfig,
        addr: &str,
        channel: Channel,
    ) -> Result<(u64, tokio::net::TcpStream), TransportError> {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| TransportError::Connect { addr: addr.to_string(), source: e })?;
        let keys = handshake::Keys { secret: &cfg.secret, cluster_id: &cfg.cluster_id, node_id: cfg.node_id };
        let id = handshake::client(&mut s, &keys, channel, None).await.map_err(|e| e.into_transport(addr))?;
        Ok((id, s))
    }

    /// One frame as it goes on the wire: prefix, postcard header, body.
    pub fn encode_frame(frame: &Frame, body: &[u8]) -> Result<Vec<u8>, TransportError> {
        let out = wire::Outgoing::new(frame, Bytes::copy_from_slice(body))?;
        let mut v = out.head;
        v.extend_from_slice(&out.body);
        Ok(v)
    }
}
