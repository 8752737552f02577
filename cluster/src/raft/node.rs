//! One Raft node's moving parts, owned by the driver thread: the raft-rs `RawNode`, the log
//! file, the state machine and the proposals waiting for their entries to be applied.
//!
//! [`Node::on_ready`] handles one `Ready` in raft-rs's documented order: send messages,
//! install a snapshot, persist entries and hard state (one fsync), apply committed entries,
//! send persisted messages, `advance`, handle the `LightReady`, `advance_apply`.
//!
//! Transport: [`Node::send`] is the one place outgoing Raft messages leave. A group of one
//! has no peers, so it has nothing to send; multi-node plugs a transport in there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{RawNode, StateRole, Storage};
use tokio::sync::oneshot;

use super::log::{LogFile, encode_entry, encode_hard_state};
use super::snapfile::{self, SnapshotFile};
use super::storage::MemLog;
use super::{RaftError, RaftOptions, RaftStatus, StateMachine};

/// Where an answer goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, RaftError>>;

/// A computed answer and where it goes.
type Answer<O> = (Reply<O>, Result<O, RaftError>);

/// A proposal waiting for the entry at its index to be applied.
struct Pending<O> {
    /// The entry context it was proposed with; another context at that index means the
    /// proposal was overwritten by a new leader.
    context: [u8; 16],
    reply: Reply<O>,
}

pub(crate) struct Node<S: StateMachine> {
    pub(crate) raw: RawNode<MemLog>,
    dir: PathBuf,
    opts: RaftOptions,
    log: LogFile,
    state: Arc<RwLock<S>>,
    status: Arc<Mutex<RaftStatus>>,
    /// Keyed by the log index the proposal was appended at.
    pending: BTreeMap<u64, Pending<S::Output>>,
    /// Tells this incarnation's proposal contexts apart from earlier ones.
    nonce: u64,
    next_seq: u64,
    /// Highest log index applied to `state`.
    applied: u64,
    /// Commit index learned from a `LightReady`, not yet written to the log.
    hs_dirty: bool,
    log_bytes_since_snapshot: u64,
    snapshots_taken: u64,
    /// Answers held until the status reflects the entries they answer for.
    answers: Vec<Answer<S::Output>>,
}

impl<S: StateMachine> Node<S> {
    /// `applied` is the index `state` already reflects (the snapshot's).
    pub(crate) fn new(
        raw: RawNode<MemLog>,
        dir: PathBuf,
        opts: RaftOptions,
        log: LogFile,
        state: Arc<RwLock<S>>,
        applied: u64,
    ) -> Node<S> {
        let status = Arc::new(Mutex::new(RaftStatus { node_id: opts.node_id, ..Default::default() }));
        Node {
            raw,
            dir,
            opts,
            log,
            state,
            status,
            pending: BTreeMap::new(),
            nonce: incarnation_nonce(),
            next_seq: 0,
            applied,
            hs_dirty: false,
            log_bytes_since_snapshot: 0,
            snapshots_taken: 0,
            answers: Vec::new(),
        }
    }

    pub(crate) fn status_handle(&self) -> Arc<Mutex<RaftStatus>> {
        Arc::clone(&self.status)
    }

