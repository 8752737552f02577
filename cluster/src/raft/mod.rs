//! The Raft driver: raft-rs (`raft` 0.7) over a durable log on local disk.
//!
//! PUBLIC API CONTRACT (other crates code against exactly this; internals are free):
//!
//! - [`StateMachine`]: what the group replicates. Pure: `apply` does no I/O.
//! - [`MetaGroup::open`]`(dir, opts, initial)`: creates `dir` if needed; loads the newest
//!   snapshot (else starts from `initial`), replays the durable log (entries + hard state)
//!   and applies every committed entry, then runs the driver. A group of one elects itself
//!   at once. A log or snapshot file from an unknown format version, or a corrupt one other
//!   than a torn tail, is a clear error, never silently truncated.
//! - [`MetaGroup::propose`]`(cmd)`: resolves with the state machine's output once the entry
//!   is durable (fsync) and applied.
//! - [`MetaGroup::read`]`(|state| ...)`: a read of the applied state as this node has it
//!   (on a follower it may lag the leader by a few entries).
//! - [`MetaGroup::read_barrier`]: waits until this node has applied every entry committed
//!   when it was called (ReadIndex through the leader; a group of one answers at once).
//!   A `read` after it is linearizable.
//! - Multi-node: [`MetaGroup::open_with`] takes a [`RaftNet`] (outgoing messages) and
//!   [`MetaGroup::inbox`] takes the incoming ones. A proposal on a follower travels to the
//!   leader and is sent again (same context, applied once) until applied here or until
//!   `propose_timeout`; [`MetaGroup::add_voter`] / [`MetaGroup::remove_node`] change the
//!   membership. `RaftOptions::join` opens a new node with no voters, waiting for a leader
//!   to add it (it then gets the leader's snapshot).
//! - [`MetaGroup::set_observer`]: called with the output of every entry applied on this node,
//!   whoever proposed it (each node frees the blocks a commit released on its own device).
//! - A snapshot is taken when the log since the last one passes `snapshot_log_bytes`;
//!   the log is then compacted. [`MetaGroup::snapshot_now`] forces one.
//! - [`MetaGroup::shutdown`] stops the driver after the in-flight proposals are answered.

mod driver;
mod durable;
mod log;
mod node;
mod sessions;
mod snapfile;
mod storage;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub trait StateMachine: Send + Sync + 'static {
    type Command: Serialize + DeserializeOwned + Send + 'static;
    type Output: Send + 'static;
    /// Deterministic: the same commands in the same order give the same state and outputs.
    fn apply(&mut self, cmd: Self::Command) -> Self::Output;
    /// The whole state as bytes (self-describing: magic, version, checksum).
    fn snapshot(&self) -> Vec<u8>;
    /// Inverse of `snapshot`; a clear error for an unknown version or a bad checksum.
    fn restore(data: &[u8]) -> Result<Self, String>
    where
        Self: Sized;
}

/// Where outgoing Raft messages go (the node-to-node transport). Must not block: it is
/// called from the driver thread.
pub trait RaftNet: Send + Sync + 'static {
    fn send(&self, msg: raft::eraftpb::Message);
}

/// Called with the output of every entry applied on this node (see [`MetaGroup::set_observer`]).
pub type Observer<O> = Box<dyn Fn(&O) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// This node's Raft id (1 for a single node).
    pub node_id: u64,
    /// Take a snapshot and compact once the log since the last snapshot passes this. Default 64 MiB.
    pub snapshot_log_bytes: u64,
    /// Raft tick. Default 100 ms (election after 10-20 ticks without a leader).
    pub tick: Duration,
    /// A new node of an existing cluster: start with no voters and wait for the leader to add
    /// this node (only matters for an empty folder). Default false: a new folder is a group of one.
    pub join: bool,
    /// How long a proposal or a linearizable read waits (for a leader, for its entry) before
    /// it fails with [`RaftError::Timeout`]. Default 10 s.
    pub propose_timeout: Duration,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            node_id: 1,
            snapshot_log_bytes: 64 << 20,
            tick: Duration::from_millis(100),
            join: false,
            propose_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RaftStatus {
    pub node_id: u64,
    /// "leader", "follower", "candidate" or "precandidate".
    pub role: String,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub log_bytes: u64,
    pub snapshots_taken: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft log i/o error path={path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt raft log path={path} offset={offset}: {reason}")]
    CorruptLog { path: String, offset: u64, reason: String },
    #[error("unsupported raft log format version found={found} supported={supported}")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("cannot restore snapshot: {0}")]
    Snapshot(String),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("cannot encode command: {0}")]
    Encode(String),
    #[error("cannot decode committed entry index={index}: {reason}")]
    Decode { index: u64, reason: String },
    #[error("meta group stopped")]
    Stopped,
    #[error("not the leader leader_id={leader_id}")]
    NotLeader { leader_id: u64 },
    #[error("{what} not done after {after:?} (no quorum reachable? leader_id={leader_id})")]
    Timeout { what: &'static str, after: Duration, leader_id: u64 },
    #[error("proposal applied (covered by a snapshot from the leader at index {index}) but its result is unknown here")]
    OutcomeUnknown { index: u64 },
}

pub struct MetaGroup<S: StateMachine> {
    inner: driver::Handle<S>,
}

/// Where incoming Raft messages go; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct RaftInbox {
    sink: Arc<dyn Fn(raft::eraftpb::Message) + Send + Sync>,
}

