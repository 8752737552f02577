//! Snapshot encoding of a `MetaState`, and the `StateMachine` impl the Raft driver uses.
//!
//! Layout: magic `b"TPMS"`, format version (u32 LE), crc32c of the payload (u32 LE), then
//! the postcard encoding of `MetaState`. Version 4 (written now) added the cluster's nodes;
//! version 3 the cold tier; version 2 the access keys. Versions 1 to 3 are still read and
//! migrated: no nodes (v1-v3), no access
//! keys (v1), and every block `Dirty` with `written` 0 (before version 3 nothing was ever
//! uploaded, so a v1/v2 locator never named a real object and the NVMe copy is the data).
//! A newer version is a clear error (this build cannot know its layout), never a panic.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{
    AccessKey, Applied, BlockId, BlockMeta, BlockState, Command, Ino, Inode, MetaError, MetaState, ObjectId,
    ObjectMeta, SNAPSHOT_VERSION,
};

/// The version 1 and 2 layout of a block's state, kept to read old snapshots. Do not change it.
#[derive(Deserialize)]
#[allow(dead_code)] // the payloads are decoded (postcard needs their shape) but not used
enum BlockStateV2 {
    Dirty,
    Clean(LocatorV2),
    Cold(LocatorV2),
    Rehydrating(LocatorV2),
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct LocatorV2 {
    key: String,
    offset: u64,
    len: u32,
    crc: u32,
}

#[derive(Deserialize)]
struct BlockMetaV2 {
    len: u32,
    #[allow(dead_code)]
    state: BlockStateV2,
    refs: u32,
}

/// The version 1 layout of `MetaState`. Do not change it.
#[derive(Deserialize)]
struct MetaStateV1 {
    inodes: BTreeMap<Ino, Inode>,
    entries: BTreeMap<Ino, BTreeMap<Vec<u8>, Ino>>,
    blocks: BTreeMap<BlockId, BlockMetaV2>,
    next_ino: Ino,
    next_block_id: BlockId,
    applied: u64,
}

/// The version 2 layout of `MetaState`. Do not change it.
#[derive(Deserialize)]
struct MetaStateV2 {
    inodes: BTreeMap<Ino, Inode>,
    entries: BTreeMap<Ino, BTreeMap<Vec<u8>, Ino>>,
    blocks: BTreeMap<BlockId, BlockMetaV2>,
    next_ino: Ino,
    next_block_id: BlockId,
    applied: u64,
    access_keys: BTreeMap<String, AccessKey>,
}

impl From<MetaStateV1> for MetaStateV2 {
    fn from(v: MetaStateV1) -> Self {
        MetaStateV2 {
            inodes: v.inodes,
            entries: v.entries,
            blocks: v.blocks,
            next_ino: v.next_ino,
            next_block_id: v.next_block_id,
            applied: v.applied,
            access_keys: BTreeMap::new(),
        }
    }
}

impl From<MetaStateV2> for MetaStateV3 {
    fn from(v: MetaStateV2) -> Self {
        let blocks: BTreeMap<BlockId, BlockMeta> = v
            .blocks
            .into_iter()
            .map(|(id, b)| (id, BlockMeta { len: b.len, state: BlockState::Dirty, refs: b.refs, written: 0 }))
            .collect();
        let dirty_bytes = blocks.values().map(|b| u64::from(b.len)).sum();
        MetaStateV3 {
            inodes: v.inodes,
            entries: v.entries,
            blocks,
            next_ino: v.next_ino,
            next_block_id: v.next_block_id,
            applied: v.applied,
            access_keys: v.access_keys,
            objects: BTreeMap::new(),
            pins: BTreeSet::new(),
            dirty_bytes,
            manifest_epoch: 0,
            manifest_oldest_retained: 0,
        }
    }
}

/// The version 3 layout of `MetaState`. Do not change it.
#[derive(Deserialize)]
struct MetaStateV3 {
    inodes: BTreeMap<Ino, Inode>,
    entries: BTreeMap<Ino, BTreeMap<Vec<u8>, Ino>>,
    blocks: BTreeMap<BlockId, BlockMeta>,
    next_ino: Ino,
    next_block_id: BlockId,
    applied: u64,
    access_keys: BTreeMap<String, AccessKey>,
    objects: BTreeMap<ObjectId, ObjectMeta>,
    pins: BTreeSet<Ino>,
    dirty_bytes: u64,
    manifest_epoch: u64,
    manifest_oldest_retained: u64,
}

impl From<MetaStateV3> for MetaState {
    fn from(v: MetaStateV3) -> Self {
        MetaState {
            inodes: v.inodes,
            entries: v.entries,
            blocks: v.blocks,
            next_ino: v.next_ino,
            next_block_id: v.next_block_id,
            applied: v.applied,
            access_keys: v.access_keys,
            objects: v.objects,
            pins: v.pins,
            dirty_bytes: v.dirty_bytes,
            manifest_epoch: v.manifest_epoch,
            manifest_oldest_retained: v.manifest_oldest_retained,
            nodes: BTreeMap::new(),
            frozen: false,
        }
    }
}

/// Postcard-decode the whole payload as a `T` (no trailing bytes).
fn decode_payload<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, String> {
    let (value, rest): (T, _) =
        postcard::take_from_bytes(payload).map_err(|e| format!("meta snapshot payload undecodable: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("meta snapshot has {} trailing bytes", rest.len()));
    }
    Ok(value)
}

const MAGIC: &[u8; 4] = b"TPMS";
const HEADER_LEN: usize = 12;

impl MetaState {
    pub fn encode_snapshot(&self) -> Vec<u8> {
        // Invariant: every type in MetaState is plain data that postcard can always encode
        // (no maps with unserialisable keys, no custom Serialize impls that fail).
        let payload = postcard::to_stdvec(self).expect("postcard encodes plain data");
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Inverse of [`MetaState::encode_snapshot`]; also checks the invariants of the result.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<MetaState, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("meta snapshot truncated: header needs {HEADER_LEN} bytes, got {}", bytes.len()));
        }
        let (header, payload) = bytes.split_at(HEADER_LEN);
        if &header[0..4] != MAGIC {
            return Err(format!("not a meta snapshot: bad magic {:02x?}", &header[0..4]));
        }
        let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(format!("unsupported meta snapshot version found={version} supported=1..={SNAPSHOT_VERSION}"));
        }
        let want = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let got = crc32c::crc32c(payload);
        if want != got {
            return Err(format!(
                "meta snapshot checksum mismatch (corrupt or truncated) expected={want:#010x} actual={got:#010x} payload_len={}",
                payload.len()
            ));
        }
        let state: MetaState = match version {
            1 => MetaStateV3::from(MetaStateV2::from(decode_payload::<MetaStateV1>(payload)?)).into(),
            2 => MetaStateV3::from(decode_payload::<MetaStateV2>(payload)?).into(),
            3 => decode_payload::<MetaStateV3>(payload)?.into(),
            _ => decode_payload(payload)?,
        };
        state.check_invariants().map_err(|e| format!("meta snapshot inconsistent: {e}"))?;
        Ok(state)
    }
}

impl crate::raft::StateMachine for MetaState {
    type Command = Command;
    type Output = Result<Applied, MetaError>;

    fn apply(&mut self, cmd: Command) -> Self::Output {
        MetaState::apply(self, &cmd)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.encode_snapshot()
    }

    fn restore(data: &[u8]) -> Result<Self, String> {
        MetaState::decode_snapshot(data)
    }
}