    pub(crate) fn state_handle(&self) -> Arc<RwLock<S>> {
        Arc::clone(&self.state)
    }

    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// Proposes an encoded command; its reply is sent once the entry is applied.
    pub(crate) fn propose(&mut self, data: Vec<u8>, reply: Reply<S::Output>) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(RaftError::NotLeader { leader_id: self.raw.raft.leader_id }));
            return;
        }
        self.next_seq += 1;
        let mut context = [0u8; 16];
        context[..8].copy_from_slice(&self.nonce.to_le_bytes());
        context[8..].copy_from_slice(&self.next_seq.to_le_bytes());
        match self.raw.propose(context.to_vec(), data) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.pending.insert(index, Pending { context, reply });
            }
            Err(raft::Error::ProposalDropped) => {
                let _ = reply.send(Err(RaftError::NotLeader { leader_id: self.raw.raft.leader_id }));
            }
            Err(e) => {
                let _ = reply.send(Err(RaftError::Raft(e)));
            }
        }
    }

    /// Handles every pending `Ready`.
    pub(crate) fn drain_ready(&mut self) -> Result<(), RaftError> {
        while self.raw.has_ready() {
            self.on_ready()?;
        }
        Ok(())
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot())?;
        }
        self.persist(rd.entries(), rd.hs())?;
        self.apply_committed(rd.take_committed_entries())?;
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
            self.hs_dirty = true;
        }
        self.send(light.take_messages());
        self.apply_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.publish_status();
        for (reply, result) in self.answers.drain(..) {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// The transport point. A group of one has no peers: raft-rs produces no messages for it.
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            tracing::debug!(to = m.to, msg_type = ?m.get_msg_type(), "raft: no transport, message dropped");
        }
    }

    /// Appends entries and the hard state to the log with one fsync, then to the in-memory view.
    fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), RaftError> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let store = self.raw.mut_store();
        store.append(entries);
        if let Some(hs) = hs {
            store.set_hard_state(hs.clone());
        }
        let mut buf = Vec::new();
        for e in entries {
            encode_entry(e, &mut buf)?;
        }
        encode_hard_state(store.hard_state(), &mut buf)?;
        self.log.append(&buf)?;
        self.hs_dirty = false;
        self.log_bytes_since_snapshot += buf.len() as u64;
        Ok(())
    }

    /// Writes the hard state if a commit index is still only in memory (before stopping).
    pub(crate) fn flush_hard_state(&mut self) -> Result<(), RaftError> {
        if !self.hs_dirty {
            return Ok(());
        }
        let mut buf = Vec::new();
        encode_hard_state(self.raw.store().hard_state(), &mut buf)?;
        self.log.append(&buf)?;
        self.hs_dirty = false;
        self.log_bytes_since_snapshot += buf.len() as u64;
        Ok(())
    }

    /// Applies committed entries not applied yet, under one write lock, answering proposers.
    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        if entries.iter().all(|e| e.index <= self.applied) {
            return Ok(());
        }
        let state = Arc::clone(&self.state);
        let mut state = state.write().unwrap_or_else(PoisonError::into_inner);
        let already = self.applied;
        for e in entries.into_iter().filter(|e| e.index > already) {
            let waiter = self.pending.remove(&e.index);
            match e.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&mut state, &e, waiter)?,
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&e)?;
                    self.reject(waiter);
                }
            }
            self.applied = e.index;
        }
        Ok(())
    }

    fn apply_normal(&mut self, state: &mut S, e: &Entry, waiter: Option<Pending<S::Output>>) -> Result<(), RaftError> {
        let (data, context) = (e.get_data(), e.get_context());
        if data.is_empty() && context.is_empty() {
            // A new leader's empty entry.
            self.reject(waiter);
            return Ok(());
        }
        let cmd: S::Command =
            postcard::from_bytes(data).map_err(|err| RaftError::Decode { index: e.index, reason: err.to_string() })?;
        let output = state.apply(cmd);
        match waiter {
            Some(w) if w.context[..] == *context => self.answers.push((w.reply, Ok(output))),
            other => self.reject(other),
        }
        Ok(())
    }

    /// Answers a proposal whose index was taken by another entry (a new leader's).
    fn reject(&mut self, waiter: Option<Pending<S::Output>>) {
        if let Some(w) = waiter {
            let leader_id = self.raw.raft.leader_id;
            self.answers.push((w.reply, Err(RaftError::NotLeader { leader_id })));
        }
    }

    fn apply_conf_change(&mut self, e: &Entry) -> Result<(), RaftError> {
        let decode_err = |err: protobuf::ProtobufError| RaftError::Decode { index: e.index, reason: err.to_string() };
        let cs = if e.get_entry_type() == EntryType::EntryConfChange {
            let cc = ConfChange::parse_from_bytes(e.get_data()).map_err(decode_err)?;
            self.raw.apply_conf_change(&cc)?
        } else {
            let cc = ConfChangeV2::parse_from_bytes(e.get_data()).map_err(decode_err)?;
            self.raw.apply_conf_change(&cc)?
        };
        tracing::info!(index = e.index, voters = ?cs.voters, learners = ?cs.learners, "raft conf change applied");
        Ok(())
    }

    /// Installs a snapshot sent by the leader (multi-node; a group of one never gets one).
    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), RaftError> {
        let meta = snap.get_metadata();
        let file = SnapshotFile {
            index: meta.index,
            term: meta.term,
            conf_state: meta.get_conf_state().clone(),
            data: snap.get_data().to_vec(),
        };
        let restored = S::restore(&file.data).map_err(RaftError::Snapshot)?;
        snapfile::write(&self.dir, &file)?;
        let store = self.raw.mut_store();
        store.install_snapshot(file.index, file.term, file.conf_state.clone());
        self.log.rewrite(self.raw.store().hard_state(), &[])?;
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = restored;
        self.applied = file.index;
        self.hs_dirty = false;
        self.log_bytes_since_snapshot = 0;
        let covered: Vec<u64> = self.pending.range(..=file.index).map(|(i, _)| *i).collect();
        for i in covered {
            let waiter = self.pending.remove(&i);
            self.reject(waiter);
        }
        Ok(())
    }

    /// Takes a snapshot if the log since the last one passed `snapshot_log_bytes` (or if
    /// `forced`) and something was applied since.
    pub(crate) fn maybe_snapshot(&mut self, forced: bool) -> Result<(), RaftError> {
        let due = self.log_bytes_since_snapshot >= self.opts.snapshot_log_bytes;
        if !(forced || due) || self.applied <= self.raw.store().snapshot_index() {
            return Ok(());
        }
        self.take_snapshot()
    }

    /// Snapshot at the applied index, then compact the log.
    ///
    /// Two commit points, each a rename: the snapshot file, then the compacted log. A crash
    /// between them leaves the new snapshot and the old log, whose covered entries replay skips.
    fn take_snapshot(&mut self) -> Result<(), RaftError> {
        let index = self.applied;
        let term = self.raw.store().term(index)?;
        let conf_state: ConfState = self.raw.raft.prs().conf().to_conf_state();
        let data = self.state.read().unwrap_or_else(PoisonError::into_inner).snapshot();
        let file = SnapshotFile { index, term, conf_state, data };
        let snapshot_bytes = snapfile::write(&self.dir, &file)?;
        self.raw.mut_store().compact_to(index, term, file.conf_state);
        let store = self.raw.store();
        self.log.rewrite(store.hard_state(), store.entries_after(index))?;
        self.hs_dirty = false;
        self.log_bytes_since_snapshot = 0;
        self.snapshots_taken += 1;
        tracing::info!(
            index,
            term,
            snapshot_bytes,
            log_bytes = self.log.len_bytes(),
            "raft snapshot taken, log compacted"
        );
        Ok(())
    }

    /// Answers every waiting proposal with [`RaftError::Stopped`].
    /// Answers already computed (entries durable and applied) are sent as they are.
    pub(crate) fn fail_pending(&mut self) {
        for (reply, result) in self.answers.drain(..) {
            let _ = reply.send(result);
        }
        for (_, w) in std::mem::take(&mut self.pending) {
            let _ = w.reply.send(Err(RaftError::Stopped));
        }
    }

    pub(crate) fn publish_status(&self) {
        let raft = &self.raw.raft;
        let mut st = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        *st = RaftStatus {
            node_id: self.opts.node_id,
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            snapshot_index: self.raw.store().snapshot_index(),
            log_bytes: self.log.len_bytes(),
            snapshots_taken: self.snapshots_taken,
        };
    }
}

/// Distinct per process start with overwhelming likelihood: wall-clock nanoseconds mixed with
/// the process id. Only used to tell proposal contexts of different incarnations apart.
fn incarnation_nonce() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}
