//! The toy state machine the Raft driver tests replicate: a map of counters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidepool_cluster::raft::StateMachine;

/// A key-value map of counters.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kv {
    pub map: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum KvCmd {
    /// Sets a key; outputs the previous value.
    Put(String, u64),
    /// Adds to a key; outputs the new value.
    Incr(String, u64),
}

const KV_MAGIC: &[u8; 4] = b"TOY1";

impl StateMachine for Kv {
    type Command = KvCmd;
    type Output = Option<u64>;

    fn apply(&mut self, cmd: KvCmd) -> Option<u64> {
        match cmd {
            KvCmd::Put(k, v) => self.map.insert(k, v),
            KvCmd::Incr(k, by) => {
                let v = self.map.entry(k).or_insert(0);
                *v += by;
                Some(*v)
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = KV_MAGIC.to_vec();
        // Invariant: a BTreeMap<String, u64> always encodes.
        out.extend(postcard::to_allocvec(&self.map).expect("kv map encodes"));
        out
    }

    fn restore(data: &[u8]) -> Result<Self, String> {
        let body = data.strip_prefix(KV_MAGIC).ok_or("bad toy snapshot magic")?;
        let map = postcard::from_bytes(body).map_err(|e| e.to_string())?;
        Ok(Kv { map })
    }
}
