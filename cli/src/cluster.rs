//! The cluster wiring of one node: the cluster token, the node-to-node transport (bound
//! before the meta group opens), the [`Handler`] that serves peers (Raft messages into the
//! group's inbox, block reads and writes from the local block store, `Stats`, `Join`), the
//! [`RaftNet`] over the transport, joining, the address book kept equal to `meta.nodes`, and
//! the node's own [`NodeInfo`] announced once its front ends listen.
//!
//! # The cluster token
//!
//! `<cluster id>.<secret hex>`: the first node of a cluster writes it to
//! `<data_dir>/cluster.token` (0600) at its first start; a joining node gets it from
//! `--token` / `cluster_token` / `cluster_token_file` and keeps it there too. The secret keys
//! the transport's handshake (HMAC-SHA256; it never crosses the wire).
//!
//! # Joining (`tidepool up --join ADDR`)
//!
//! 1. Before the data folder is touched, the joiner binds its transport and pings `ADDR`: a
//!    wrong token is refused by the handshake there and nothing is written.
//! 2. A fresh data folder takes the token's cluster id and a random node id (never 0 or 1).
//! 3. The meta group opens in join mode (no voters); its inbox is attached to the handler.
//! 4. `Join { node_id, addr }` to `ADDR`; a follower forwards it to the leader. The leader
//!    refuses an id recorded with another address, adds the peer to its address book,
//!    proposes `SetNode`, then `add_voter`, and answers `Joined { leader_id, peers }` with the
//!    node key in the body, sealed (AES-256-GCM) under HMAC-SHA256(secret, "tidepool node key
//!    wrap"): every node must seal and open S3 secrets with the same key.
//! 5. The joiner stores that key as its `node.key`, waits until it has caught up
//!    (`read_barrier`), then opens the filesystem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use bytes::Bytes;
use rand::RngCore;
use tidepool_cluster::meta::NodeInfo;
use tidepool_cluster::transport::ErrKind;
use tidepool_cluster::{
    Command, Handler, MetaGroup, MetaState, RaftInbox, RaftNet, Request, Response, Transport, TransportConfig,
    TransportError,
};
use tidepool_fs::{Fs, PeerError};

use crate::datadir::anyhow_free::Result;
use crate::nodekey::NodeKey;
use crate::settings::Settings;

pub const TOKEN_FILE: &str = "cluster.token";
/// Written once a joiner has the cluster's node key: it is a member (holds the seed it used).
pub const JOINED_FILE: &str = "joined";
const SECRET_BYTES: usize = 32;
const WRAP_LABEL: &[u8] = b"tidepool node key wrap";

/// `<cluster id>.<secret hex>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken {
    pub cluster_id: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterToken({}.<secret>)", self.cluster_id)
    }
}

impl std::fmt::Display for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.", self.cluster_id)?;
        self.secret.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl ClusterToken {
    /// A new secret for `cluster_id`.
    pub fn generate(cluster_id: &str) -> ClusterToken {
        let mut secret = vec![0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        ClusterToken { cluster_id: cluster_id.to_string(), secret }
    }

    /// Parses `<cluster id>.<secret hex>`; the error never repeats the secret.
    pub fn parse(s: &str) -> std::result::Result<ClusterToken, String> {
        let (id, hex) = s.trim().split_once('.').ok_or("a cluster token is <cluster id>.<secret hex>")?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return Err("the cluster id (before the dot) must be 1-64 letters, digits or '-'".into());
        }
        if !hex.len().is_multiple_of(2) || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err("the secret (after the dot) must be hex digits".into());
        }
        let secret: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or(0)).collect();
        if secret.len() < tidepool_cluster::transport::MIN_SECRET_BYTES {
            return Err(format!(
                "the secret is too short: at least {} bytes ({} hex digits)",
                tidepool_cluster::transport::MIN_SECRET_BYTES,
                2 * tidepool_cluster::transport::MIN_SECRET_BYTES
            ));
        }
        Ok(ClusterToken { cluster_id: id.to_string(), secret })
    }

    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(TOKEN_FILE)
    }

    /// `<data_dir>/cluster.token`, if there is one.
    pub fn read(data_dir: &Path) -> Result<Option<ClusterToken>> {
        let p = Self::path(data_dir);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(Self::parse(&t).map_err(|e| format!("{} is damaged: {e}", p.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", p.display()).into()),
        }
    }

    pub fn write(&self, data_dir: &Path) -> Result<()> {
        crate::nodekey::write_private(&Self::path(data_dir), format!("{self}\n").as_bytes())?;
        Ok(())
    }

    fn wrap_cipher(&self) -> Aes256Gcm {
        use hmac::{KeyInit as _, Mac};
        // Invariant: HMAC takes a key of any length.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(WRAP_LABEL);
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        Aes256Gcm::new(&key.into())
    }

    /// `nonce || AES-256-GCM(node key)` under a key derived from the secret; the cluster id
    /// is the associated data.
    pub fn wrap_key(&self, key: &[u8; 32]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        // Invariant: AES-GCM encryption fails only for messages over 64 GiB.
        let ct = self
            .wrap_cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: key, aad: self.cluster_id.as_bytes() })
            .expect("AES-GCM seals 32 bytes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    pub fn unwrap_key(&self, sealed: &[u8]) -> std::result::Result<[u8; 32], String> {
        if sealed.len() < 12 {
            return Err("sealed node key too short".into());
        }
        let (nonce, ct) = sealed.split_at(12);
        let pt = self
            .wrap_cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: self.cluster_id.as_bytes() })
            .map_err(|_| "the node key from the leader does not open under this cluster secret".to_string())?;
        pt.as_slice().try_into().map_err(|_| format!("node key of {} bytes, expected 32", pt.len()))
    }
}

