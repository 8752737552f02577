//! Pooled NVMe: where a block's hot copies live in a cluster, and how they are written, read
//! and dropped.
//!
//! Placement is computed, not recorded: the nodes of block `id` are the cluster's members in
//! rendezvous order (highest `hash(id, node)` first), and a dirty block is written to the
//! first `replicas` of them that take it before the write is acknowledged (a node that fails
//! the put is skipped for the next one in the order, so a dead node costs no write). A read
//! tries this node's store, then the members in the same order, then the bucket; so a block
//! stays findable when membership changes, at the cost of a miss or two on the way.
//! Freed blocks are deleted by every node from its own store when it applies the commit that
//! freed them (the meta group's apply observer), so replicas and read-through copies go too.
//!
//! `Fs` knows only the [`Peers`] trait; the binary implements it over the node-to-node
//! transport and plugs it in with [`Fs::set_peers`]. Without peers (a node alone) every block
//! lives in the local store, as before.

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use tidepool_cluster::meta::BlockId;
use tidepool_spdk::StoreError;

use crate::{Fs, FsError, Result};

/// Why a peer did not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("block not on that node")]
    NotFound,
    #[error("that node's device is full")]
    NoSpace,
    /// Unreachable, timed out, refused, shutting down.
    #[error("node unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

/// The other nodes of the cluster, as far as blocks go.
#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// This node's id.
    fn local_id(&self) -> u64;
    /// The members that hold blocks, this node included, in any order.
    fn nodes(&self) -> Vec<u64>;
    /// Puts a block on `node`; returns once it is durable there.
    async fn put_block(&self, node: u64, id: BlockId, data: Bytes) -> std::result::Result<(), PeerError>;
    /// Bytes `offset..offset + len` of a block on `node`.
    async fn get_block(&self, node: u64, id: BlockId, offset: u32, len: u32)
    -> std::result::Result<Vec<u8>, PeerError>;
    /// Deletes blocks on `node` (absent ones are fine).
    async fn delete_blocks(&self, node: u64, ids: &[BlockId]) -> std::result::Result<(), PeerError>;
    /// Which of `ids` `node` holds.
    async fn has_blocks(&self, node: u64, ids: &[BlockId]) -> std::result::Result<Vec<bool>, PeerError>;
}

/// The rendezvous order of `nodes` for block `id`: highest score first. Deterministic across
/// nodes and releases (the score is a fixed 64-bit mix, not std's randomised hasher).
pub fn placement(id: BlockId, nodes: &[u64]) -> Vec<u64> {
    let mut scored: Vec<(u64, u64)> = nodes.iter().map(|n| (score(id, *n), *n)).collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.dedup_by_key(|s| s.1);
    scored.into_iter().map(|(_, n)| n).collect()
}

