//! Reading a manifest: `LATEST`, the root, then the parts as one stream, record by record,
//! every check made before the state is handed out.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::Arc;

use tidepool_cluster::MetaState;
use tidepool_cluster::meta::BlockState;

use super::{Header, LATEST_KEY, Loaded, ManifestError, Record, Result, Root, decode_latest, decode_root, root_key};
use crate::{ObjectError, ObjectStore};

/// The epoch `LATEST` names; `NoLatest` if there is none.
pub async fn read_latest(store: &Arc<dyn ObjectStore>) -> Result<u64> {
    match store.get(LATEST_KEY, None).await {
        Ok(b) => decode_latest(&String::from_utf8_lossy(&b)),
        Err(ObjectError::NotFound(_)) => Err(ManifestError::NoLatest(format!("{}/{LATEST_KEY}", store.describe()))),
        Err(e) => Err(e.into()),
    }
}

/// The parts of one manifest as one byte stream; each part is checked as it arrives.
struct Parts {
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Handle,
    parts: std::vec::IntoIter<(String, u64, u32)>,
    cur: bytes::Bytes,
}

impl Read for Parts {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            let Some((key, len, crc)) = self.parts.next() else { return Ok(0) };
            let data = self.rt.block_on(self.store.get(&key, None)).map_err(std::io::Error::other)?;
            if data.len() as u64 != len || crc32c::crc32c(&data) != crc {
                return Err(std::io::Error::other(format!("manifest part {key} fails its length or checksum")));
            }
            self.cur = data;
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Reads manifest `epoch` whole and checks it; nothing is returned from a bad one.
pub async fn read_manifest(store: &Arc<dyn ObjectStore>, epoch: u64) -> Result<Loaded> {
    let key = root_key(epoch);
    let root = match store.get(&key, None).await {
        Ok(b) => decode_root(&b)?,
        Err(ObjectError::NotFound(_)) => {
            return Err(ManifestError::Corrupt(format!("LATEST names epoch {epoch} but {key} is missing")));
        }
        Err(e) => return Err(e.into()),
    };
    if root.epoch != epoch {
        return Err(ManifestError::Corrupt(format!("{key} says epoch {}", root.epoch)));
    }
    let parts = Parts {
        store: store.clone(),
        rt: tokio::runtime::Handle::current(),
        parts: root.parts.clone().into_iter(),
        cur: bytes::Bytes::new(),
    };
    tokio::task::spawn_blocking(move || decode_stream(root, parts))
        .await
        .map_err(|e| ManifestError::Corrupt(format!("manifest reader failed: {e}")))?
}

fn decode_stream(root: Root, parts: Parts) -> Result<Loaded> {
    let corrupt = |why: String| ManifestError::Corrupt(why);
    let mut dec = zstd::stream::read::Decoder::new(parts).map_err(|e| corrupt(format!("zstd: {e}")))?;
    let mut state = MetaState::new();
    state.inodes.clear();
    state.entries.clear();
    let mut header: Option<Header> = None;
    let mut heat = BTreeMap::new();
    let (mut crc, mut records) = (0u32, 0u64);
    let mut pins = BTreeSet::new();
    loop {
        let mut len = [0u8; 4];
        read_exact(&mut dec, &mut len, "a record length")?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        read_exact(&mut dec, &mut body, "a record")?;
        let rec: Record = postcard::from_bytes(&body).map_err(|e| corrupt(format!("record undecodable: {e}")))?;
        if let Record::End { records: n, crc: c } = rec {
            if n != records || c != crc || n != root.records || c != root.stream_crc {
                return Err(corrupt(format!("end record does not match records={records} crc={crc:#010x}")));
            }
            let mut extra = [0u8; 1];
            if dec.read(&mut extra).map_err(|e| corrupt(format!("after the end record: {e}")))? != 0 {
                return Err(corrupt("bytes after the end record".into()));
            }
            break;
        }
        crc = crc32c::crc32c_append(crc32c::crc32c_append(crc, &len), &body);
        records += 1;
        match rec {
            Record::Header(h) => {
                if header.is_some() || records != 1 {
                    return Err(corrupt("header not first or twice".into()));
                }
                header = Some(h);
            }
            _ if header.is_none() => return Err(corrupt("records before the header".into())),
            Record::Inode { inode, heat: h } => {
                heat.insert(inode.attr.ino, h);
                state.inodes.insert(inode.attr.ino, inode);
            }
            Record::Dir { ino, entries } => {
                state.entries.insert(ino, entries.into_iter().collect());
            }
            Record::Block { id, meta } => {
                if meta.state == BlockState::Dirty {
                    return Err(corrupt(format!("block {id} is dirty in a manifest")));
                }
                state.blocks.insert(id, meta);
            }
            Record::Object { id, meta } => {
                state.objects.insert(id, meta);
            }
            Record::Pin { ino } => {
                pins.insert(ino);
            }
            Record::End { .. } => unreachable!("handled above"),
        }
    }
    let header = header.ok_or_else(|| corrupt("no header".into()))?;
    state.next_ino = header.next_ino;
    state.next_block_id = header.next_block_id;
    state.applied = header.applied;
    state.manifest_epoch = header.epoch;
    state.manifest_oldest_retained = header.manifest_oldest_retained;
    state.pins = pins;
    state.dirty_bytes = 0;
    state.check_invariants().map_err(|e| corrupt(format!("inconsistent metadata: {e}")))?;
    Ok(Loaded { root, header, state, heat })
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            ManifestError::Corrupt(format!("truncated: the stream ends inside {what}"))
        }
        _ => ManifestError::Corrupt(format!("reading {what}: {e}")),
    })
}