/// What the node learned before its data folder was opened.
pub struct Prepared {
    pub cluster: Arc<Cluster>,
    /// The identity a fresh data folder takes (`None`: node 1 of a new cluster).
    pub identity: Option<(u64, String)>,
    /// This start joins a cluster (`--join`) and the folder is new or not a member yet.
    pub join: Option<String>,
}

/// One node's cluster side. Held by the node; the handler and the address-book task hold
/// the filesystem weakly, so shutting the filesystem down is never held up by them.
pub struct Cluster {
    pub transport: Arc<Transport>,
    pub token: ClusterToken,
    pub node_id: u64,
    pub advertise: String,
    handler: Arc<NodeHandler>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn read_token_setting(s: &Settings) -> Result<Option<ClusterToken>> {
    if let Some(t) = &s.cluster_token {
        return Ok(Some(ClusterToken::parse(t).map_err(|e| format!("cluster_token: {e}"))?));
    }
    if let Some(p) = &s.cluster_token_file {
        let t =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read cluster_token_file={}: {e}", p.display()))?;
        return Ok(Some(ClusterToken::parse(&t).map_err(|e| format!("cluster_token_file={}: {e}", p.display()))?));
    }
    Ok(None)
}

/// A random node id for a joining node: never 0 (raft-rs reserves it) nor 1 (the first node);
/// below 2^32 so that people can type it (`node remove ID`). A clash is refused at join.
fn random_node_id() -> u64 {
    loop {
        let id = u64::from(rand::rngs::OsRng.next_u32());
        if id > 1 {
            return id;
        }
    }
}

/// Decide who this node is, bind the transport and, when joining with a new folder, check
/// the token against the seed (nothing is written before that succeeds).
pub async fn prepare(s: &Settings) -> Result<Prepared> {
    let sb_path = s.data_dir.join(crate::datadir::SUPERBLOCK);
    let existing = if sb_path.exists() { Some(crate::datadir::read_superblock(&sb_path)?) } else { None };
    let given = read_token_setting(s)?;
    let kept = if existing.is_some() { ClusterToken::read(&s.data_dir)? } else { None };
    if let (Some(g), Some(k)) = (&given, &kept)
        && g != k
    {
        return Err(format!(
            "the cluster token given differs from the one this data folder keeps ({}); a node stays in the \
             cluster it joined (use a new data folder to join another)",
            ClusterToken::path(&s.data_dir).display()
        )
        .into());
    }
    let (node_id, token, identity) = match &existing {
        Some(sb) => {
            let token = match given.or(kept) {
                Some(t) => t,
                None if s.join.is_some() => {
                    return Err("--join needs the cluster token: --token, cluster_token or cluster_token_file \
                                (`tidepool cluster token` on a cluster node prints it)"
                        .into());
                }
                // A folder from before clusters (or whose token file was lost): a new secret.
                None => ClusterToken::generate(&sb.cluster_id),
            };
            if token.cluster_id != sb.cluster_id {
                return Err(format!(
                    "this data folder belongs to cluster {}, the token to cluster {}; use a new data folder to join",
                    sb.cluster_id, token.cluster_id
                )
                .into());
            }
            (sb.node_id, token, None)
        }
        None => match (&s.join, given) {
            (Some(_), Some(t)) => {
                let id = random_node_id();
                (id, t.clone(), Some((id, t.cluster_id.clone())))
            }
            (Some(_), None) => {
                return Err("--join needs the cluster token: --token, cluster_token or cluster_token_file \
                            (`tidepool cluster token` on a cluster node prints it)"
                    .into());
            }
            (None, given) => {
                let cid = given.as_ref().map(|t| t.cluster_id.clone()).unwrap_or_else(crate::datadir::new_cluster_id);
                let t = given.unwrap_or_else(|| ClusterToken::generate(&cid));
                (1, t, Some((1, cid)))
            }
        },
    };
    let handler = Arc::new(NodeHandler::default());
    let mut cfg = TransportConfig {
        node_id,
        cluster_id: token.cluster_id.clone(),
        listen: s.cluster_listen().to_string(),
        secret: token.secret.clone(),
        ..Default::default()
    };
    let transport = match Transport::bind(cfg.clone(), handler.clone()).await {
        Ok(t) => t,
        Err(TransportError::Connect { source, .. })
            if s.cluster_listen.is_none() && s.join.is_none() && existing_alone(&s.data_dir) =>
        {
            // The default port held by someone else (another node on this machine): any free
            // port does; `up` prints the one taken, which is the one to --join.
            tracing::info!(
                error = %source,
                "cluster_listen={} is taken; using a free port (set cluster_listen to choose)",
                crate::settings::DEFAULT_CLUSTER_LISTEN
            );
            cfg.listen = "127.0.0.1:0".into();
            Transport::bind(cfg, handler.clone()).await?
        }
        Err(e) => return Err(format!("cannot listen on cluster_listen={}: {e}", s.cluster_listen()).into()),
    };
    let advertise = match &s.cluster_advertise {
        Some(a) => a.clone(),
        None => transport.local_addr().to_string(),
    };
    let join = match &s.join {
        Some(seed) if existing.is_none() => {
            // The handshake alone checks the token: a Ping is answered by the transport.
            if let Err(e) = transport.call_addr(seed, Request::Ping, Bytes::new()).await {
                transport.shutdown().await;
                return Err(join_error(seed, &e).into());
            }
            Some(seed.clone())
        }
        Some(seed) => Some(seed.clone()),
        None => None,
    };
    let cluster =
        Arc::new(Cluster { transport, token, node_id, advertise, handler, tasks: std::sync::Mutex::new(Vec::new()) });
    cluster.handler.cluster.set(Arc::downgrade(&cluster)).ok();
    Ok(Prepared { cluster, identity, join })
}

/// Whether the folder never joined a cluster through `--join` (new, or the node that started
/// its cluster). Only such a node may fall back to a free transport port when `cluster_listen`
/// is unset and the default is taken; if others had joined it, it records its new address
/// (`SetNode`) at start and their address books follow.
fn existing_alone(data_dir: &Path) -> bool {
    !data_dir.join(crate::datadir::SUPERBLOCK).exists() || !data_dir.join(JOINED_FILE).exists()
}

fn join_error(seed: &str, e: &TransportError) -> String {
    match e {
        TransportError::Refused { reason, .. } => format!(
            "the cluster node at {seed} refused this node: {reason} (check the token: `tidepool cluster token` on \
             a cluster node prints it)"
        ),
        e => format!("cannot reach the cluster node at {seed}: {e}"),
    }
}

impl Cluster {
    /// The data folder is open: check it belongs to the token's cluster, keep the token.
    pub fn folder_opened(&self, data: &crate::datadir::DataDir) -> Result<()> {
        if data.superblock.cluster_id != self.token.cluster_id || data.superblock.node_id != self.node_id {
            return Err(format!(
                "data folder {} is node {} of cluster {}, not node {} of cluster {}",
                data.path.display(),
                data.superblock.node_id,
                data.superblock.cluster_id,
                self.node_id,
                self.token.cluster_id
            )
            .into());
        }
        if ClusterToken::read(&data.path)?.is_none() {
            self.token.write(&data.path)?;
        }
        Ok(())
    }

