//! Exactly-once application of proposals that may be sent more than once.
//!
//! A proposal that a follower forwards to the leader can be lost (the leader dies, a
//! connection drops) or arrive late, and the proposer cannot tell which; so it sends the same
//! proposal again, with the same context, until it sees the entry applied. Each context is a
//! client nonce (one per process start of a node) and a sequence number; [`Sessions`] records
//! which have been applied, so a second copy of an entry is skipped instead of applied twice
//! (a duplicated `Write` would free blocks the first one still points at).
//!
//! The table is replicated state: every node updates it in log order while applying, and it
//! travels inside snapshots (see [`encode_payload`]), so every node skips the same entries.
//! It is bounded: per client, sequence numbers more than [`WINDOW`] below the highest one
//! seen count as applied (a proposer gives up on a proposal long before that many newer ones
//! are applied), and a client not heard from in [`IDLE_ENTRIES`] log entries is forgotten.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How far behind a client's highest applied sequence number a copy may still be told apart.
pub(crate) const WINDOW: u64 = 1 << 16;
/// A client whose last entry is this many entries behind the applied index is forgotten.
pub(crate) const IDLE_ENTRIES: u64 = 1 << 22;

/// The 16-byte context every proposal carries: client nonce, sequence number.
pub(crate) fn context(nonce: u64, seq: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..8].copy_from_slice(&nonce.to_le_bytes());
    c[8..].copy_from_slice(&seq.to_le_bytes());
    c
}

/// The (nonce, seq) of a context, if it is one of ours.
pub(crate) fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let c: &[u8; 16] = c.try_into().ok()?;
    let mut a = [0u8; 8];
    a.copy_from_slice(&c[..8]);
    let nonce = u64::from_le_bytes(a);
    a.copy_from_slice(&c[8..]);
    Some((nonce, u64::from_le_bytes(a)))
}

/// One client's applied sequence numbers: every one up to `floor`, and those in `above`.
/// Proposals mostly apply in order, so `above` stays small; a number that never applies (its
/// proposal timed out) is given up on once it is `WINDOW` behind the highest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Window {
    floor: u64,
    above: BTreeSet<u64>,
    /// Log index of this client's last applied entry.
    last_index: u64,
}

impl Window {
    fn has(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sessions {
    clients: BTreeMap<u64, Window>,
}

impl Sessions {
    /// Records the entry at `index` with context (`nonce`, `seq`); true if it is the first copy
    /// (apply it), false for a duplicate (skip it).
    pub(crate) fn first_apply(&mut self, nonce: u64, seq: u64, index: u64) -> bool {
        let w = self.clients.entry(nonce).or_default();
        if w.has(seq) {
            return false;
        }
        w.above.insert(seq);
        // Contiguous numbers join the floor; a gap more than WINDOW behind is given up on.
        let max = *w.above.last().expect("just inserted");
        let give_up = max.saturating_sub(WINDOW);
        if give_up > w.floor {
            w.floor = give_up;
            w.above = w.above.split_off(&(give_up + 1));
        }
        while w.above.first() == Some(&(w.floor + 1)) {
            w.above.pop_first();
            w.floor += 1;
        }
        w.last_index = index;
        if index.is_multiple_of(4096) {
            self.clients.retain(|_, w| w.last_index.saturating_add(IDLE_ENTRIES) > index);
        }
        true
    }

    /// Whether (`nonce`, `seq`) has been applied (or is too old to tell: counted as applied).
    pub(crate) fn applied(&self, nonce: u64, seq: u64) -> bool {
        self.clients.get(&nonce).is_some_and(|w| w.has(seq))
    }
}

/// Snapshot payload as the driver stores and ships it (the snapshot file's data, the data of
/// a Raft snapshot message): `sessions_len u64 LE | sessions (postcard) | state bytes`.
pub(crate) fn encode_payload(sessions: &Sessions, state: &[u8]) -> Result<Vec<u8>, String> {
    let s = postcard::to_allocvec(sessions).map_err(|e| format!("sessions: {e}"))?;
    let mut out = Vec::with_capacity(8 + s.len() + state.len());
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(&s);
    out.extend_from_slice(state);
    Ok(out)
}

/// Inverse of [`encode_payload`].
pub(crate) fn decode_payload(data: &[u8]) -> Result<(Sessions, &[u8]), String> {
    let len = data.get(..8).ok_or("snapshot payload shorter than its header")?;
    let mut a = [0u8; 8];
    a.copy_from_slice(len);
    let len = usize::try_from(u64::from_le_bytes(a)).map_err(|_| "sessions length overflows")?;
    let end = 8usize.checked_add(len).filter(|e| *e <= data.len()).ok_or("sessions overrun the snapshot payload")?;
    let sessions = postcard::from_bytes(&data[8..end]).map_err(|e| format!("sessions do not decode: {e}"))?;
    Ok((sessions, &data[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_applied_once_in_any_order() {
        let mut s = Sessions::default();
        assert!(s.first_apply(7, 2, 10));
        assert!(s.first_apply(7, 1, 11), "an older sequence number not seen yet still applies");
        assert!(!s.first_apply(7, 2, 12));
        assert!(!s.first_apply(7, 1, 13));
        assert!(s.first_apply(8, 1, 14), "clients are independent");
        assert!(s.applied(7, 1) && s.applied(7, 2) && !s.applied(7, 3));
    }

    #[test]
    fn in_order_numbers_keep_the_table_small() {
        let mut s = Sessions::default();
        for seq in 1..=100_000 {
            assert!(s.first_apply(9, seq, seq));
        }
        let w = &s.clients[&9];
        assert_eq!((w.floor, w.above.len()), (100_000, 0));
        // A gap (a proposal that never applied) is given up on once WINDOW behind.
        assert!(s.first_apply(9, 100_002, 1));
        assert!(s.first_apply(9, 100_003 + WINDOW, 2));
        assert!(s.applied(9, 100_001), "given up on: counted as applied");
        assert!(s.clients[&9].above.len() <= 2);
    }

    #[test]
    fn sequence_numbers_far_behind_count_as_applied() {
        let mut s = Sessions::default();
        assert!(s.first_apply(1, WINDOW + 10, 1));
        assert!(!s.first_apply(1, 5, 2));
        assert!(s.applied(1, 5));
        assert!(s.first_apply(1, 11, 3), "inside the window");
    }

    #[test]
    fn payload_round_trips_and_rejects_garbage() {
        let mut s = Sessions::default();
        s.first_apply(3, 4, 5);
        let p = encode_payload(&s, b"state").unwrap();
        let (back, state) = decode_payload(&p).unwrap();
        assert_eq!((back, state), (s, &b"state"[..]));
        assert!(decode_payload(&p[..4]).is_err());
        let mut bad = p.clone();
        bad[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_payload(&bad).is_err());
    }
}
