//! UNSTABLE writes: acknowledged once accepted, made durable in the background.
//!
//! An UNSTABLE WRITE is answered as soon as its bytes are held here (within a byte budget);
//! a task then runs the durable [`Fs::write`] (blocks flushed, extents in the fsync'd Raft
//! log). Writes to one file run in parallel, so the meta group's one fsync covers many of
//! them, except that a write waits for every earlier pending write it overlaps (the later one
//! wins, as the client expects). Anything that must see the data first drains the file:
//! COMMIT, a FILE_SYNC or DATA_SYNC write, READ, SETATTR, READDIR does not need to.
//! GETATTR does not drain: it reports the size the pending writes will leave.
//!
//! If the server dies first, pending writes are lost: that is what UNSTABLE allows, and the
//! write verifier (the process start time) changes, so the client sends them again before its
//! COMMIT succeeds. A background write that fails is remembered for its file and answered to
//! the next COMMIT (or stable write) of that file, like a writeback error at fsync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nfsserve::nfs::nfsstat3;
use tidepool_fs::Fs;
use tokio::sync::{Semaphore, watch};

use crate::map_err;

/// Bytes of UNSTABLE data held at once; a write beyond it waits for room before its answer.
pub const BUDGET_BYTES: usize = 128 << 20;

#[derive(Default)]
struct FileQueue {
    /// Pending writes: (id, offset, end, done).
    running: Vec<(u64, u64, u64, watch::Receiver<bool>)>,
    error: Option<nfsstat3>,
}

pub struct WriteBehind {
    budget: Arc<Semaphore>,
    files: Mutex<HashMap<u64, FileQueue>>,
    next_id: std::sync::atomic::AtomicU64,
}

async fn wait_done(mut rx: watch::Receiver<bool>) {
    // A dropped sender (the task ended) counts as done too.
    let _ = rx.wait_for(|d| *d).await;
}

impl Default for WriteBehind {
    fn default() -> Self {
        WriteBehind {
            budget: Arc::new(Semaphore::new(BUDGET_BYTES)),
            files: Mutex::new(HashMap::new()),
            next_id: Default::default(),
        }
    }
}

impl WriteBehind {
    /// Accept an UNSTABLE write of `data` at `offset` of `ino`; returns once it is queued.
    pub async fn submit(self: &Arc<Self>, fs: Arc<Fs>, ino: u64, offset: u64, data: Vec<u8>) -> Result<(), nfsstat3> {
        let n = data.len().clamp(1, BUDGET_BYTES) as u32;
        let permit = self.budget.clone().acquire_many_owned(n).await.map_err(|_| nfsstat3::NFS3ERR_JUKEBOX)?;
        let end = offset + data.len() as u64;
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        let before: Vec<watch::Receiver<bool>> = {
            let mut files = self.files.lock().map_err(|_| nfsstat3::NFS3ERR_SERVERFAULT)?;
            let q = files.entry(ino).or_default();
            if let Some(e) = q.error {
                return Err(e);
            }
            let before = q.running.iter().filter(|(_, o, e, _)| *o < end && offset < *e).map(|r| r.3.clone()).collect();
            q.running.push((id, offset, end, rx));
            before
        };
        let this = self.clone();
        tokio::spawn(async move {
            for rx in before {
                wait_done(rx).await;
            }
            let res = fs.write(ino, offset, &data).await;
            drop(data);
            drop(permit);
            if let Ok(mut files) = this.files.lock()
                && let Some(q) = files.get_mut(&ino)
            {
                q.running.retain(|r| r.0 != id);
                if let Err(e) = res {
                    q.error.get_or_insert(map_err(e));
                }
                if q.running.is_empty() && q.error.is_none() {
                    files.remove(&ino);
                }
            }
            let _ = tx.send(true);
        });
        Ok(())
    }

    /// Wait until every write to `ino` accepted so far is durable (or failed). False if there
    /// was none to wait for.
    pub async fn drain(&self, ino: u64) -> bool {
        let waits: Vec<watch::Receiver<bool>> = match self.files.lock() {
            Ok(files) => files.get(&ino).map(|q| q.running.iter().map(|r| r.3.clone()).collect()).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let any = !waits.is_empty();
        for rx in waits {
            wait_done(rx).await;
        }
        any
    }

    /// Drain `ino`, then take the error a background write to it met, if any.
    pub async fn sync(&self, ino: u64) -> Result<(), nfsstat3> {
        self.drain(ino).await;
        let mut files = self.files.lock().map_err(|_| nfsstat3::NFS3ERR_SERVERFAULT)?;
        match files.get_mut(&ino) {
            Some(q) => {
                let e = q.error.take();
                if q.running.is_empty() {
                    files.remove(&ino);
                }
                e.map_or(Ok(()), Err)
            }
            None => Ok(()),
        }
    }

    /// The end of the furthest pending write to `ino` (GETATTR reports at least this size).
    pub fn pending_end(&self, ino: u64) -> Option<u64> {
        let files = self.files.lock().ok()?;
        files.get(&ino)?.running.iter().map(|r| r.2).max()
    }
}
