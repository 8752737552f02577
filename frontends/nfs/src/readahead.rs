//! Read-ahead for sequential READs. A client that copies a file (libnfs's `nfs-cp`, many
//! tools) sends one READ, waits for it, then sends the next: the device sits idle while a
//! reply crosses the network. When a READ of a file starts where the previous one ended, the
//! next range of the same length is read in the background; the next READ takes it if it asks
//! for exactly what was read ahead and the file has not changed since (same ctime and size:
//! every write and SETATTR moves ctime), else it is dropped and the READ reads the fs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tidepool_fs::{FileAttr, Fs, FsError};
use tokio::task::JoinHandle;

/// Files whose read position is remembered; past it the memory is cleared.
const MAX_STREAMS: usize = 256;

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
    ahead: Option<Ahead>,
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
        let (ahead, sequential) = match self.streams.lock() {
            Ok(mut m) => {
                let s = m.get_mut(&a.ino);
                let sequential = s.as_ref().is_some_and(|s| s.next == offset);
                (s.and_then(|s| s.ahead.take()), sequential)
            }
            Err(_) => (None, false),
        };
        let mut data = None;
        if let Some(ah) = ahead {
            if ah.offset == offset && ah.len == len && ah.stamp == stamp(a) {
                if let Ok(Ok(d)) = ah.task.await {
                    data = Some(d);
                }
            } else {
                ah.task.abort();
            }
        }
        let data = match data {
            Some(d) => d,
            None => fs.read(a.ino, offset, len).await?,
        };
        let end = offset + data.len() as u64;
        let next = (sequential && len > 0 && end < a.size).then(|| {
            let fs = fs.clone();
            let ino = a.ino;
            Ahead { offset: end, len, stamp: stamp(a), task: tokio::spawn(async move { fs.read(ino, end, len).await }) }
        });
        if let Ok(mut m) = self.streams.lock() {
            if m.len() >= MAX_STREAMS && !m.contains_key(&a.ino) {
                for (_, s) in m.drain() {
                    if let Some(ah) = s.ahead {
                        ah.task.abort();
                    }
                }
            }
            let s = m.entry(a.ino).or_default();
            s.next = end;
            if let Some(old) = std::mem::replace(&mut s.ahead, next) {
                old.task.abort();
            }
        }
        Ok(data)
    }
}
