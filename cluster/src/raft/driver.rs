//! The driver: one dedicated thread per group that owns the [`Node`] and loops — receive
//! proposals (all that are queued, so one fsync covers many), tick on time, handle every
//! `Ready`, take a snapshot when the log has grown — and the [`Handle`] async callers use.
//!
//! Opening loads the snapshot, replays the log, and, before the thread starts, applies the
//! committed entries; a group of one then campaigns and commits its new term's empty entry,
//! which commits (and applies) every entry the log holds, so `open` returns with the state
//! every acknowledged proposal produced.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use raft::eraftpb::{ConfChangeV2, ConfState, HardState, Message};
use raft::{Config, RawNode};
use tokio::sync::oneshot;

use super::log::LogFile;
use super::node::{Node, Reply};
use super::sessions::{self, Sessions};
use super::snapfile::{self, SnapshotFile};
use super::storage::MemLog;
use super::{Observer, RaftError, RaftNet, RaftOptions, RaftStatus, StateMachine};

/// Most messages taken from the queue before handling a `Ready`.
const MAX_BATCH: usize = 4096;

enum Msg<S: StateMachine> {
    Propose {
        data: Vec<u8>,
        reply: Reply<S::Output>,
    },
    Raft(Message),
    Conf {
        cc: ConfChangeV2,
        reply: Reply<()>,
    },
    ReadIndex(Reply<()>),
    Snapshot(Reply<()>),
    Shutdown(Reply<()>),
    /// The handle was dropped (the transport may still hold senders, so the channel does not
    /// disconnect by itself).
    Close,
}

/// The async-facing handle. Dropping it stops the driver thread (and waits for it).
pub(crate) struct Handle<S: StateMachine> {
    tx: Option<mpsc::Sender<Msg<S>>>,
    thread: Option<JoinHandle<()>>,
    state: Arc<RwLock<S>>,
    status: Arc<Mutex<RaftStatus>>,
    alone_leader: Arc<std::sync::atomic::AtomicBool>,
    observer: Arc<Mutex<Option<Observer<S::Output>>>>,
}

impl<S: StateMachine> Handle<S> {
    pub(crate) fn open(
        dir: &Path,
        opts: RaftOptions,
        initial: S,
        net: Option<Arc<dyn RaftNet>>,
    ) -> Result<Self, RaftError> {
        std::fs::create_dir_all(dir).map_err(super::durable::io_err(dir))?;
        let mut node = load(dir, &opts, initial, net)?;
        node.drain_ready()?;
        let voters = node.raw.raft.prs().conf().to_conf_state().voters;
        if voters == [opts.node_id] {
            node.raw.campaign()?;
            node.drain_ready()?;
        }
        node.publish_status();
        tracing::info!(
            dir = %dir.display(),
            node_id = opts.node_id,
            applied = node.applied(),
            term = node.raw.raft.term,
            "raft group open"
        );
        let state = node.state_handle();
        let status = node.status_handle();
        let observer = node.observer_handle();
        let alone_leader = node.alone_leader_handle();
        let (tx, rx) = mpsc::channel();
        let tick = opts.tick;
        let thread = std::thread::Builder::new()
            .name(format!("tidepool-raft-{}", opts.node_id))
            .spawn(move || run(node, rx, tick))
            .map_err(super::durable::io_err(dir))?;
        Ok(Handle { tx: Some(tx), thread: Some(thread), state, status, alone_leader, observer })
    }

    /// A function that hands a peer's message to the driver (a no-op once it stopped).
    pub(crate) fn raft_sink(&self) -> Arc<dyn Fn(Message) + Send + Sync> {
        let tx = self.tx.clone();
        Arc::new(move |m| {
            if let Some(tx) = &tx {
                let _ = tx.send(Msg::Raft(m));
            }
        })
    }