/// splitmix64 of the pair: well spread, and a node's scores are independent of the others'.
fn score(id: BlockId, node: u64) -> u64 {
    let mut z = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ node.rotate_left(32) ^ 0xD1B5_4A32_D192_ED03;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Fs {
    /// Plug in the cluster's peers (once, at start-up).
    pub fn set_peers(&self, peers: std::sync::Arc<dyn Peers>) {
        if self.peers.set(peers).is_err() {
            tracing::warn!("peers already set; keeping the first");
        }
    }

    pub(crate) fn peers(&self) -> Option<&std::sync::Arc<dyn Peers>> {
        self.peers.get()
    }

    /// Where block `id` goes (or is looked for): members in rendezvous order.
    pub fn placement_of(&self, id: BlockId) -> Vec<u64> {
        match self.peers() {
            Some(p) => placement(id, &p.nodes()),
            None => Vec::new(),
        }
    }

    /// Puts a new block on `replicas` nodes (this node's store alone without peers).
    /// Returns the nodes that hold it.
    pub(crate) async fn put_block(&self, id: BlockId, data: &[u8]) -> Result<Vec<u64>> {
        let Some(peers) = self.peers().filter(|_| self.opts.replicas > 1) else {
            self.store.put(id, data).await?;
            return Ok(Vec::new());
        };
        let order = placement(id, &peers.nodes());
        let want = self.opts.replicas.min(order.len().max(1));
        let bytes = Bytes::copy_from_slice(data);
        let local = peers.local_id();
        let mut held = Vec::with_capacity(want);
        let mut errors = Vec::new();
        let mut next = 0;
        // The first `want` nodes in parallel, then one more per failure, in order.
        while held.len() < want && next < order.len() {
            let batch: Vec<u64> = order[next..(next + want - held.len()).min(order.len())].to_vec();
            next += batch.len();
            let puts = batch.iter().map(|node| {
                let bytes = bytes.clone();
                async move {
                    let res = if *node == local {
                        self.store.put(id, &bytes).await.map_err(|e| match e {
                            StoreError::NoSpace { .. } => PeerError::NoSpace,
                            e => PeerError::Other(e.to_string()),
                        })
                    } else {
                        peers.put_block(*node, id, bytes).await
                    };
                    (*node, res)
                }
            });
            for (node, res) in join_all(puts).await {
                match res {
                    Ok(()) => held.push(node),
                    Err(e) => {
                        tracing::debug!(block_id = id, node, error = %e, "block put failed; next node in order");
                        errors.push(format!("node {node}: {e}"));
                    }
                }
            }
        }
        if held.len() < want {
            // Not acknowledged: drop what did land.
            self.delete_on(&held, &[id]).await;
            if errors.iter().all(|e| e.ends_with(&PeerError::NoSpace.to_string())) && !errors.is_empty() {
                return Err(StoreError::NoSpace { need: data.len() as u64, free: 0 }.into());
            }
            return Err(FsError::Unavailable(format!(
                "block {id} reached {} of {want} nodes ({})",
                held.len(),
                errors.join("; ")
            )));
        }
        Ok(held)
    }

    /// A byte range of a block from this node's store or, failing that, from the members in
    /// placement order. `StoreError::NotFound` if no node has it. Not cached: `Fs::read` asks
    /// the read cache before it comes here (`rw.rs`, `read_block_into`), while the write-back's
    /// whole-block reads of dirty blocks come here directly and must not fill the cache.
    pub async fn read_block_hot(&self, id: BlockId, offset: u32, len: u32) -> Result<Vec<u8>> {
        // A local read's buffer is the store's pooled one: copied out here, as `get` would.
        self.read_block_hot_bytes(id, offset, len).await.map(Vec::from)
    }

    /// [`Fs::read_block_hot`] as `Bytes`: a local read hands out the store's verified read
    /// buffer itself (`BlockStore::get_bytes`, no copy); a peer's answer is wrapped as it is.
    pub(crate) async fn read_block_hot_bytes(&self, id: BlockId, offset: u32, len: u32) -> Result<Bytes> {
        match self.store.get_bytes(id, offset, len).await {
            Err(StoreError::NotFound(_)) => {}
            res => return Ok(res?),
        }
        let Some(peers) = self.peers() else { return Err(StoreError::NotFound(id).into()) };
        let local = peers.local_id();
        for node in placement(id, &peers.nodes()).into_iter().filter(|n| *n != local) {
            match peers.get_block(node, id, offset, len).await {
                Ok(data) => {
                    self.metrics.peer_read(data.len() as u64);
                    return Ok(Bytes::from(data));
                }
                Err(e) => tracing::debug!(block_id = id, node, error = %e, "block not read from peer; next"),
            }
        }
        Err(StoreError::NotFound(id).into())
    }

    /// Deletes blocks on `nodes` (this node's store for its own id). Failures are logged: an
    /// unreferenced block left behind is freed by that node's reconcile.
    pub(crate) async fn delete_on(&self, nodes: &[u64], ids: &[BlockId]) {
        let local = self.peers().map(|p| p.local_id());
        for node in nodes {
            if Some(*node) == local {
                self.delete_local(ids).await;
            } else if let Some(p) = self.peers()
                && let Err(e) = p.delete_blocks(*node, ids).await
            {
                tracing::warn!(node, count = ids.len(), error = %e, "cannot delete blocks on peer");
            }
        }
    }

    /// Deletes blocks from this node's store (absent ones are fine; a failure is logged and
    /// the block freed by the next open's reconcile).
    async fn delete_local(&self, ids: &[BlockId]) {
        for id in ids {
            self.uncache(*id);
            match self.store.delete(*id).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => tracing::warn!(block_id = id, error = %e, "cannot delete block"),
            }
        }
    }

    /// Deletes blocks everywhere they may be (uncommitted blocks of a failed write).
    pub(crate) async fn delete_everywhere(&self, ids: &[BlockId]) {
        match self.peers() {
            Some(p) => {
                let nodes = p.nodes();
                self.delete_on(&nodes, ids).await;
            }
            None => self.delete_local(ids).await,
        }
    }
}

/// Block ids per `has_blocks` request of a repair pass.
const HAS_BATCH: usize = 16_384;

/// What one [`Fs::repair_replicas`] pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    /// Members that answered.
    pub live_nodes: Vec<u64>,
    /// Dirty blocks looked at.
    pub dirty_blocks: u64,
    /// Copies made (a block short of `replicas` live holders gets one per missing copy).
    pub copies_made: u64,
    /// Dirty blocks no live node holds (lost with a node, unless it comes back).
    pub missing: Vec<BlockId>,
}

