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

use std::future::Future;

use bytes::Bytes;
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

/// A piece of a planned read: its file offset, the block range, and the block's length.
type Planned = (u64, Extent, u32);

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

    /// [`Fs::stage`] of a buffer the caller gives up (an S3 PUT's body, a block at a time):
    /// once the blocks are written, each whole block of at least 1 MiB also goes into the read
    /// cache as it is, without a copy (`cache.rs`, "Writes"), so that a read soon after is
    /// served from RAM. Not when the buffer's capacity is well over its length (its spare
    /// room would be held by the cache uncounted).
    pub async fn stage_owned(&self, data: Vec<u8>) -> Result<Staged> {
        let staged = self.stage(&data).await?;
        if let Some(cache) = &self.cache
            && data.capacity() - data.len() <= data.len() / 8
        {
            let data = Bytes::from(data);
            let mut at = 0;
            for b in &staged.blocks {
                let len = b.len as usize;
                if len >= crate::cache::SHARE_MIN {
                    cache.insert_kept(b.id, 0, data.slice(at..at + len));
                }
                at += len;
            }
        }
        Ok(staged)
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
        let buf = self.read_planned(ino, offset, len, |n, extents| self.read_extents(offset, n, extents)).await?;
        self.metrics.bytes_read(buf.len() as u64);
        Ok(buf)
    }

    /// [`Fs::read`] as pieces in file order, each a `Bytes`, that together are the answer:
    /// up to `len` bytes at `offset`, shorter at end of file, holes as zeros. A range read
    /// from this node's store is the store's verified read buffer itself (no copy); one the
    /// read cache holds is copied out of it once; a hole is a zeroed piece. For callers that
    /// pass the bytes on (an S3 GET body) rather than need them in one buffer. Every byte is
    /// checked as for [`Fs::read`]: a page that fails its checksum is an error, never a piece.
    pub async fn read_bytes(&self, ino: Ino, offset: u64, len: usize) -> Result<Vec<Bytes>> {
        self.metrics.op(Op::Read);
        let pieces = self.read_planned(ino, offset, len, |n, extents| self.read_pieces(offset, n, extents)).await?;
        self.metrics.bytes_read(pieces.iter().map(|p| p.len() as u64).sum());
        Ok(pieces)
    }

    /// Plans the read of `len` bytes at `offset` of `ino` and has `read` read the plan (the
    /// clipped length and the extents), planning again when a concurrent overwrite freed a
    /// block between plan and read.
    async fn read_planned<'a, T, F, Fut>(&'a self, ino: Ino, offset: u64, len: usize, read: F) -> Result<T>
    where
        F: Fn(usize, Vec<Planned>) -> Fut,
        Fut: Future<Output = Result<T>> + 'a,
    {
        self.sync().await?;
        let mut attempt = 0;
        loop {
            let (plan_len, extents) = self.plan_read(ino, offset, len)?;
            match read(plan_len, extents).await {
                Ok(v) => return Ok(v),
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

    /// The read length (clipped to the file size) and the extents covering it, each with the
    /// length of its block (0 if the block table does not have it: then it is not cached).
    fn plan_read(&self, ino: Ino, offset: u64, len: usize) -> Result<(usize, Vec<Planned>)> {
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
            let extents = s.extents_in(ino, offset, n)?;
            Ok((
                n as usize,
                extents
                    .into_iter()
                    .map(|(at, e)| {
                        let block_len = s.blocks.get(&e.block).map_or(0, |b| b.len);
                        (at, e, block_len)
                    })
                    .collect(),
            ))
        })
    }

    /// Reads the extents (in file order, within `offset..offset + len`) into one buffer, each
    /// block range straight into its part of it, in parallel; holes stay zero.
    async fn read_extents(&self, offset: u64, len: usize, extents: Vec<Planned>) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        {
            let mut rest: &mut [u8] = &mut buf;
            let mut at = offset;
            let mut reads = Vec::with_capacity(extents.len());
            for (file_off, e, block_len) in &extents {
                // Extents come sorted, disjoint and clipped to the range (`extents_in`).
                let (_, tail) = std::mem::take(&mut rest).split_at_mut((file_off - at) as usize);
                let (part, tail) = tail.split_at_mut(e.len as usize);
                rest = tail;
                at = file_off + e.len;
                reads.push(self.read_block_into(e.block, e.block_offset, *block_len, part));
            }
            try_join_all(reads).await?;
        }
        self.touch_cold(&extents);
        Ok(buf)
    }

    /// Reads the extents (in file order, within `offset..offset + len`) as pieces, each block
    /// range in parallel, with a zeroed piece for each hole between and around them.
    async fn read_pieces(&self, offset: u64, len: usize, extents: Vec<Planned>) -> Result<Vec<Bytes>> {
        let reads =
            extents.iter().map(|(_, e, block_len)| self.read_block_bytes(e.block, e.block_offset, e.len, *block_len));
        let data = try_join_all(reads).await?;
        let end = offset + len as u64;
        let mut pieces = Vec::with_capacity(2 * data.len() + 1);
        let mut at = offset;
        // Extents come sorted, disjoint and clipped to the range (`extents_in`).
        for ((file_off, e, _), d) in extents.iter().zip(data) {
            if *file_off > at {
                pieces.push(zeros(file_off - at));
            }
            pieces.push(d);
            at = file_off + e.len;
        }
        if end > at {
            pieces.push(zeros(end - at));
        }
        self.touch_cold(&extents);
        Ok(pieces)
    }

    /// Tells the cold tier which blocks a read used (its eviction is least recently used).
    fn touch_cold(&self, extents: &[Planned]) {
        if let Some(cold) = self.cold() {
            let ids: Vec<u64> = extents.iter().map(|(_, e, _)| e.block).collect();
            cold.touch(&ids);
        }
    }

    /// Bytes `offset..offset + len` of block `id` (`block_len` bytes long): from the read
    /// cache when it holds every page of the range (copied out once), else from the source
    /// (`read_block`, the store's buffer itself for a local block). A miss reads the whole
    /// pages covering the range, puts them in the cache (as `read_block_into` does) and
    /// answers a slice of them.
    async fn read_block_bytes(&self, id: u64, offset: u32, len: u64, block_len: u32) -> Result<Bytes> {
        let len = u32::try_from(len).map_err(|_| FsError::Invalid("block range over 4 GiB"))?;
        let end = offset.checked_add(len).ok_or(FsError::Invalid("block range past 4 GiB"))?;
        let cache = self.cache.as_ref().filter(|_| len > 0 && end <= block_len);
        let Some(cache) = cache else {
            let data = self.read_block(id, offset, len).await?;
            check_len(&data, len as usize, id)?;
            return Ok(data);
        };
        if let Some(b) = cache.read_bytes(id, offset, len as usize) {
            return Ok(b);
        }
        let (start, stop) = covering_pages(offset, len as usize, block_len);
        let data = self.read_block(id, start, stop - start).await?;
        let skip = (offset - start) as usize;
        let want = skip + len as usize;
        let piece = if data.len() >= want { data.slice(skip..want) } else { Bytes::new() };
        check_len(&piece, len as usize, id)?;
        cache.insert(id, start / crate::cache::PAGE as u32, &data);
        Ok(piece)
    }

    /// Bytes `offset..offset + out.len()` of block `id` (`block_len` bytes long) into `out`:
    /// from the read cache when it holds every page of the range (one copy), else from the
    /// source (`read_block`). A miss reads the whole pages covering the range (the store reads
    /// them anyway to check their crcs), puts them in the cache, then copies the range out.
    /// Only verified bytes reach the cache: `read_block` answers an error for a page that
    /// fails its checksum, and then nothing is inserted.
    async fn read_block_into(&self, id: u64, offset: u32, block_len: u32, out: &mut [u8]) -> Result<()> {
        let len = u32::try_from(out.len()).map_err(|_| FsError::Invalid("block range over 4 GiB"))?;
        let end = offset.checked_add(len).ok_or(FsError::Invalid("block range past 4 GiB"))?;
        let cache = self.cache.as_ref().filter(|_| len > 0 && end <= block_len);
        let Some(cache) = cache else {
            let data = self.read_block(id, offset, len).await?;
            return copy_exact(out, &data, id);
        };
        if cache.read(id, offset, out) {
            return Ok(());
        }
        let (start, stop) = covering_pages(offset, out.len(), block_len);
        let data = self.read_block(id, start, stop - start).await?;
        let skip = (offset - start) as usize;
        copy_exact(out, data.get(skip..skip + out.len()).unwrap_or_default(), id)?;
        cache.insert(id, start / crate::cache::PAGE as u32, &data);
        Ok(())
    }

    /// A byte range of one block: from NVMe (this node's, then the cluster's), or through the
    /// cold tier if the block is tiered and on no NVMe (evicted, or never fetched after a
    /// rehydrate).
    async fn read_block(&self, id: u64, offset: u32, len: u32) -> Result<Bytes> {
        match self.read_block_hot_bytes(id, offset, len).await {
            Err(FsError::Store(StoreError::NotFound(id))) => match (self.cold(), self.locator(id)) {
                (Some(cold), Some(loc)) => cold.read_through(id, loc, offset, len).await.map(Bytes::from),
                _ => Err(StoreError::NotFound(id).into()),
            },
            res => res,
        }
    }
}