    /// Whether this node is the leader of a group of one (as of the last driver round).
    pub(crate) fn alone_leader(&self) -> bool {
        self.alone_leader.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) async fn read_barrier(&self) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::ReadIndex(reply))?;
        rx.await.unwrap_or(Err(RaftError::Stopped))
    }

    pub(crate) async fn conf_change(&self, cc: ConfChangeV2) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Conf { cc, reply })?;
        rx.await.unwrap_or(Err(RaftError::Stopped))
    }

    pub(crate) fn set_observer(&self, f: Observer<S::Output>) {
        *self.observer.lock().unwrap_or_else(PoisonError::into_inner) = Some(f);
    }

    pub(crate) async fn propose(&self, cmd: S::Command) -> Result<S::Output, RaftError> {
        let data = postcard::to_allocvec(&cmd).map_err(|e| RaftError::Encode(e.to_string()))?;
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Propose { data, reply })?;
        rx.await.unwrap_or(Err(RaftError::Stopped))
    }

    pub(crate) fn state(&self) -> &Arc<RwLock<S>> {
        &self.state
    }

    pub(crate) fn status(&self) -> RaftStatus {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) async fn snapshot_now(&self) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Snapshot(reply))?;
        rx.await.unwrap_or(Err(RaftError::Stopped))
    }

    /// Stops the driver after the proposals queued before this call are answered.
    pub(crate) async fn shutdown(mut self) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Msg::Shutdown(reply));
        let result = match sent {
            Ok(()) => rx.await.unwrap_or(Err(RaftError::Stopped)),
            Err(e) => Err(e),
        };
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            // The thread has answered (or died); joining only waits for it to return.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }

    fn send(&self, msg: Msg<S>) -> Result<(), RaftError> {
        let tx = self.tx.as_ref().ok_or(RaftError::Stopped)?;
        tx.send(msg).map_err(|_| RaftError::Stopped)
    }
}

