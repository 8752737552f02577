//! One Raft node's moving parts, owned by the driver thread: the raft-rs `RawNode`, the log
//! file, the state machine and the proposals waiting for their entries to be applied.
//!
//! [`Node::on_ready`] handles one `Ready` in raft-rs's documented order: send messages,
//! install a snapshot, persist entries and hard state (one fsync), apply committed entries,
//! send persisted messages, `advance`, handle the `LightReady`, `advance_apply`.
//!
//! Transport: [`Node::send`] is the one place outgoing Raft messages leave, through the
//! [`RaftNet`] the group was opened with (a group of one has none, and nothing to send).
//!
//! Proposals are keyed by their context (client nonce, sequence number), not by log index:
//! a follower's proposal travels to the leader (raft-rs forwards it) and may be lost or
//! overtaken by a leader change, so it is sent again, same context, until its entry is
//! applied here or its deadline passes; [`Sessions`] makes the second copy a no-op.
//! Linearizable reads go through ReadIndex ([`Node::read_index`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole, Storage};
use tokio::sync::oneshot;

use super::log::{LogFile, encode_entry, encode_hard_state};
use super::sessions::{self, Sessions};
use super::snapfile::{self, SnapshotFile};
use super::storage::MemLog;
use super::{Observer, RaftError, RaftNet, RaftOptions, RaftStatus, StateMachine};

/// Where an answer goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, RaftError>>;

/// A computed answer and where it goes.
type Answer<O> = (Reply<O>, Result<O, RaftError>);

/// How long a sent proposal waits for its entry before it is sent again (the leader may have
/// dropped it, or died with it unreplicated).
const RESEND_AFTER: Duration = Duration::from_secs(2);
/// How long a ReadIndex request waits for its answer before it is asked again.
const READ_RESEND_AFTER: Duration = Duration::from_secs(1);

/// What a proposal is.
enum Proposal<O> {
    Command { data: Vec<u8>, reply: Reply<O> },
    Conf { cc: ConfChangeV2, reply: Reply<()> },
}

/// A proposal waiting for its entry to be applied.
struct Pending<O> {
    proposal: Proposal<O>,
    deadline: Instant,
    /// When it was last handed to raft-rs (None: not yet, no leader known), and to which leader.
    sent: Option<(Instant, u64)>,
}

/// A batch of linearizable reads waiting for one ReadIndex answer.
struct ReadBatch {
    replies: Vec<Reply<()>>,
    deadline: Instant,
    sent: Instant,
}

pub(crate) struct Node<S: StateMachine> {
    pub(crate) raw: RawNode<MemLog>,
    dir: PathBuf,
    opts: RaftOptions,
    log: LogFile,
    state: Arc<RwLock<S>>,
    status: Arc<Mutex<RaftStatus>>,
    /// The leader of a group of one (reads need no ReadIndex round): read lock-free per read.
    alone_leader: Arc<std::sync::atomic::AtomicBool>,
    net: Option<Arc<dyn RaftNet>>,
    observer: Arc<Mutex<Option<Observer<S::Output>>>>,
    /// Keyed by proposal context.
    pending: HashMap<[u8; 16], Pending<S::Output>>,
    /// Which proposal contexts were applied (replicated; travels in snapshots).
    sessions: Sessions,
    /// Tells this incarnation's proposal contexts apart from earlier ones.
    nonce: u64,
    next_seq: u64,
    /// Reads not yet asked for, then asked (by ReadIndex request context), then waiting
    /// for the applied index to reach the read index.
    reads_new: Vec<Reply<()>>,
    reads_asked: HashMap<u64, ReadBatch>,
    reads_waiting: Vec<(u64, Reply<()>)>,
    /// Highest log index applied to `state`.
    applied: u64,
    /// Commit index learned from a `LightReady`, not yet written to the log.
    hs_dirty: bool,
    log_bytes_since_snapshot: u64,
    snapshots_taken: u64,
    /// Answers held until the status reflects the entries they answer for.
    answers: Vec<Answer<S::Output>>,
    conf_answers: Vec<Answer<()>>,
}

