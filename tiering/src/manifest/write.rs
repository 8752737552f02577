//! Writing a manifest: records into one zstd stream, cut into parts as it grows, then the
//! root (only if absent), then `LATEST` (see `mod.rs` for the order and why).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use tidepool_cluster::MetaState;
use tidepool_cluster::meta::{Ino, InodeKind};

use super::{Header, LATEST_KEY, ManifestError, Record, Result, Root, Summary, encode_latest, encode_root};
use super::{epoch_of_key, part_key, root_key};
use crate::{ObjectStore, PutIfAbsent};

pub struct ManifestWriter {
    store: Arc<dyn ObjectStore>,
    epoch: u64,
    part_bytes: usize,
    enc: Option<zstd::stream::write::Encoder<'static, Vec<u8>>>,
    parts: Vec<(String, u64, u32)>,
    crc: u32,
    records: u64,
    summary: Summary,
}

impl ManifestWriter {
    /// A writer of manifest `epoch`, putting a part whenever `part_bytes` of compressed data
    /// are ready.
    pub fn new(store: Arc<dyn ObjectStore>, epoch: u64, part_bytes: usize) -> Result<Self> {
        let enc = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
        Ok(ManifestWriter {
            store,
            epoch,
            part_bytes: part_bytes.max(1),
            enc: Some(enc),
            parts: Vec::new(),
            crc: 0,
            records: 0,
            summary: Summary::default(),
        })
    }

    fn count(&mut self, rec: &Record) {
        let s = &mut self.summary;
        match rec {
            Record::Inode { inode, .. } => match inode.attr.kind {
                InodeKind::File => {
                    s.files += 1;
                    s.file_bytes += inode.attr.size;
                }
                InodeKind::Dir => s.dirs += 1,
                InodeKind::Symlink => s.symlinks += 1,
            },
            Record::Block { meta, .. } => {
                s.blocks += 1;
                s.block_bytes += u64::from(meta.len);
            }
            Record::Object { meta, .. } => {
                s.objects += 1;
                s.object_bytes += meta.size_bytes;
            }
            _ => {}
        }
    }

    fn encode(&mut self, rec: &Record) -> Result<()> {
        // Invariant: records are plain data postcard always encodes.
        let body = postcard::to_stdvec(rec).expect("postcard encodes plain data");
        let len = u32::try_from(body.len()).map_err(|_| ManifestError::Corrupt("record over 4 GiB".into()))?;
        let mut framed = Vec::with_capacity(body.len() + 4);
        framed.extend_from_slice(&len.to_le_bytes());
        framed.extend_from_slice(&body);
        if !matches!(rec, Record::End { .. }) {
            self.crc = crc32c::crc32c_append(self.crc, &framed);
            self.records += 1;
        }
        // Invariant: `enc` is Some until `finish` takes it.
        self.enc.as_mut().expect("encoder until finish").write_all(&framed)?;
        Ok(())
    }

    /// Appends one record; puts a part when enough compressed bytes are ready.
    pub async fn push(&mut self, rec: &Record) -> Result<()> {
        self.count(rec);
        self.encode(rec)?;
        let ready = self.enc.as_ref().map_or(0, |e| e.get_ref().len());
        if ready >= self.part_bytes {
            let data = std::mem::take(self.enc.as_mut().expect("encoder until finish").get_mut());
            self.put_part(data).await?;
        }
        Ok(())
    }

    async fn put_part(&mut self, data: Vec<u8>) -> Result<()> {
        let n = u32::try_from(self.parts.len()).map_err(|_| ManifestError::Corrupt("too many parts".into()))?;
        let key = part_key(self.epoch, n);
        let (len, crc) = (data.len() as u64, crc32c::crc32c(&data));
        self.store.put(&key, Bytes::from(data)).await?;
        self.parts.push((key, len, crc));
        Ok(())
    }