/// The page-aligned range `start..stop` covering `len > 0` bytes at `offset` of a block of
/// `block_len` bytes (its last page may be short): what a cache miss reads and inserts.
fn covering_pages(offset: u32, len: usize, block_len: u32) -> (u32, u32) {
    let (first, last) = crate::cache::pages_of(offset, len);
    let start = first * crate::cache::PAGE as u32;
    let stop = ((u64::from(last) + 1) * crate::cache::PAGE as u64).min(u64::from(block_len)) as u32;
    (start, stop)
}

/// Copies a block range read from a source into its place, checking the source gave as many
/// bytes as asked.
fn copy_exact(out: &mut [u8], data: &[u8], id: u64) -> Result<()> {
    check_len(data, out.len(), id)?;
    out.copy_from_slice(data);
    Ok(())
}

/// Checks that a source gave as many bytes of a block range as asked.
fn check_len(data: &[u8], want: usize, id: u64) -> Result<()> {
    if data.len() != want {
        tracing::error!(block_id = id, want, got = data.len(), "block range read returned the wrong length");
        return Err(FsError::Invalid("block range read returned the wrong length"));
    }
    Ok(())
}

/// A hole's piece of a read: `len` zero bytes (fresh zeroed memory from the allocator).
fn zeros(len: u64) -> Bytes {
    Bytes::from(vec![0u8; len as usize])
}