impl<S: StateMachine> Node<S> {
    /// `applied` is the index `state` already reflects (the snapshot's), `sessions` the
    /// session table as of that index.
    #[allow(clippy::too_many_arguments)] // the parts `load` assembles, once
    pub(crate) fn new(
        raw: RawNode<MemLog>,
        dir: PathBuf,
        opts: RaftOptions,
        log: LogFile,
        state: Arc<RwLock<S>>,
        sessions: Sessions,
        applied: u64,
        net: Option<Arc<dyn RaftNet>>,
    ) -> Node<S> {
        let status = Arc::new(Mutex::new(RaftStatus { node_id: opts.node_id, ..Default::default() }));
        Node {
            raw,
            dir,
            opts,
            log,
            state,
            status,
            alone_leader: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            net,
            observer: Arc::new(Mutex::new(None)),
            pending: HashMap::new(),
            sessions,
            nonce: incarnation_nonce(),
            next_seq: 0,
            reads_new: Vec::new(),
            reads_asked: HashMap::new(),
            reads_waiting: Vec::new(),
            applied,
            hs_dirty: false,
            log_bytes_since_snapshot: 0,
            snapshots_taken: 0,
            answers: Vec::new(),
            conf_answers: Vec::new(),
        }
    }

    pub(crate) fn status_handle(&self) -> Arc<Mutex<RaftStatus>> {
        Arc::clone(&self.status)
    }

    pub(crate) fn state_handle(&self) -> Arc<RwLock<S>> {
        Arc::clone(&self.state)
    }

