//! File data: write (new immutable blocks, then one metadata commit), publish (a whole new
//! file with its metadata, created or replacing one, in one commit), concat (extents moved
//! between files) and read (extents, then block ranges in parallel).
//!
//! Write order is the crash-safety argument: (1) put the new blocks, (2) flush the block
//! store, (3) commit the extents through the meta group (fsync'd Raft log), (4) free the
//! blocks the commit released. A crash before (3) leaves unreferenced blocks that the next
//! open frees; after (3) the write is whole. A write is acknowledged only after (3), so
//! every acknowledged write survives, and an unacknowledged one is either whole or absent.

use std::collections::BTreeMap;

use futures_util::future::try_join_all;
use tidepool_cluster::meta::{Attr, Command, Extent, Ino, InodeKind, Nanos, NewBlock};
use tidepool_spdk::StoreError;

use crate::metrics::Op;
use crate::{Fs, FsError, Result};

/// Blocks put by [`Fs::stage`] and not yet laid into a file. Several can be joined with
/// [`Staged::append`] to commit a streamed body at once.
#[derive(Debug, Default)]
#[must_use = "staged blocks leak until the next open unless committed or discarded"]
pub struct Staged {
    blocks: Vec<NewBlock>,
}

impl Staged {
    pub fn append(&mut self, mut other: Staged) {
        self.blocks.append(&mut other.blocks);
    }

    pub fn len_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.len as u64).sum()
    }
}

/// How often a read retries when a block it planned to read was freed under it by a
/// concurrent overwrite (it then re-reads the extents, which name the new blocks).
const READ_RETRIES: usize = 8;

impl Fs {
    /// Write `data` at `offset` of file `ino`; returns the new attributes.
    pub async fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<Attr> {
        self.metrics.op(Op::Write);
        self.check_writable()?;
        let attr = self.check_file(ino)?;
        if data.is_empty() {
            return Ok(attr);
        }
        let staged = self.stage(data).await?;
        self.commit_staged(ino, offset, staged).await
    }

    fn check_file(&self, ino: Ino) -> Result<Attr> {
        let attr = self.getattr(ino)?;
        match attr.kind {
            InodeKind::File => Ok(attr),
            InodeKind::Dir => Err(tidepool_cluster::MetaError::IsDir(ino).into()),
            InodeKind::Symlink => Err(FsError::NotFile(ino)),
        }
    }

    /// Put `data` into new blocks that no file references yet (a streamed upload stages its
    /// body piece by piece, then commits once). Staged blocks are not durable until
    /// [`Fs::commit_staged`]; if the process dies first, the next open frees them.
    pub async fn stage(&self, data: &[u8]) -> Result<Staged> {
        self.check_writable()?;
        self.admit_write(data.len() as u64).await?;
        let chunks: Vec<&[u8]> = data.chunks(self.opts.block_size).collect();
        let first = self.alloc_ids(chunks.len() as u64).await?;
        let blocks: Vec<NewBlock> =
            chunks.iter().enumerate().map(|(i, c)| NewBlock { id: first + i as u64, len: c.len() as u32 }).collect();
        let puts = blocks.iter().zip(&chunks).map(|(b, c)| self.put_block(b.id, c));
        let mut res = try_join_all(puts).await;
        if let (Err(FsError::Store(StoreError::NoSpace { .. })), Some(cold)) = (&res, self.cold()) {
            // The device is full: have the cold tier evict clean blocks, then put them again.
            let freed = cold.make_room(2 * data.len() as u64).await;
            if freed > 0 {
                self.discard(&blocks).await;
                res = try_join_all(blocks.iter().zip(&chunks).map(|(b, c)| self.put_block(b.id, c))).await;
            }
        }
        if let Err(e) = res {
            self.discard(&blocks).await;
            return Err(e);
        }
        Ok(Staged { blocks })
    }