impl RaftInbox {
    /// Hands a message from a peer to the driver (dropped if the group has stopped).
    pub fn step(&self, msg: raft::eraftpb::Message) {
        (self.sink)(msg)
    }
}

impl<S: StateMachine> MetaGroup<S> {
    /// A group with no transport: a group of one.
    pub fn open(dir: &Path, opts: RaftOptions, initial: S) -> Result<Self, RaftError> {
        Self::open_with(dir, opts, initial, None)
    }

    /// A group whose outgoing messages go through `net`.
    pub fn open_with(
        dir: &Path,
        opts: RaftOptions,
        initial: S,
        net: Option<Arc<dyn RaftNet>>,
    ) -> Result<Self, RaftError> {
        Ok(MetaGroup { inner: driver::Handle::open(dir, opts, initial, net)? })
    }

    /// Where the transport delivers this group's incoming Raft messages.
    pub fn inbox(&self) -> RaftInbox {
        RaftInbox { sink: self.inner.raft_sink() }
    }

    /// Waits until this node has applied every entry committed before the call (ReadIndex).
    pub async fn read_barrier(&self) -> Result<(), RaftError> {
        // A leader alone applies every committed entry before answering: nothing to wait for.
        if self.inner.alone_leader() {
            return Ok(());
        }
        self.inner.read_barrier().await
    }

    /// Adds `id` as a voter (its address must be known to the transport first). Call it on
    /// the leader: a group that never took a snapshot takes one first, because the first
    /// voter is in no log entry (it bootstrapped alone) and a joiner learns it from a snapshot.
    pub async fn add_voter(&self, id: u64) -> Result<(), RaftError> {
        if self.status().snapshot_index == 0 {
            self.snapshot_now().await?;
        }
        self.conf_change(id, raft::eraftpb::ConfChangeType::AddNode).await
    }

    /// Removes `id` from the group.
    pub async fn remove_node(&self, id: u64) -> Result<(), RaftError> {
        self.conf_change(id, raft::eraftpb::ConfChangeType::RemoveNode).await
    }

    async fn conf_change(&self, id: u64, kind: raft::eraftpb::ConfChangeType) -> Result<(), RaftError> {
        let mut single = raft::eraftpb::ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = id;
        let mut cc = raft::eraftpb::ConfChangeV2::default();
        cc.mut_changes().push(single);
        self.inner.conf_change(cc).await
    }

    /// Sets the function called with every applied entry's output on this node (replaces
    /// the previous one). It runs on the driver thread under the state lock: keep it short.
    pub fn set_observer(&self, f: Observer<S::Output>) {
        self.inner.set_observer(f)
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        let st = self.status();
        st.leader_id == st.node_id
    }

    pub async fn propose(&self, cmd: S::Command) -> Result<S::Output, RaftError> {
        self.inner.propose(cmd).await
    }

    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        let guard = self.state().read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    pub fn state(&self) -> &Arc<RwLock<S>> {
        self.inner.state()
    }

    pub fn status(&self) -> RaftStatus {
        self.inner.status()
    }

    pub async fn snapshot_now(&self) -> Result<(), RaftError> {
        self.inner.snapshot_now().await
    }

    pub async fn shutdown(self) -> Result<(), RaftError> {
        self.inner.shutdown().await
    }
}