    pub(crate) fn alone_leader_handle(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.alone_leader)
    }

    pub(crate) fn observer_handle(&self) -> Arc<Mutex<Option<Observer<S::Output>>>> {
        Arc::clone(&self.observer)
    }

    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// Proposes an encoded command; its reply is sent once the entry is applied here.
    pub(crate) fn propose(&mut self, data: Vec<u8>, reply: Reply<S::Output>) {
        self.add_pending(Proposal::Command { data, reply });
    }

    /// Proposes a membership change; answered once it is applied here.
    pub(crate) fn propose_conf(&mut self, cc: ConfChangeV2, reply: Reply<()>) {
        self.add_pending(Proposal::Conf { cc, reply });
    }

    fn add_pending(&mut self, proposal: Proposal<S::Output>) {
        self.next_seq += 1;
        let context = sessions::context(self.nonce, self.next_seq);
        let deadline = Instant::now() + self.opts.propose_timeout;
        self.pending.insert(context, Pending { proposal, deadline, sent: None });
        self.try_send(context);
    }

    /// Hands a pending proposal to raft-rs (which appends it on the leader, or forwards it to
    /// the leader from a follower); leaves it unsent while no leader is known.
    fn try_send(&mut self, context: [u8; 16]) {
        let leader = self.raw.raft.leader_id;
        let Some(p) = self.pending.get_mut(&context) else { return };
        if leader == raft::INVALID_ID {
            return;
        }
        let res = match &p.proposal {
            Proposal::Command { data, .. } => self.raw.propose(context.to_vec(), data.clone()),
            Proposal::Conf { cc, .. } => self.raw.propose_conf_change(context.to_vec(), cc.clone()),
        };
        match res {
            Ok(()) => p.sent = Some((Instant::now(), leader)),
            // No leader after all, or a leader transfer in progress: try again next round.
            Err(raft::Error::ProposalDropped) => p.sent = None,
            Err(e) => {
                if let Some(p) = self.pending.remove(&context) {
                    answer_err(p.proposal, &mut self.answers, &mut self.conf_answers, RaftError::Raft(e));
                }
            }
        }
    }

    /// Called every tick: resends proposals whose leader changed or that waited too long,
    /// fails those past their deadline, and does the same for ReadIndex requests.
    pub(crate) fn on_tick(&mut self) {
        let now = Instant::now();
        let leader = self.raw.raft.leader_id;
        let mut due = Vec::new();
        let mut expired = Vec::new();
        for (ctx, p) in &self.pending {
            if now >= p.deadline {
                expired.push(*ctx);
            } else if match p.sent {
                None => leader != raft::INVALID_ID,
                Some((at, to)) => to != leader || now.duration_since(at) >= RESEND_AFTER,
            } {
                due.push(*ctx);
            }
        }
        for ctx in expired {
            if let Some(p) = self.pending.remove(&ctx) {
                let err = RaftError::Timeout { what: "proposal", after: self.opts.propose_timeout, leader_id: leader };
                answer_err(p.proposal, &mut self.answers, &mut self.conf_answers, err);
            }
        }
        for ctx in due {
            self.try_send(ctx);
        }
        let stale: Vec<u64> = self.reads_asked.iter().filter(|(_, b)| now >= b.deadline).map(|(k, _)| *k).collect();
        for k in stale {
            if let Some(b) = self.reads_asked.remove(&k) {
                for r in b.replies {
                    let _ = r.send(Err(RaftError::Timeout {
                        what: "linearizable read",
                        after: self.opts.propose_timeout,
                        leader_id: leader,
                    }));
                }
            }
        }
        let resend: Vec<u64> = self
            .reads_asked
            .iter()
            .filter(|(_, b)| now.duration_since(b.sent) >= READ_RESEND_AFTER)
            .map(|(k, _)| *k)
            .collect();
        for k in resend {
            if leader != raft::INVALID_ID {
                self.raw.read_index(k.to_le_bytes().to_vec());
                if let Some(b) = self.reads_asked.get_mut(&k) {
                    b.sent = now;
                }
            }
        }
    }

    /// Queues a linearizable read: answered once this node has applied everything committed
    /// when the read arrived (ReadIndex; a group of one answers at once).
    pub(crate) fn read_index(&mut self, reply: Reply<()>) {
        if self.raw.raft.state == StateRole::Leader && self.is_single_voter() {
            // Every committed entry is applied before a round ends.
            let _ = reply.send(Ok(()));
            return;
        }
        self.reads_new.push(reply);
    }

    /// Sends one ReadIndex request for the reads queued this round.
    pub(crate) fn flush_reads(&mut self) {
        if self.reads_new.is_empty() {
            return;
        }
        self.next_seq += 1;
        let key = self.next_seq;
        let now = Instant::now();
        let replies = std::mem::take(&mut self.reads_new);
        self.reads_asked.insert(key, ReadBatch { replies, deadline: now + self.opts.propose_timeout, sent: now });
        if self.raw.raft.leader_id != raft::INVALID_ID {
            self.raw.read_index(key.to_le_bytes().to_vec());
        } else if let Some(b) = self.reads_asked.get_mut(&key) {
            // Asked again by on_tick once a leader is known.
            b.sent = now - READ_RESEND_AFTER;
        }
    }

    fn is_single_voter(&self) -> bool {
        let conf = self.raw.raft.prs().conf();
        let voters = conf.voters().ids();
        voters.len() == 1 && voters.contains(self.opts.node_id)
    }

    /// Steps a Raft message from a peer.
    pub(crate) fn step(&mut self, msg: Message) {
        let (from, t) = (msg.from, msg.get_msg_type());
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(from, msg_type = ?t, error = %e, "raft: message not stepped");
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
        for rs in rd.take_read_states() {
            let key: Option<[u8; 8]> = rs.request_ctx.as_slice().try_into().ok();
            if let Some(b) = key.and_then(|k| self.reads_asked.remove(&u64::from_le_bytes(k))) {
                self.reads_waiting.extend(b.replies.into_iter().map(|r| (rs.index, r)));
            }
        }
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
        self.send_answers();
        Ok(())
    }

    /// Sends the computed answers, and answers the reads whose index is applied.
    fn send_answers(&mut self) {
        for (reply, result) in self.answers.drain(..) {
            let _ = reply.send(result);
        }
        for (reply, result) in self.conf_answers.drain(..) {
            let _ = reply.send(result);
        }
        if !self.reads_waiting.is_empty() {
            let applied = self.applied;
            let (done, wait): (Vec<_>, Vec<_>) = self.reads_waiting.drain(..).partition(|(i, _)| *i <= applied);
            self.reads_waiting = wait;
            for (_, r) in done {
                let _ = r.send(Ok(()));
            }
        }
    }

    /// The transport point. A group of one has no peers: raft-rs produces no messages for it.
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let (to, t) = (m.to, m.get_msg_type());
            match &self.net {
                Some(net) => {
                    net.send(m);
                    if t == raft::eraftpb::MessageType::MsgSnapshot {
                        // Fire and forget: if it was lost, the follower rejects the next append
                        // and the leader sends the snapshot again.
                        self.raw.report_snapshot(to, SnapshotStatus::Finish);
                    }
                }
                None => tracing::debug!(to, msg_type = ?t, "raft: no transport, message dropped"),
            }
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
        let observer = Arc::clone(&self.observer);
        let observer = observer.lock().unwrap_or_else(PoisonError::into_inner);
        let already = self.applied;
        for e in entries.into_iter().filter(|e| e.index > already) {
            // A copy of an entry applied before (a proposal sent again) is skipped whole.
            let first = match sessions::parse_context(e.get_context()) {
                Some((nonce, seq)) => self.sessions.first_apply(nonce, seq, e.index),
                None => true,
            };
            let ctx: Option<[u8; 16]> = e.get_context().try_into().ok();
            let waiter = if first { ctx.and_then(|c| self.pending.remove(&c)) } else { None };
            match e.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&mut state, &e, first, waiter, observer.as_ref())?,
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    // raft-rs tracks membership by applying every committed change; a repeated
                    // one (adding a voter twice) is a no-op there.
                    self.apply_conf_change(&e)?;
                    match waiter.map(|w| w.proposal) {
                        Some(Proposal::Conf { reply, .. }) => self.conf_answers.push((reply, Ok(()))),
                        Some(other) => answer_err(
                            other,
                            &mut self.answers,
                            &mut self.conf_answers,
                            RaftError::Decode { index: e.index, reason: "command answered by a conf change".into() },
                        ),
                        None => {}
                    }
                }
            }
            self.applied = e.index;
        }
        Ok(())
    }

    fn apply_normal(
        &mut self,
        state: &mut S,
        e: &Entry,
        first: bool,
        waiter: Option<Pending<S::Output>>,
        observer: Option<&Observer<S::Output>>,
    ) -> Result<(), RaftError> {
        let (data, context) = (e.get_data(), e.get_context());
        if (data.is_empty() && context.is_empty()) || !first {
            // A new leader's empty entry, or a duplicate.
            return Ok(());
        }
        let cmd: S::Command =
            postcard::from_bytes(data).map_err(|err| RaftError::Decode { index: e.index, reason: err.to_string() })?;
        let output = state.apply(cmd);
        if let Some(f) = observer {
            f(&output);
        }
        match waiter.map(|w| w.proposal) {
            Some(Proposal::Command { reply, .. }) => self.answers.push((reply, Ok(output))),
            Some(other) => answer_err(
                other,
                &mut self.answers,
                &mut self.conf_answers,
                RaftError::Decode { index: e.index, reason: "conf change answered by a command".into() },
            ),
            None => {}
        }
        Ok(())
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
        let (sessions, state_bytes) = sessions::decode_payload(&file.data).map_err(RaftError::Snapshot)?;
        let restored = S::restore(state_bytes).map_err(RaftError::Snapshot)?;
        snapfile::write(&self.dir, &file)?;
        let store = self.raw.mut_store();
        store.install_snapshot(file.index, file.term, file.conf_state.clone());
        self.log.rewrite(self.raw.store().hard_state(), &[])?;
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = restored;
        self.sessions = sessions;
        self.applied = file.index;
        self.hs_dirty = false;
        self.log_bytes_since_snapshot = 0;
        // Proposals the snapshot covers were applied, but their outputs are not known here.
        let covered: Vec<[u8; 16]> = self
            .pending
            .keys()
            .filter(|c| sessions::parse_context(&c[..]).is_some_and(|(n, s)| self.sessions.applied(n, s)))
            .copied()
            .collect();
        for c in covered {
            if let Some(p) = self.pending.remove(&c) {
                let err = RaftError::OutcomeUnknown { index: file.index };
                answer_err(p.proposal, &mut self.answers, &mut self.conf_answers, err);
            }
        }
        tracing::info!(index = file.index, term = file.term, "raft snapshot installed from the leader");
        Ok(())
    }

    /// Takes a snapshot if the log since the last one passed `snapshot_log_bytes` (or if
    /// `forced`) and something was applied since.
    pub(crate) fn maybe_snapshot(&mut self, forced: bool) -> Result<(), RaftError> {
        let due =
            self.log_bytes_since_snapshot >= self.opts.snapshot_log_bytes || self.raw.store().take_want_snapshot();
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
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner).snapshot();
        let data = sessions::encode_payload(&self.sessions, &state).map_err(RaftError::Encode)?;
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
        self.send_answers();
        for (_, w) in std::mem::take(&mut self.pending) {
            answer_err(w.proposal, &mut self.answers, &mut self.conf_answers, RaftError::Stopped);
        }
        for r in std::mem::take(&mut self.reads_new)
            .into_iter()
            .chain(self.reads_asked.drain().flat_map(|(_, b)| b.replies))
            .chain(self.reads_waiting.drain(..).map(|(_, r)| r))
        {
            let _ = r.send(Err(RaftError::Stopped));
        }
        self.send_answers();
    }

    pub(crate) fn publish_status(&self) {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf().to_conf_state();
        let alone = raft.state == StateRole::Leader && conf.voters == [self.opts.node_id];
        self.alone_leader.store(alone, std::sync::atomic::Ordering::Release);
        let mut st = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        *st = RaftStatus {
            node_id: self.opts.node_id,
            role: format!("{:?}", raft.state).to_lowercase(),
            voters: conf.voters,
            learners: conf.learners,
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

/// Sends the error answer a proposal gets.
fn answer_err<O>(p: Proposal<O>, answers: &mut Vec<Answer<O>>, conf: &mut Vec<Answer<()>>, e: RaftError) {
    match p {
        Proposal::Command { reply, .. } => answers.push((reply, Err(e))),
        Proposal::Conf { reply, .. } => conf.push((reply, Err(e))),
    }
}

/// Distinct per process start with overwhelming likelihood: wall-clock nanoseconds mixed with
/// the process id. Only used to tell proposal contexts of different incarnations apart.
fn incarnation_nonce() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}