    /// Lay staged blocks end to end at `offset` of file `ino` in one metadata commit:
    /// durable and visible together when this returns, or not at all.
    pub async fn commit_staged(&self, ino: Ino, offset: u64, staged: Staged) -> Result<Attr> {
        let Staged { blocks } = staged;
        let total: u64 = blocks.iter().map(|b| b.len as u64).sum();
        let res = async {
            self.check_writable()?;
            offset.checked_add(total).ok_or(FsError::Invalid("write beyond the largest file offset"))?;
            if blocks.is_empty() {
                return self.check_file(ino);
            }
            self.store.flush().await?;
            let applied = self.commit(Command::Write { ino, offset, blocks: blocks.clone(), now: self.now() }).await?;
            applied.attr.ok_or(FsError::Invalid("write returned no inode"))
        }
        .await;
        match res {
            Ok(attr) => {
                self.metrics.bytes_written(total);
                Ok(attr)
            }
            Err(e) => {
                self.discard(&blocks).await;
                Err(e)
            }
        }
    }

    /// Make the file `name` of dir `parent` hold exactly the staged blocks (laid end to end
    /// from offset 0) and exactly the user metadata `xattrs(mtime)` returns, in ONE metadata
    /// commit (S3 PutObject / CopyObject): created if absent, or replacing a file there as a
    /// rename over it would (its blocks are freed; its ino and NFS handles go stale). Readers
    /// see the old file or the new one. `xattrs` gets the commit's time, which becomes the
    /// file's mtime (S3 binds its ETag to it). A dir of that name is `IsDir`, a symlink
    /// `Invalid`. On failure nothing changes and the staged blocks are discarded.
    #[allow(clippy::too_many_arguments)] // the fields of a new file, as `create` takes them
    pub async fn publish(
        &self,
        parent: Ino,
        name: &[u8],
        staged: Staged,
        xattrs: impl FnOnce(Nanos) -> BTreeMap<String, String>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        match self.try_publish(parent, name, staged, xattrs, mode, uid, gid).await {
            Ok(attr) => Ok(attr),
            Err((e, staged)) => {
                self.discard_staged(staged).await;
                Err(e)
            }
        }
    }