impl<S: StateMachine> Drop for Handle<S> {
    fn drop(&mut self) {
        // `Close` makes the thread finish its round, flush and return (the channel itself may
        // stay open: the transport's inbox holds a sender); waiting for it guarantees the log
        // file is closed before the directory is opened again.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Close);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Loads snapshot and log from `dir` and builds the node (not yet caught up).
fn load<S: StateMachine>(
    dir: &Path,
    opts: &RaftOptions,
    initial: S,
    net: Option<Arc<dyn RaftNet>>,
) -> Result<Node<S>, RaftError> {
    let (snapshot, state, sessions) = match snapfile::read(dir)? {
        Some(file) => {
            let (sessions, bytes) = sessions::decode_payload(&file.data).map_err(RaftError::Snapshot)?;
            let state = S::restore(bytes).map_err(RaftError::Snapshot)?;
            (SnapshotFile { data: Vec::new(), ..file }, state, sessions)
        }
        None => {
            // A new group of one is its own only voter; a joining node starts with none and
            // learns the membership from the leader's snapshot.
            let voters = if opts.join { Vec::new() } else { vec![opts.node_id] };
            let conf_state = ConfState { voters, ..Default::default() };
            (SnapshotFile { conf_state, ..Default::default() }, initial, Sessions::default())
        }
    };
    let (log, replayed) = LogFile::open(dir, snapshot.index)?;
    let mut hs = replayed.hard_state.unwrap_or_else(HardState::default);
    hs.term = hs.term.max(snapshot.term);
    hs.commit = hs.commit.max(snapshot.index);
    let last = snapshot.index + replayed.entries.len() as u64;
    if hs.commit > last {
        return Err(RaftError::CorruptLog {
            path: dir.join(super::log::LOG_FILE).display().to_string(),
            offset: replayed.valid_len,
            reason: format!("hard state commit={} past last entry={last}", hs.commit),
        });
    }
    let storage = MemLog::new(dir.to_path_buf(), hs, &snapshot, replayed.entries);
    let cfg = Config {
        id: opts.node_id,
        election_tick: 10,
        heartbeat_tick: 3,
        applied: snapshot.index,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        pre_vote: true,
        // A leader that cannot reach a quorum steps down (a cut-off minority stops answering
        // as leader instead of timing out every proposal).
        check_quorum: true,
        ..Default::default()
    };
    cfg.validate()?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let raw = RawNode::new(&cfg, storage, &logger)?;
    let state = Arc::new(RwLock::new(state));
    Ok(Node::new(raw, dir.to_path_buf(), opts.clone(), log, state, sessions, snapshot.index, net))
}

/// How the loop ended.
enum Stop {
    Shutdown(Reply<()>),
    Dropped,
    Failed(RaftError),
}

/// What one round took from the queue besides proposals.
#[derive(Default)]
struct Round {
    snapshot_requests: Vec<Reply<()>>,
    shutdown: Option<Reply<()>>,
    closed: bool,
}

/// The driver thread's loop.
fn run<S: StateMachine>(mut node: Node<S>, rx: mpsc::Receiver<Msg<S>>, tick: std::time::Duration) {
    let mut next_tick = Instant::now() + tick;
    let stop = loop {
        let mut round = Round::default();
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(msg) => {
                take(&mut node, &mut round, msg);
                for _ in 1..MAX_BATCH {
                    if round.shutdown.is_some() || round.closed {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(msg) => take(&mut node, &mut round, msg),
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Stop::Dropped,
        }
        if Instant::now() >= next_tick {
            node.raw.tick();
            node.on_tick();
            next_tick = Instant::now() + tick;
        }
        node.flush_reads();
        if let Err(e) = round_work(&mut node, &mut round) {
            break Stop::Failed(e);
        }
        node.publish_status();
        if round.closed {
            break Stop::Dropped;
        }
        if let Some(reply) = round.shutdown {
            break Stop::Shutdown(reply);
        }
    };
    finish(node, stop);
}

fn take<S: StateMachine>(node: &mut Node<S>, round: &mut Round, msg: Msg<S>) {
    match msg {
        Msg::Propose { data, reply } => node.propose(data, reply),
        Msg::Raft(m) => node.step(m),
        Msg::Conf { cc, reply } => node.propose_conf(cc, reply),
        Msg::ReadIndex(reply) => node.read_index(reply),
        Msg::Snapshot(reply) => round.snapshot_requests.push(reply),
        Msg::Shutdown(reply) => round.shutdown = Some(reply),
        Msg::Close => round.closed = true,
    }
}

/// Handles the readies of a round, then snapshots (forced by a request, or by log size).
fn round_work<S: StateMachine>(node: &mut Node<S>, round: &mut Round) -> Result<(), RaftError> {
    node.drain_ready()?;
    let forced = !round.snapshot_requests.is_empty();
    let result = node.maybe_snapshot(forced);
    node.publish_status();
    let mut replies = std::mem::take(&mut round.snapshot_requests).into_iter();
    match result {
        Ok(()) => replies.for_each(|r| {
            let _ = r.send(Ok(()));
        }),
        Err(e) => {
            tracing::error!(error = %e, "raft snapshot failed");
            if let Some(first) = replies.next() {
                let _ = first.send(Err(e));
                return Err(RaftError::Stopped);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Ends the driver: flush the commit index, fail what is still waiting, answer `shutdown`.
fn finish<S: StateMachine>(mut node: Node<S>, stop: Stop) {
    let flushed = match &stop {
        Stop::Failed(_) => Ok(()),
        Stop::Shutdown(_) | Stop::Dropped => node.flush_hard_state(),
    };
    node.fail_pending();
    node.publish_status();
    match (stop, flushed) {
        (Stop::Shutdown(reply), flushed) => {
            let _ = reply.send(flushed);
        }
        (Stop::Dropped, Err(e)) => tracing::error!(error = %e, "raft driver: final flush failed"),
        (Stop::Dropped, Ok(())) => {}
        (Stop::Failed(e), _) => tracing::error!(error = %e, "raft driver stopped on error"),
    }
    tracing::info!(applied = node.applied(), "raft driver stopped");
}