impl Fs {
    /// Runs [`Fs::repair_replicas`] every `every` while this node is the meta group's leader
    /// (until the filesystem is dropped).
    pub fn spawn_repair(self: &std::sync::Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let fs = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(fs) = fs.upgrade() else { return };
                if fs.meta.is_leader()
                    && let Err(e) = fs.repair_replicas().await
                {
                    tracing::warn!(error = %e, "replica repair pass failed");
                }
            }
        })
    }

    /// Gives every dirty block `replicas` copies on live nodes again (a node was lost): for a
    /// block short of copies, reads it from a live holder and puts it on the next live nodes
    /// in its placement order. Clean blocks need nothing: the bucket has them. Run by the
    /// leader (any node may; copies are idempotent).
    pub async fn repair_replicas(&self) -> Result<RepairReport> {
        let Some(peers) = self.peers().filter(|_| self.opts.replicas > 1) else {
            return Ok(RepairReport::default());
        };
        let dirty: Vec<(BlockId, u32)> = self.meta.read(|s| {
            s.blocks
                .iter()
                .filter(|(_, b)| b.state == tidepool_cluster::meta::BlockState::Dirty)
                .map(|(id, b)| (*id, b.len))
                .collect()
        });
        let mut report = RepairReport { dirty_blocks: dirty.len() as u64, ..RepairReport::default() };
        let ids: Vec<BlockId> = dirty.iter().map(|(id, _)| *id).collect();
        let local = peers.local_id();
        // Who holds what, from every member that answers.
        let mut holds: std::collections::HashMap<u64, Vec<bool>> = std::collections::HashMap::new();
        for node in peers.nodes() {
            let res = if node == local {
                Ok(ids.iter().map(|id| self.store.contains(*id)).collect())
            } else {
                // In batches: a request header is bounded (1 MiB), ids are 8 bytes or more.
                let mut all = Vec::with_capacity(ids.len());
                let mut res = Ok(());
                for chunk in ids.chunks(HAS_BATCH) {
                    match peers.has_blocks(node, chunk).await {
                        Ok(h) => all.extend(h),
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                res.map(|()| all)
            };
            match res {
                Ok(h) if h.len() == ids.len() => {
                    holds.insert(node, h);
                }
                Ok(_) => tracing::warn!(node, "has_blocks answered the wrong count; node counted as down"),
                Err(e) => tracing::info!(node, error = %e, "node not answering; its copies do not count"),
            }
        }
        report.live_nodes = holds.keys().copied().collect();
        report.live_nodes.sort_unstable();
        let want = self.opts.replicas.min(report.live_nodes.len());
        for (i, (id, len)) in dirty.iter().enumerate() {
            let holders: Vec<u64> = report.live_nodes.iter().copied().filter(|n| holds[n][i]).collect();
            if holders.len() >= want {
                continue;
            }
            let Some(src) = holders.first().copied() else {
                report.missing.push(*id);
                continue;
            };
            let data = if src == local {
                self.store.get(*id, 0, *len).await?
            } else {
                match peers.get_block(src, *id, 0, *len).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(block_id = id, node = src, error = %e, "cannot read block to repair it");
                        continue;
                    }
                }
            };
            let targets: Vec<u64> = placement(*id, &report.live_nodes)
                .into_iter()
                .filter(|n| !holders.contains(n))
                .take(want - holders.len())
                .collect();
            for &node in &targets {
                let res = if node == local {
                    match self.store.put(*id, &data).await {
                        Ok(()) => self.store.flush().await.map_err(|e| PeerError::Other(e.to_string())),
                        Err(e) => Err(PeerError::Other(e.to_string())),
                    }
                } else {
                    peers.put_block(node, *id, Bytes::copy_from_slice(&data)).await
                };
                match res {
                    Ok(()) => report.copies_made += 1,
                    Err(e) => tracing::warn!(block_id = id, node, error = %e, "cannot put repair copy"),
                }
            }
            if !self.meta.read(|s| s.blocks.contains_key(id)) {
                // Freed while being copied: the commit's observer may have run before the copy landed.
                self.delete_on(&targets, &[*id]).await;
            }
        }
        if report.copies_made > 0 || !report.missing.is_empty() {
            tracing::info!(
                copies = report.copies_made,
                missing = report.missing.len(),
                live = ?report.live_nodes,
                "re-replicated dirty blocks"
            );
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_stable_spread_and_minimal_on_change() {
        let nodes = [1u64, 2, 3];
        let mut firsts = [0usize; 4];
        let mut moved = 0;
        for id in 0..3000u64 {
            let p = placement(id, &nodes);
            assert_eq!(p.len(), 3);
            assert_eq!(p, placement(id, &[3, 1, 2]), "order of the member list does not matter");
            firsts[p[0] as usize] += 1;
            // Removing node 3 only moves the blocks that had it among their first two.
            let q = placement(id, &[1, 2]);
            let kept: Vec<u64> = p.iter().copied().filter(|n| *n != 3).collect();
            assert_eq!(q, kept);
            if p[..2].contains(&3) {
                moved += 1;
            }
        }
        for (n, count) in firsts.iter().enumerate().skip(1).take(3) {
            assert!((800..1200).contains(count), "node {n} is first for {count} of 3000 blocks");
        }
        assert!((1800..2200).contains(&moved), "{moved} of 3000 blocks had node 3 in their first two");
    }
}