    /// [`Fs::publish`], except that on failure the staged blocks come back (still unreferenced)
    /// instead of being discarded, so the caller can retry (say, after recreating `parent`)
    /// or discard them.
    #[allow(clippy::too_many_arguments)] // as `publish`
    pub async fn try_publish(
        &self,
        parent: Ino,
        name: &[u8],
        staged: Staged,
        xattrs: impl FnOnce(Nanos) -> BTreeMap<String, String>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> std::result::Result<Attr, (FsError, Staged)> {
        self.metrics.op(Op::Write);
        let total = staged.len_bytes();
        let res = async {
            self.check_writable()?;
            if !staged.blocks.is_empty() {
                self.store.flush().await?;
            }
            let now = self.now();
            let cmd = Command::Publish {
                parent,
                name: name.to_vec(),
                blocks: staged.blocks.clone(),
                xattrs: xattrs(now),
                mode,
                uid,
                gid,
                now,
            };
            let applied = self.commit(cmd).await?;
            applied.attr.ok_or(FsError::Invalid("publish returned no inode"))
        }
        .await;
        match res {
            Ok(attr) => {
                self.metrics.bytes_written(total);
                Ok(attr)
            }
            Err(e) => Err((e, staged)),
        }
    }

    /// Append the contents of files `srcs`, in order, at the end of file `dst` and remove the
    /// sources, in one metadata commit: the extents move, no byte is copied (S3 multipart
    /// Complete). Sources are distinct files other than `dst`; their names go with them.
    pub async fn concat(&self, dst: Ino, srcs: &[Ino]) -> Result<Attr> {
        self.metrics.op(Op::Write);
        self.check_writable()?;
        let applied = self.commit(Command::Concat { dst, srcs: srcs.to_vec(), now: self.now() }).await?;
        applied.attr.ok_or(FsError::Invalid("concat returned no inode"))
    }

    /// Drop staged blocks that will not be committed (an aborted upload).
    pub async fn discard_staged(&self, staged: Staged) {
        self.discard(&staged.blocks).await;
    }

    /// Remove blocks of a write that did not commit. Blocks that were never put are absent,
    /// which is fine; anything left behind is freed by the next open's reconcile.
    async fn discard(&self, blocks: &[NewBlock]) {
        let ids: Vec<u64> = blocks.iter().map(|b| b.id).collect();
        self.delete_everywhere(&ids).await;
    }

    /// `count` fresh block ids, from the local range or a new one from the meta group.
    async fn alloc_ids(&self, count: u64) -> Result<u64> {
        let mut ids = self.ids.lock().await;
        if ids.1 - ids.0 < count {
            let want = count.max(self.opts.id_batch);
            let applied = self.meta.propose(Command::AllocBlockIds { count: want }).await??;
            let first = applied.first_block_id.ok_or(FsError::Invalid("block id allocation returned no range"))?;
            *ids = (first, first + want);
        }
        let first = ids.0;
        ids.0 += count;
        Ok(first)
    }

    /// Read up to `len` bytes at `offset`; shorter at end of file; holes read as zeros.
    pub async fn read(&self, ino: Ino, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.metrics.op(Op::Read);
        self.sync().await?;
        let mut attempt = 0;
        loop {
            let (plan_len, extents) = self.plan_read(ino, offset, len)?;
            match self.read_extents(offset, plan_len, &extents).await {
                Ok(buf) => {
                    self.metrics.bytes_read(buf.len() as u64);
                    return Ok(buf);
                }
                // A concurrent overwrite freed a block between plan and read: plan again.
                Err(FsError::Store(StoreError::NotFound(id))) => {
                    attempt += 1;
                    if attempt >= READ_RETRIES || self.meta.read(|s| s.blocks.contains_key(&id)) {
                        return Err(FsError::MissingBlock(id));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The read length (clipped to the file size) and the extents covering it.
    fn plan_read(&self, ino: Ino, offset: u64, len: usize) -> Result<(usize, Vec<(u64, Extent)>)> {
        self.meta.read(|s| {
            let inode = s.inode(ino).ok_or(tidepool_cluster::MetaError::NoInode(ino))?;
            match inode.attr.kind {
                InodeKind::File => {}
                InodeKind::Dir => return Err(tidepool_cluster::MetaError::IsDir(ino).into()),
                InodeKind::Symlink => return Err(FsError::NotFile(ino)),
            }
            let size = inode.attr.size;
            if offset >= size {
                return Ok((0, Vec::new()));
            }
            let n = (size - offset).min(len as u64);
            Ok((n as usize, s.extents_in(ino, offset, n)?))
        })
    }

    async fn read_extents(&self, offset: u64, len: usize, extents: &[(u64, Extent)]) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let reads = extents.iter().map(|(file_off, e)| async move {
            let bytes = self.read_block(e.block, e.block_offset, e.len as u32).await?;
            Ok::<_, FsError>((*file_off, bytes))
        });
        for (file_off, bytes) in try_join_all(reads).await? {
            let at = (file_off - offset) as usize;
            buf[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        if let Some(cold) = self.cold() {
            let ids: Vec<u64> = extents.iter().map(|(_, e)| e.block).collect();
            cold.touch(&ids);
        }
        Ok(buf)
    }

    /// A byte range of one block: from NVMe (this node's, then the cluster's), or through the
    /// cold tier if the block is tiered and on no NVMe (evicted, or never fetched after a
    /// rehydrate).
    async fn read_block(&self, id: u64, offset: u32, len: u32) -> Result<Vec<u8>> {
        match self.read_block_hot(id, offset, len).await {
            Err(FsError::Store(StoreError::NotFound(id))) => match (self.cold(), self.locator(id)) {
                (Some(cold), Some(loc)) => cold.read_through(id, loc, offset, len).await,
                _ => Err(StoreError::NotFound(id).into()),
            },
            res => res,
        }
    }
}