    /// Ends the stream, puts the last part and the root. Does not switch `LATEST`.
    pub async fn finish(mut self, created_unix_nanos: i64) -> Result<Root> {
        let end = Record::End { records: self.records, crc: self.crc };
        self.encode(&end)?;
        let last = self.enc.take().expect("encoder until finish").finish()?;
        if !last.is_empty() || self.parts.is_empty() {
            self.put_part(last).await?;
        }
        let root = Root {
            epoch: self.epoch,
            created_unix_nanos,
            parts: self.parts,
            records: self.records,
            stream_crc: self.crc,
            summary: self.summary,
        };
        let key = root_key(self.epoch);
        match self.store.put_if_absent(&key, Bytes::from(encode_root(&root))).await? {
            PutIfAbsent::Created => Ok(root),
            PutIfAbsent::Exists => Err(ManifestError::Corrupt(format!(
                "{key} already exists: another writer made manifest epoch {} (two clusters on one bucket?)",
                self.epoch
            ))),
        }
    }
}

/// Makes `epoch` the manifest a new cluster starts from: the commit point, written last.
pub async fn switch_latest(store: &Arc<dyn ObjectStore>, epoch: u64) -> Result<()> {
    store.put(LATEST_KEY, Bytes::from(encode_latest(epoch))).await?;
    Ok(())
}

/// Deletes the roots and parts of manifests older than `oldest_retained`. Returns objects deleted.
pub async fn delete_older_than(store: &Arc<dyn ObjectStore>, oldest_retained: u64) -> Result<u64> {
    let mut old = Vec::new();
    let mut next = None;
    loop {
        let page = store.list("manifests/", next.take(), 1000).await?;
        old.extend(page.objects.into_iter().filter(|o| epoch_of_key(&o.key).is_some_and(|e| e < oldest_retained)));
        match page.next {
            Some(n) => next = Some(n),
            None => break,
        }
    }
    // Roots first: a root without its parts would be a manifest that cannot be read.
    old.sort_by_key(|o| !o.key.ends_with(".tpm"));
    for o in &old {
        store.delete(&o.key).await?;
    }
    Ok(old.len() as u64)
}

/// Writes `state` as manifest `epoch` (every block must be tiered) and returns its root.
/// `heat` ranks files for rehydration; `settings` travel with it.
pub async fn write_state(
    store: Arc<dyn ObjectStore>,
    epoch: u64,
    state: &MetaState,
    heat: &BTreeMap<Ino, u64>,
    settings: BTreeMap<String, String>,
    part_bytes: usize,
    created_unix_nanos: i64,
) -> Result<Root> {
    if state.dirty_bytes != 0 {
        return Err(ManifestError::Corrupt(format!(
            "refusing to write a manifest with {} dirty bytes (not in the bucket)",
            state.dirty_bytes
        )));
    }
    let mut w = ManifestWriter::new(store, epoch, part_bytes)?;
    w.push(&Record::Header(Header {
        epoch,
        next_ino: state.next_ino,
        next_block_id: state.next_block_id,
        applied: state.applied,
        manifest_oldest_retained: state.manifest_oldest_retained,
        settings,
    }))
    .await?;
    for (ino, inode) in &state.inodes {
        w.push(&Record::Inode { inode: inode.clone(), heat: heat.get(ino).copied().unwrap_or(0) }).await?;
    }
    for (ino, entries) in &state.entries {
        let entries = entries.iter().map(|(n, c)| (n.clone(), *c)).collect();
        w.push(&Record::Dir { ino: *ino, entries }).await?;
    }
    for (id, meta) in &state.blocks {
        w.push(&Record::Block { id: *id, meta: meta.clone() }).await?;
    }
    for (id, meta) in &state.objects {
        w.push(&Record::Object { id: *id, meta: meta.clone() }).await?;
    }
    for ino in &state.pins {
        w.push(&Record::Pin { ino: *ino }).await?;
    }
    w.finish(created_unix_nanos).await
}
