//! The in-memory view of the durable log that raft-rs reads through its `Storage` trait.
//!
//! [`MemLog`] holds the hard state, the conf state as of the snapshot, the snapshot's index
//! and term, and the entries after it. It does no I/O of its own except reading the snapshot
//! file when raft asks for a snapshot to send to a lagging follower: the driver makes every
//! change durable (log file, snapshot file) before or as it applies it here.

use std::path::PathBuf;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::snapfile;

/// raft-rs `Storage` over entries held in memory.
pub(crate) struct MemLog {
    dir: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot_index: u64,
    snapshot_term: u64,
    /// Entries after `snapshot_index`, contiguous: `entries[i].index == snapshot_index + 1 + i`.
    entries: Vec<Entry>,
    /// Set when raft asked for a snapshot the file cannot give (too old, or from before the
    /// follower was added): the driver then takes a new one.
    want_snapshot: std::cell::Cell<bool>,
}

impl MemLog {
    pub(crate) fn new(
        dir: PathBuf,
        hard_state: HardState,
        snapshot: &snapfile::SnapshotFile,
        entries: Vec<Entry>,
    ) -> MemLog {
        MemLog {
            dir,
            hard_state,
            conf_state: snapshot.conf_state.clone(),
            snapshot_index: snapshot.index,
            snapshot_term: snapshot.term,
            entries,
            want_snapshot: std::cell::Cell::new(false),
        }
    }

    /// Whether raft asked for a newer snapshot than the file holds (clears the request).
    pub(crate) fn take_want_snapshot(&self) -> bool {
        self.want_snapshot.replace(false)
    }

    fn first(&self) -> u64 {
        self.snapshot_index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    /// Appends entries, replacing any conflicting suffix (same rule as log replay).
    /// Entries at or below the snapshot index are ignored: they are covered by it.
    pub(crate) fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        let skip = self.first().saturating_sub(first.index) as usize;
        let ents = &ents[skip.min(ents.len())..];
        let Some(first) = ents.first() else { return };
        let keep = (first.index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
    }

    pub(crate) fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub(crate) fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Records a commit index learned from a `LightReady`.
    pub(crate) fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub(crate) fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// Entries after `index` (all retained entries if `index` is below the first).
    pub(crate) fn entries_after(&self, index: u64) -> &[Entry] {
        let skip = index.saturating_sub(self.snapshot_index) as usize;
        &self.entries[skip.min(self.entries.len())..]
    }

    /// Drops entries up to `index`, now covered by a snapshot at (`index`, `term`).
    pub(crate) fn compact_to(&mut self, index: u64, term: u64, conf_state: ConfState) {
        if index <= self.snapshot_index {
            return;
        }
        let drop = ((index - self.snapshot_index) as usize).min(self.entries.len());
        self.entries.drain(..drop);
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.conf_state = conf_state;
        if self.entries.first().is_some_and(|e| e.index != index + 1) {
            // Only reachable if `index` was past the last entry: nothing retained is valid.
            self.entries.clear();
        }
    }

    /// Replaces everything with a snapshot received from the leader.
    pub(crate) fn install_snapshot(&mut self, index: u64, term: u64, conf_state: ConfState) {
        self.entries.clear();
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.conf_state = conf_state;
        self.hard_state.term = self.hard_state.term.max(term);
        self.hard_state.commit = self.hard_state.commit.max(index);
    }
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl Storage for MemLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(store_err(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(store_err(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut ents = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index {
            return Ok(self.snapshot_term);
        }
        if idx < self.first() {
            return Err(store_err(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(store_err(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The snapshot file, for a follower too far behind (multi-node). If it is older than
    /// `request_index`, or from before `to` was a member (a follower refuses a snapshot whose
    /// membership leaves it out), the driver is asked for a new one and raft retries later.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let file =
            snapfile::read(&self.dir).map_err(|e| store_err(StorageError::Other(Box::new(e))))?.unwrap_or_default();
        let cs = &file.conf_state;
        let has_to = cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing).any(|id| *id == to);
        if file.index < request_index || file.index == 0 || !has_to {
            self.want_snapshot.set(true);
            return Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
        }
        let mut snap = Snapshot { data: file.data.into(), ..Default::default() };
        let meta = snap.mut_metadata();
        meta.index = file.index;
        meta.term = file.term;
        meta.set_conf_state(file.conf_state);
        Ok(snap)
    }
}