    /// The [`RaftNet`] for the meta group; messages over `chunk` bytes go in pieces.
    pub fn raft_net(&self, chunk: usize) -> Arc<dyn RaftNet> {
        Arc::new(TransportNet { transport: self.transport.clone(), chunk, rt: tokio::runtime::Handle::current() })
    }

    pub fn attach_inbox(&self, inbox: RaftInbox) {
        self.handler.inbox.set(inbox).ok();
    }

    /// Join through `seed` (see the module doc). Returns the cluster's node key.
    pub async fn join(&self, seed: &str, data_dir: &Path) -> Result<NodeKey> {
        let req = Request::Join { node_id: self.node_id, addr: self.advertise.clone() };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (resp, body) = loop {
            match self.transport.call_addr(seed, req.clone(), Bytes::new()).await {
                Ok((_, Response::Err { kind: ErrKind::Unavailable | ErrKind::NotLeader { .. }, message }, _))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(%seed, %message, "join: not yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok((_, resp, body)) => break (resp, body),
                Err(e) => return Err(join_error(seed, &e).into()),
            }
        };
        let (leader_id, peers) = match resp {
            Response::Joined { leader_id, peers } => (leader_id, peers),
            Response::Err { message, .. } => return Err(format!("the cluster refused this node: {message}").into()),
            other => return Err(format!("unexpected answer to join: {other:?}").into()),
        };
        for (id, addr) in peers {
            if id != self.node_id {
                self.transport.set_peer(id, addr);
            }
        }
        let key = self.token.unwrap_key(&body)?;
        let key = NodeKey::install(data_dir, key)?;
        crate::datadir::write_atomic(&data_dir.join(JOINED_FILE), format!("{seed}\n").as_bytes())?;
        tracing::info!(node_id = self.node_id, leader_id, %seed, "joined the cluster");
        Ok(key)
    }

    /// The filesystem is open: serve block requests and joins, keep the address book.
    pub fn serve(self: &Arc<Self>, fs: &Arc<Fs>, node_key: Arc<NodeKey>) {
        fs.set_peers(TransportPeers::new(self, fs));
        self.handler.fs.set(Arc::downgrade(fs)).ok();
        self.handler.node_key.set(node_key).ok();
        let me = self.clone();
        let weak = Arc::downgrade(fs);
        let task = tokio::spawn(async move {
            loop {
                let Some(fs) = weak.upgrade() else { return };
                me.sync_peers(fs.meta());
                drop(fs);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        self.tasks.lock().expect("tasks lock").push(task);
        // The leader gives dirty blocks short of copies (a node lost) their copies again.
        self.tasks.lock().expect("tasks lock").push(fs.spawn_repair(Duration::from_secs(15)));
    }

    /// Make the transport's address book equal to `meta.nodes` (self excepted). A peer the
    /// book has and `meta.nodes` lacks is removed only once this node's own record is there
    /// (a joiner's state may still be catching up) and it is no voter.
    pub fn sync_peers(&self, meta: &MetaGroup<MetaState>) {
        let nodes: BTreeMap<u64, String> = meta.read(|s| s.nodes.iter().map(|(k, v)| (*k, v.addr.clone())).collect());
        for (id, addr) in &nodes {
            if *id != self.node_id && !addr.is_empty() {
                self.transport.set_peer(*id, addr.clone());
            }
        }
        if nodes.contains_key(&self.node_id) {
            let voters = meta.status().voters;
            for (id, _) in self.transport.peers() {
                if !nodes.contains_key(&id) && !voters.contains(&id) {
                    tracing::info!(node_id = id, "peer left the cluster; removed from the address book");
                    self.transport.remove_peer(id);
                }
            }
        }
    }

    /// Record this node's addresses in the meta group (`SetNode`), retried in the background
    /// until it is committed (a joiner's first proposals may wait for a leader).
    pub fn announce(self: &Arc<Self>, fs: &Arc<Fs>, s3: String, nfs: String, http: String) {
        let weak = Arc::downgrade(fs);
        let me = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Some(fs) = weak.upgrade() else { return };
                let meta = fs.meta();
                let old = meta.read(|s| s.nodes.get(&me.node_id).cloned());
                let info = NodeInfo {
                    addr: me.advertise.clone(),
                    s3: s3.clone(),
                    nfs: nfs.clone(),
                    http: http.clone(),
                    joined: old.as_ref().map_or_else(now_nanos, |o| o.joined),
                };
                if old.as_ref() == Some(&info) {
                    return;
                }
                match meta.propose(Command::SetNode { id: me.node_id, info }).await {
                    Ok(_) => {
                        tracing::info!(node_id = me.node_id, "recorded this node's addresses in the meta group");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot record this node's addresses yet; retrying"),
                }
                drop(fs);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        self.tasks.lock().expect("tasks lock").push(task);
    }

    /// Every member: addresses, role, voter, reachable, device capacity and usage (peers are
    /// asked with `Stats`, 2 s each, in parallel).
    pub async fn nodes_json(&self, fs: &Fs) -> serde_json::Value {
        let st = fs.meta().status();
        let nodes = fs.meta().read(|s| s.nodes.clone());
        let mut ids: Vec<u64> = nodes.keys().copied().chain(st.voters.iter().copied()).collect();
        ids.push(self.node_id);
        ids.sort();
        ids.dedup();
        let asks = ids.iter().map(|&id| async move {
            if id == self.node_id {
                return Some(local_stats(fs));
            }
            let call = self.transport.call(id, Request::Stats, Bytes::new());
            match tokio::time::timeout(Duration::from_secs(2), call).await {
                Ok(Ok((Response::Stats { data }, _))) => serde_json::from_slice(&data).ok(),
                _ => None,
            }
        });
        let stats = futures_util::future::join_all(asks).await;
        let list: Vec<serde_json::Value> = ids
            .iter()
            .zip(stats)
            .map(|(&id, stats)| {
                let info = nodes.get(&id).cloned().unwrap_or_default();
                serde_json::json!({
                    "id": id,
                    "addr": info.addr, "s3": info.s3, "nfs": info.nfs, "http": info.http,
                    "self": id == self.node_id,
                    "leader": id == st.leader_id,
                    "voter": st.voters.contains(&id),
                    "reachable": stats.is_some(),
                    "stats": stats,
                })
            })
            .collect();
        serde_json::json!({
            "cluster_id": self.token.cluster_id,
            "node_id": self.node_id,
            "leader_id": st.leader_id,
            "term": st.term,
            "nodes": list,
        })
    }

    /// The leader's http address, if known (for "run this on the leader" answers).
    pub fn leader_http(&self, fs: &Fs) -> (u64, Option<String>) {
        let leader = fs.meta().status().leader_id;
        (leader, fs.meta().read(|s| s.nodes.get(&leader).map(|n| n.http.clone())).filter(|h| !h.is_empty()))
    }

    pub async fn shutdown(&self) {
        let tasks: Vec<_> = self.tasks.lock().expect("tasks lock").drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        self.transport.shutdown().await;
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// This node's device numbers, as `Stats` answers them.
fn local_stats(fs: &Fs) -> serde_json::Value {
    let st = fs.store().stats();
    serde_json::json!({
        "capacity_bytes": st.capacity_bytes, "used_bytes": st.used_bytes,
        "live_bytes": st.live_bytes, "blocks": st.blocks,
    })
}

/// [`tidepool_fs::Peers`] over the transport: the members that hold blocks are the voters
/// recorded in `meta.nodes` (this node always counts once it is a voter).
pub struct TransportPeers {
    transport: Arc<Transport>,
    node_id: u64,
    fs: Weak<Fs>,
}

impl TransportPeers {
    pub fn new(cluster: &Cluster, fs: &Arc<Fs>) -> Arc<TransportPeers> {
        Arc::new(TransportPeers {
            transport: cluster.transport.clone(),
            node_id: cluster.node_id,
            fs: Arc::downgrade(fs),
        })
    }

    async fn call(&self, node: u64, req: Request, body: Bytes) -> std::result::Result<(Response, Bytes), PeerError> {
        match self.transport.call(node, req, body).await {
            Ok((Response::Err { kind, message }, _)) => Err(match kind {
                ErrKind::NotFound => PeerError::NotFound,
                ErrKind::NoSpace => PeerError::NoSpace,
                ErrKind::Unavailable | ErrKind::NotLeader { .. } => PeerError::Unavailable(message),
                ErrKind::Invalid | ErrKind::Io => PeerError::Other(format!("node {node}: {message}")),
            }),
            Ok(answer) => Ok(answer),
            Err(e) => Err(PeerError::Unavailable(format!("node {node}: {e}"))),
        }
    }
}

fn unexpected(node: u64, r: &Response) -> PeerError {
    PeerError::Other(format!("node {node} answered {r:?}"))
}

#[async_trait::async_trait]
impl tidepool_fs::Peers for TransportPeers {
    fn local_id(&self) -> u64 {
        self.node_id
    }

    fn nodes(&self) -> Vec<u64> {
        let Some(fs) = self.fs.upgrade() else { return vec![self.node_id] };
        let voters = fs.meta().status().voters;
        let known =
            fs.meta().read(|s| voters.iter().copied().filter(|id| s.nodes.contains_key(id)).collect::<Vec<_>>());
        let mut out = known;
        if voters.contains(&self.node_id) && !out.contains(&self.node_id) {
            out.push(self.node_id);
        }
        if out.is_empty() {
            out.push(self.node_id);
        }
        out
    }

    async fn put_block(&self, node: u64, id: u64, data: Bytes) -> std::result::Result<(), PeerError> {
        match self.call(node, Request::PutBlock { id }, data).await? {
            (Response::Ok, _) => Ok(()),
            (r, _) => Err(unexpected(node, &r)),
        }
    }

    async fn get_block(&self, node: u64, id: u64, offset: u32, len: u32) -> std::result::Result<Vec<u8>, PeerError> {
        match self.call(node, Request::GetBlock { id, offset, len }, Bytes::new()).await? {
            (Response::Block, body) if body.len() == len as usize => Ok(body.to_vec()),
            (Response::Block, body) => {
                Err(PeerError::Other(format!("node {node} sent {} bytes of block {id}, asked {len}", body.len())))
            }
            (r, _) => Err(unexpected(node, &r)),
        }
    }

    async fn delete_blocks(&self, node: u64, ids: &[u64]) -> std::result::Result<(), PeerError> {
        match self.call(node, Request::DeleteBlocks { ids: ids.to_vec() }, Bytes::new()).await? {
            (Response::Ok, _) => Ok(()),
            (r, _) => Err(unexpected(node, &r)),
        }
    }

    async fn has_blocks(&self, node: u64, ids: &[u64]) -> std::result::Result<Vec<bool>, PeerError> {
        match self.call(node, Request::HasBlocks { ids: ids.to_vec() }, Bytes::new()).await? {
            (Response::Has { present }, _) => Ok(present),
            (r, _) => Err(unexpected(node, &r)),
        }
    }
}

struct TransportNet {
    transport: Arc<Transport>,
    /// Messages bigger than this go in pieces (`raftsnap`).
    chunk: usize,
    /// The driver thread is no tokio thread: piece sending is spawned here.
    rt: tokio::runtime::Handle,
}

impl RaftNet for TransportNet {
    fn send(&self, msg: raft::eraftpb::Message) {
        use protobuf::Message as _;
        if msg.get_msg_type() != raft::eraftpb::MessageType::MsgSnapshot || (msg.compute_size() as usize) <= self.chunk
        {
            self.transport.send_raft(msg.to, msg);
            return;
        }
        let (to, transport, chunk) = (msg.to, self.transport.clone(), self.chunk);
        let bytes = match msg.write_to_bytes() {
            Ok(b) => b,
            Err(e) => return tracing::error!(to, error = %e, "cannot encode a raft snapshot message"),
        };
        self.rt.spawn(async move {
            let pieces = crate::raftsnap::split(&bytes, chunk);
            let n = pieces.len();
            for (p, body) in pieces {
                let data = postcard::to_allocvec(&p).expect("a piece header encodes");
                let req = Request::Other { kind: crate::raftsnap::KIND.into(), data };
                match transport.call(to, req, Bytes::copy_from_slice(body)).await {
                    Ok((Response::Ok, _)) => {}
                    other => {
                        let why = match other {
                            Ok((r, _)) => format!("{r:?}"),
                            Err(e) => e.to_string(),
                        };
                        // Raft sends the snapshot again after the follower's next rejection.
                        return tracing::warn!(to, piece = p.index, pieces = n, error = %why, "raft snapshot piece not taken");
                    }
                }
            }
            tracing::info!(to, bytes = bytes.len(), pieces = n, "raft snapshot sent in pieces");
        });
    }
}

/// Serves this node's peers. Parts are set as they come to exist: the inbox once the meta
/// group is open, the filesystem once it is; until then requests answer `Unavailable`.
#[derive(Default)]
struct NodeHandler {
    /// Raft messages arriving in pieces (`raftsnap`).
    pieces: std::sync::Mutex<crate::raftsnap::Reassembler>,
    cluster: OnceLock<Weak<Cluster>>,
    inbox: OnceLock<RaftInbox>,
    fs: OnceLock<Weak<Fs>>,
    node_key: OnceLock<Arc<NodeKey>>,
    /// Joins handled one at a time on the leader (one configuration change at a time).
    join_lock: tokio::sync::Mutex<()>,
}

fn err(kind: ErrKind, message: impl Into<String>) -> (Response, Bytes) {
    (Response::Err { kind, message: message.into() }, Bytes::new())
}

fn store_err(e: tidepool_spdk::StoreError) -> (Response, Bytes) {
    use tidepool_spdk::StoreError as E;
    match e {
        E::NotFound(_) => err(ErrKind::NotFound, e.to_string()),
        E::NoSpace { .. } => err(ErrKind::NoSpace, e.to_string()),
        E::TooLarge { .. } | E::Empty(_) | E::Range { .. } => err(ErrKind::Invalid, e.to_string()),
        e => err(ErrKind::Io, e.to_string()),
    }
}

#[async_trait::async_trait]
impl Handler for NodeHandler {
    fn raft(&self, _from: u64, msg: raft::eraftpb::Message) {
        if let Some(inbox) = self.inbox.get() {
            inbox.step(msg);
        }
    }

    async fn request(&self, from: u64, req: Request, body: Bytes) -> (Response, Bytes) {
        // Before the filesystem check: a joiner gets its snapshot before it opens one.
        if let Request::Other { kind, data } = &req
            && kind == crate::raftsnap::KIND
        {
            return self.raft_piece(from, data, &body);
        }
        let Some(fs) = self.fs.get().and_then(Weak::upgrade) else {
            return err(ErrKind::Unavailable, "this node is starting or stopping");
        };
        match req {
            Request::PutBlock { id } => match fs.store().put(id, &body).await {
                Ok(()) | Err(tidepool_spdk::StoreError::Exists(_)) => match fs.store().flush().await {
                    Ok(()) => (Response::Ok, Bytes::new()),
                    Err(e) => store_err(e),
                },
                Err(e) => store_err(e),
            },
            Request::GetBlock { id, offset, len } => match fs.store().get(id, offset, len).await {
                Ok(data) => (Response::Block, Bytes::from(data)),
                Err(e) => store_err(e),
            },
            Request::DeleteBlocks { ids } => {
                for id in ids {
                    match fs.store().delete(id).await {
                        Ok(()) | Err(tidepool_spdk::StoreError::NotFound(_)) => {}
                        Err(e) => return store_err(e),
                    }
                }
                (Response::Ok, Bytes::new())
            }
            Request::HasBlocks { ids } => {
                (Response::Has { present: ids.iter().map(|id| fs.store().contains(*id)).collect() }, Bytes::new())
            }
            Request::Stats => (Response::Stats { data: local_stats(&fs).to_string().into_bytes() }, Bytes::new()),
            Request::Join { node_id, addr } => self.join(&fs, from, node_id, addr).await,
            Request::Ping => (Response::Pong { node_id: fs.meta().status().node_id }, Bytes::new()),
            Request::Other { kind, .. } => err(ErrKind::Invalid, format!("unknown request kind={kind}")),
        }
    }
}

impl NodeHandler {
    /// One piece of a Raft message too big for a frame; the message is stepped once whole.
    fn raft_piece(&self, from: u64, data: &[u8], body: &[u8]) -> (Response, Bytes) {
        use protobuf::Message as _;
        let Some(inbox) = self.inbox.get() else { return err(ErrKind::Unavailable, "the meta group is not open yet") };
        let piece: crate::raftsnap::Piece = match postcard::from_bytes(data) {
            Ok(p) => p,
            Err(e) => return err(ErrKind::Invalid, format!("bad raft piece header: {e}")),
        };
        let whole = self.pieces.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(from, piece, body);
        match whole {
            Ok(None) => (Response::Ok, Bytes::new()),
            Ok(Some(bytes)) => match raft::eraftpb::Message::parse_from_bytes(&bytes) {
                Ok(msg) => {
                    tracing::info!(from, bytes = bytes.len(), "raft message put back together from pieces");
                    inbox.step(msg);
                    (Response::Ok, Bytes::new())
                }
                Err(e) => err(ErrKind::Invalid, format!("raft message from pieces does not decode: {e}")),
            },
            Err(e) => err(ErrKind::Invalid, e),
        }
    }

    async fn join(&self, fs: &Fs, from: u64, node_id: u64, addr: String) -> (Response, Bytes) {
        let Some(cluster) = self.cluster.get().and_then(Weak::upgrade) else {
            return err(ErrKind::Unavailable, "this node is stopping");
        };
        let meta = fs.meta();
        let st = meta.status();
        if st.leader_id == 0 {
            return err(ErrKind::Unavailable, "no leader yet; retry");
        }
        if st.leader_id != st.node_id {
            // Forward to the leader (once: the leader answers, it does not forward again).
            if from == st.leader_id {
                return err(ErrKind::NotLeader { leader_id: st.leader_id }, "leadership moved; retry");
            }
            return match cluster.transport.call(st.leader_id, Request::Join { node_id, addr }, Bytes::new()).await {
                Ok(answer) => answer,
                Err(e) => err(ErrKind::Unavailable, format!("cannot reach the leader node {}: {e}", st.leader_id)),
            };
        }
        let _one = self.join_lock.lock().await;
        if node_id <= 1 || node_id == st.node_id {
            return err(
                ErrKind::Invalid,
                format!("node id {node_id} cannot join (0 and 1 are reserved, or it is the leader's)"),
            );
        }
        if addr.parse::<std::net::SocketAddr>().is_err() {
            return err(ErrKind::Invalid, format!("not a transport address addr={addr}"));
        }
        let nodes = meta.read(|s| s.nodes.clone());
        if let Some(n) = nodes.get(&node_id)
            && !n.addr.is_empty()
            && n.addr != addr
        {
            return err(ErrKind::Invalid, format!("node id {node_id} is already used by {}", n.addr));
        }
        if let Some((other, _)) =
            nodes.iter().find(|(id, n)| **id != node_id && n.addr == addr && st.voters.contains(id))
        {
            return err(
                ErrKind::Invalid,
                format!("address {addr} is node {other}'s; remove it first (`tidepool node remove {other}`)"),
            );
        }
        let Some(node_key) = self.node_key.get() else {
            return err(ErrKind::Unavailable, "this node is starting");
        };
        cluster.transport.set_peer(node_id, addr.clone());
        if !nodes.contains_key(&node_id) {
            let info = NodeInfo { addr: addr.clone(), joined: now_nanos(), ..NodeInfo::default() };
            if let Err(e) = meta.propose(Command::SetNode { id: node_id, info }).await {
                return err(ErrKind::Unavailable, format!("cannot record the new node: {e}"));
            }
        }
        if !st.voters.contains(&node_id)
            && let Err(e) = meta.add_voter(node_id).await
        {
            return err(ErrKind::Unavailable, format!("cannot add node {node_id} as a voter: {e}"));
        }
        tracing::info!(node_id, %addr, "node joined the cluster");
        let mut peers: Vec<(u64, String)> = meta.read(|s| {
            s.nodes
                .iter()
                .filter(|(id, n)| **id != node_id && !n.addr.is_empty())
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        });
        if !peers.iter().any(|(id, _)| *id == st.node_id) {
            peers.push((st.node_id, cluster.advertise.clone()));
        }
        (Response::Joined { leader_id: st.node_id, peers }, Bytes::from(cluster.token.wrap_key(node_key.bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_key_wrap() {
        let t = ClusterToken::generate("0123abcd");
        let s = t.to_string();
        assert_eq!(ClusterToken::parse(&s).unwrap(), t);
        assert_eq!(ClusterToken::parse(&format!("  {s}\n")).unwrap(), t);
        assert!(ClusterToken::parse("abc").unwrap_err().contains("<cluster id>.<secret hex>"));
        assert!(ClusterToken::parse("abc.0011").unwrap_err().contains("too short"));
        assert!(ClusterToken::parse("a b.00112233445566778899aabbccddeeff").is_err());
        let key = [9u8; 32];
        let w = t.wrap_key(&key);
        assert!(!w.windows(32).any(|x| x == key), "not in the clear");
        assert_eq!(t.unwrap_key(&w).unwrap(), key);
        let other = ClusterToken::generate("0123abcd");
        assert!(other.unwrap_key(&w).is_err(), "another secret");
        let renamed = ClusterToken { cluster_id: "other".into(), secret: t.secret.clone() };
        assert!(renamed.unwrap_key(&w).is_err(), "bound to the cluster id");
        let dir = tempfile::tempdir().unwrap();
        assert!(ClusterToken::read(dir.path()).unwrap().is_none());
        t.write(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ClusterToken::path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ClusterToken::read(dir.path()).unwrap(), Some(t));
    }
}
