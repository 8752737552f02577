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
//! - [`MetaGroup::read`]`(|state| ...)`: a read of the applied state (linearizable on the
//!   leader of a group of one; ReadIndex comes with multi-node).
//! - A snapshot is taken when the log since the last one passes `snapshot_log_bytes`;
//!   the log is then compacted. [`MetaGroup::snapshot_now`] forces one.
//! - [`MetaGroup::shutdown`] stops the driver after the in-flight proposals are answered.

mod driver;
mod durable;
mod log;
mod node;
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

#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// This node's Raft id (1 for a single node).
    pub node_id: u64,
    /// Take a snapshot and compact once the log since the last snapshot passes this. Default 64 MiB.
    pub snapshot_log_bytes: u64,
    /// Raft tick. Default 100 ms.
    pub tick: Duration,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions { node_id: 1, snapshot_log_bytes: 64 << 20, tick: Duration::from_millis(100) }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RaftStatus {
    pub node_id: u64,
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
}

pub struct MetaGroup<S: StateMachine> {
    inner: driver::Handle<S>,
}

impl<S: StateMachine> MetaGroup<S> {
    pub fn open(dir: &Path, opts: RaftOptions, initial: S) -> Result<Self, RaftError> {
        Ok(MetaGroup { inner: driver::Handle::open(dir, opts, initial)? })
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
