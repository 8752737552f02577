//! Read-ahead for sequential READs. A client that copies a file (libnfs's `nfs-cp`, many
//! tools) sends one READ, waits for it, then sends the next: the device sits idle while a
//! reply crosses the network. When a READ of a file starts where the previous one ended, the
//! next `DEPTH` ranges of the same length are read in the background; a READ takes one if it
//! asks for exactly what was read ahead and the file has not changed since (same ctime and
//! size: every write and SETATTR moves ctime), else they are dropped and the READ reads the fs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tidepool_fs::{FileAttr, Fs, FsError};
use tokio::task::JoinHandle;

/// Files whose read position is remembered; past it the memory is cleared.
const MAX_STREAMS: usize = 64;
/// Ranges read ahead of a sequential reader (at most `DEPTH` x 1 MiB x `MAX_STREAMS` held).
const DEPTH: usize = 4;

struct Ahead {
    offset: u64,
    len: usize,
    stamp: (i64, u64),
    task: JoinHandle<Result<Vec<u8>, FsError>>,
}

#[derive(Default)]
struct Stream {
    /// Where the last READ of this file ended.
    next: u64,
    ahead: std::collections::VecDeque<Ahead>,
}

#[derive(Default)]
pub struct ReadAhead {
    streams: Mutex<HashMap<u64, Stream>>,
}

fn stamp(a: &FileAttr) -> (i64, u64) {
    (a.ctime, a.size)
}

impl ReadAhead {
    /// READ `len` bytes at `offset` of the file `a` describes (its attributes now).
    pub async fn read(&self, fs: &Arc<Fs>, a: &FileAttr, offset: u64, len: usize) -> Result<Vec<u8>, FsError> {
        let (mine, sequential) = match self.streams.lock() {
            Ok(mut m) => match m.get_mut(&a.ino) {
                Some(s) => {
                    // Ranges before this READ are passed: drop them.
                    while s.ahead.front().is_some_and(|ah| ah.offset < offset) {
                        if let Some(ah) = s.ahead.pop_front() {
                            ah.task.abort();
                        }
                    }
                    let hit =
                        s.ahead.front().is_some_and(|ah| ah.offset == offset && ah.len == len && ah.stamp == stamp(a));
                    if !hit && s.ahead.front().is_some_and(|ah| ah.offset == offset || ah.stamp != stamp(a)) {
                        // Same place but another length, or the file changed: all of it is off.
                        s.ahead.drain(..).for_each(|ah| ah.task.abort());
                    }
                    (if hit { s.ahead.pop_front() } else { None }, s.next == offset)
                }
                None => (None, false),
            },
            Err(_) => (None, false),
        };
        let mut data = None;
        if let Some(ah) = mine
            && let Ok(Ok(d)) = ah.task.await
        {
            data = Some(d);
        }
        let data = match data {
            Some(d) => d,
            None => fs.read(a.ino, offset, len).await?,
        };
        let end = offset + data.len() as u64;
        if let Ok(mut m) = self.streams.lock() {
            if m.len() >= MAX_STREAMS && !m.contains_key(&a.ino) {
                for (_, s) in m.drain() {
                    s.ahead.into_iter().for_each(|ah| ah.task.abort());
                }
            }
            let s = m.entry(a.ino).or_default();
            s.next = end;
            if !sequential || len == 0 {
                s.ahead.drain(..).for_each(|ah| ah.task.abort());
            } else {
                let mut at = s.ahead.back().map_or(end, |ah| ah.offset + ah.len as u64);
                while s.ahead.len() < DEPTH && at < a.size {
                    let (fs, ino) = (fs.clone(), a.ino);
                    let task = tokio::spawn(async move { fs.read(ino, at, len).await });
                    s.ahead.push_back(Ahead { offset: at, len, stamp: stamp(a), task });
                    at += len as u64;
                }
            }
        }
        Ok(data)
    }
}
