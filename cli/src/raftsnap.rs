//! Raft messages too big for one transport frame (a snapshot of a large namespace: roughly
//! 200-300 bytes of metadata per file, past 64 MiB at a few hundred thousand files) go as
//! numbered pieces of `raft_snapshot_chunk_size` over the data connections
//! (`Request::Other { kind: "raft-chunk" }`), and the receiver steps the message once it has
//! every piece. A piece lost or refused drops the whole message: raft-rs sends the snapshot
//! again after the follower's next rejection (the driver reports every snapshot as sent).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub const KIND: &str = "raft-chunk";
/// Largest message put back together (a metadata snapshot of tens of millions of files).
const MAX_TOTAL: u64 = 8 << 30;
/// A message not completed within this is dropped.
const STALE_AFTER: Duration = Duration::from_secs(600);
/// Messages being put back together at once, per node.
const MAX_PARTIALS: usize = 4;

/// The header of one piece (postcard, in the request's `data`); the piece is the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Random per message.
    pub id: u64,
    pub index: u32,
    pub count: u32,
    pub total: u64,
}

/// The pieces of `bytes`, each at most `chunk` long.
pub fn split(bytes: &[u8], chunk: usize) -> Vec<(Piece, &[u8])> {
    let id = rand::random();
    let chunk = chunk.max(1);
    let count = bytes.len().div_ceil(chunk).max(1) as u32;
    (0..count)
        .map(|i| {
            let from = i as usize * chunk;
            let to = (from + chunk).min(bytes.len());
            (Piece { id, index: i, count, total: bytes.len() as u64 }, &bytes[from..to])
        })
        .collect()
}

struct Partial {
    pieces: Vec<Option<Vec<u8>>>,
    have: u32,
    total: u64,
    started: Instant,
}

/// Puts messages back together, per sending node.
#[derive(Default)]
pub struct Reassembler {
    partials: HashMap<(u64, u64), Partial>,
}

impl Reassembler {
    /// Adds a piece from node `from`; the whole message once its last piece is in.
    pub fn add(&mut self, from: u64, p: Piece, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if p.count == 0 || p.index >= p.count || p.total > MAX_TOTAL {
            return Err(format!("bad raft message piece {p:?}"));
        }
        self.partials.retain(|_, q| q.started.elapsed() < STALE_AFTER);
        let key = (from, p.id);
        if !self.partials.contains_key(&key) {
            if self.partials.keys().filter(|(f, _)| *f == from).count() >= MAX_PARTIALS {
                return Err(format!("node {from} has {MAX_PARTIALS} raft messages in pieces already"));
            }
            let partial =
                Partial { pieces: vec![None; p.count as usize], have: 0, total: p.total, started: Instant::now() };
            self.partials.insert(key, partial);
        }
        let q = self.partials.get_mut(&key).expect("inserted above");
        if q.pieces.len() != p.count as usize || q.total != p.total {
            self.partials.remove(&key);
            return Err(format!("raft message piece {p:?} does not match the earlier pieces"));
        }
        if q.pieces[p.index as usize].is_none() {
            q.pieces[p.index as usize] = Some(body.to_vec());
            q.have += 1;
        }
        if q.have < p.count {
            return Ok(None);
        }
        let q = self.partials.remove(&key).expect("present");
        let whole: Vec<u8> = q.pieces.into_iter().flatten().flatten().collect();
        if whole.len() as u64 != q.total {
            return Err(format!("raft message of {} bytes put back as {}", q.total, whole.len()));
        }
        Ok(Some(whole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_in_any_order_and_repeated_give_the_message_back() {
        let msg: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut pieces = split(&msg, 4096);
        assert_eq!(pieces.len(), 25);
        pieces.reverse();
        let mut r = Reassembler::default();
        let mut out = None;
        for (i, (p, b)) in pieces.iter().enumerate() {
            if i == 3 {
                assert_eq!(r.add(2, *p, b).unwrap(), None, "a repeated piece changes nothing");
            }
            if let Some(m) = r.add(2, *p, b).unwrap() {
                out = Some(m);
            }
        }
        assert_eq!(out.as_deref(), Some(&msg[..]));
        assert!(r.partials.is_empty());
    }

    #[test]
    fn bad_pieces_are_refused() {
        let mut r = Reassembler::default();
        let p = Piece { id: 1, index: 2, count: 2, total: 10 };
        assert!(r.add(1, p, b"x").is_err());
        let p = Piece { id: 1, index: 0, count: 2, total: MAX_TOTAL + 1 };
        assert!(r.add(1, p, b"x").is_err());
        let p = Piece { id: 1, index: 0, count: 2, total: 10 };
        assert_eq!(r.add(1, p, b"01234").unwrap(), None);
        let q = Piece { id: 1, index: 1, count: 3, total: 10 };
        assert!(r.add(1, q, b"56789").is_err(), "a piece that disagrees with the first");
        for id in 10..10 + MAX_PARTIALS as u64 {
            r.add(1, Piece { id, index: 0, count: 2, total: 2 }, b"a").unwrap();
        }
        assert!(r.add(1, Piece { id: 99, index: 0, count: 2, total: 2 }, b"a").is_err());
        assert_eq!(r.add(5, Piece { id: 99, index: 0, count: 1, total: 1 }, b"a").unwrap(), Some(b"a".to_vec()));
    }
}
