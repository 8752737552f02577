//! Pooled NVMe across three nodes in one process: each node has its own block store and its
//! own member of a three-voter meta group; `Peers` calls go straight to the other nodes'
//! stores (the TCP transport between real processes is tested in tests/tests/cluster.rs).
//! Shown: a write lands on exactly `replicas` nodes in rendezvous order and reads back from
//! a node that holds none of it; a down node is skipped at write time; freed blocks leave
//! every node; with too few nodes up, the write fails with a clear error and nothing stays.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tidepool_cluster::raft::{RaftInbox, RaftNet};
use tidepool_cluster::{ManualClock, MetaGroup, MetaState, RaftOptions};
use tidepool_fs::{ErrorKind, Fs, FsOptions, PeerError, Peers, ROOT_INO, placement};
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::{BlockDevice, BlockStore, StoreError, StoreOptions};

const BLOCK: usize = 64 << 10;

#[derive(Default)]
struct World {
    inboxes: HashMap<u64, RaftInbox>,
    stores: HashMap<u64, Arc<BlockStore>>,
    down: HashSet<u64>,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<World>>);

struct Net(Shared);

impl RaftNet for Net {
    fn send(&self, msg: raft::eraftpb::Message) {
        let w = self.0.0.lock().unwrap();
        if w.down.contains(&msg.to) || w.down.contains(&msg.from) {
            return;
        }
        if let Some(i) = w.inboxes.get(&msg.to) {
            i.step(msg);
        }
    }
}

struct DirectPeers {
    me: u64,
    world: Shared,
}

impl DirectPeers {
    fn store(&self, node: u64) -> Result<Arc<BlockStore>, PeerError> {
        let w = self.world.0.lock().unwrap();
        if w.down.contains(&node) {
            return Err(PeerError::Unavailable(format!("node {node} is down")));
        }
        w.stores.get(&node).cloned().ok_or(PeerError::Unavailable(format!("no node {node}")))
    }
}

fn peer_err(e: StoreError) -> PeerError {
    match e {
        StoreError::NotFound(_) => PeerError::NotFound,
        StoreError::NoSpace { .. } => PeerError::NoSpace,
        e => PeerError::Other(e.to_string()),
    }
}

#[async_trait]
impl Peers for DirectPeers {
    fn local_id(&self) -> u64 {
        self.me
    }
    fn nodes(&self) -> Vec<u64> {
        vec![1, 2, 3]
    }
    async fn put_block(&self, node: u64, id: u64, data: Bytes) -> Result<(), PeerError> {
        let s = self.store(node)?;
        s.put(id, &data).await.map_err(peer_err)?;
        s.flush().await.map_err(peer_err)
    }
    async fn get_block(&self, node: u64, id: u64, offset: u32, len: u32) -> Result<Vec<u8>, PeerError> {
        self.store(node)?.get(id, offset, len).await.map_err(peer_err)
    }
    async fn delete_blocks(&self, node: u64, ids: &[u64]) -> Result<(), PeerError> {
        let s = self.store(node)?;
        for id in ids {
            match s.delete(*id).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(peer_err(e)),
            }
        }
        Ok(())
    }
    async fn has_blocks(&self, node: u64, ids: &[u64]) -> Result<Vec<bool>, PeerError> {
        let s = self.store(node)?;
        Ok(ids.iter().map(|id| s.contains(*id)).collect())
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    world: Shared,
    fs: BTreeMap<u64, Fs>,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let world = Shared::default();
    let mut fs: BTreeMap<u64, Fs> = BTreeMap::new();
    for id in 1..=3u64 {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        let opts = StoreOptions { segment_bytes: 4 << 20, max_block_bytes: BLOCK, crc_cache_bytes: 1 << 20 };
        let store = Arc::new(BlockStore::format(dev, opts).await.unwrap());
        let ropts = RaftOptions {
            node_id: id,
            join: id != 1,
            tick: Duration::from_millis(20),
            propose_timeout: Duration::from_secs(5),
            ..RaftOptions::default()
        };
        let net: Arc<dyn RaftNet> = Arc::new(Net(world.clone()));
        let meta = MetaGroup::open_with(&dir.path().join(id.to_string()), ropts, MetaState::new(), Some(net)).unwrap();
        {
            let mut w = world.0.lock().unwrap();
            w.inboxes.insert(id, meta.inbox());
            w.stores.insert(id, store.clone());
        }
        let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
        let fopts = FsOptions {
            block_size: BLOCK,
            id_batch: 64,
            replicas: 2,
            orphan_grace: Some(Duration::from_secs(600)),
            ..FsOptions::default()
        };
        let (f, _) = Fs::open(meta, store, clock, fopts).await.unwrap();
        f.set_peers(Arc::new(DirectPeers { me: id, world: world.clone() }));
        if id != 1 {
            fs[&1u64].meta().add_voter(id).await.unwrap();
        }
        fs.insert(id, f);
    }
    let t0 = Instant::now();
    while !fs.values().all(|f| f.meta().status().voters == [1, 2, 3]) {
        assert!(t0.elapsed() < Duration::from_secs(20), "cluster did not form");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Cluster { _dir: dir, world, fs }
}

impl Cluster {
    fn holders(&self, id: u64) -> Vec<u64> {
        let w = self.world.0.lock().unwrap();
        let mut h: Vec<u64> = w.stores.iter().filter(|(_, s)| s.contains(id)).map(|(n, _)| *n).collect();
        h.sort_unstable();
        h
    }
    fn blocks_of(&self, node: u64, path: &[u8]) -> Vec<u64> {
        self.fs[&node].meta().read(|s| {
            let ino = s.resolve(path).unwrap().attr.ino;
            s.inode(ino).unwrap().extents.values().map(|e| e.block).collect()
        })
    }
}

fn data(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lands_on_two_nodes_and_reads_back_anywhere() {
    let c = cluster().await;
    let body = data(1, 5 * BLOCK + 123);
    let f = c.fs[&2].create(ROOT_INO, b"a", 0o644, 0, 0).await.unwrap();
    c.fs[&2].write(f.ino, 0, &body).await.unwrap();
    let blocks = c.blocks_of(2, b"/a");
    assert_eq!(blocks.len(), 6);
    for id in &blocks {
        let mut want = placement(*id, &[1, 2, 3])[..2].to_vec();
        want.sort_unstable();
        assert_eq!(c.holders(*id), want, "block {id} on the first two nodes of its order");
    }
    // Every node reads it back, including nodes that hold only some of its blocks.
    for n in [1, 2, 3] {
        assert_eq!(c.fs[&n].read(f.ino, 0, body.len() + 10).await.unwrap(), body, "read on node {n}");
    }
    let peer_bytes: u64 = c.fs.values().map(|f| f.metrics().snapshot().peer_read_bytes).sum();
    assert!(peer_bytes > 0, "some blocks came from other nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_node_is_skipped_and_freed_blocks_leave_every_node() {
    let c = cluster().await;
    let f = c.fs[&1].create(ROOT_INO, b"b", 0o644, 0, 0).await.unwrap();
    // Node 3 goes down: the two survivors are still a quorum and still two nodes for each block.
    c.world.0.lock().unwrap().down.insert(3);
    let body = data(2, 4 * BLOCK);
    c.fs[&1].write(f.ino, 0, &body).await.unwrap();
    let blocks = c.blocks_of(1, b"/b");
    for id in &blocks {
        assert_eq!(c.holders(*id), vec![1, 2], "block {id} skipped the down node");
    }
    assert_eq!(c.fs[&2].read(f.ino, 0, body.len()).await.unwrap(), body);
    c.world.0.lock().unwrap().down.remove(&3);
    // Overwrite: the old blocks are freed on every node that held them.
    c.fs[&2].write(f.ino, 0, &data(3, 4 * BLOCK)).await.unwrap();
    let t0 = Instant::now();
    while blocks.iter().any(|id| !c.holders(*id).is_empty()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "freed blocks still held: {:?}",
            blocks.iter().map(|id| c.holders(*id)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.fs[&3].read(f.ino, 0, 4 * BLOCK).await.unwrap(), data(3, 4 * BLOCK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_nodes_fails_the_write_and_leaves_nothing() {
    let c = cluster().await;
    let f = c.fs[&1].create(ROOT_INO, b"c", 0o644, 0, 0).await.unwrap();
    // Block puts to nodes 2 and 3 fail (their stores are unreachable), Raft still works:
    // only one node can hold each block, and R is 2.
    let (s2, s3) = {
        let mut w = c.world.0.lock().unwrap();
        (w.stores.remove(&2).unwrap(), w.stores.remove(&3).unwrap())
    };
    let err = c.fs[&1].write(f.ino, 0, &data(4, 2 * BLOCK)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("reached 1 of 2 nodes"), "{err}");
    {
        let mut w = c.world.0.lock().unwrap();
        w.stores.insert(2, s2);
        w.stores.insert(3, s3);
    }
    assert_eq!(c.fs[&1].getattr(f.ino).unwrap().size, 0);
    let leftover: usize = c.world.0.lock().unwrap().stores.values().map(|s| s.ids().len()).sum();
    assert_eq!(leftover, 0, "the failed write's blocks were discarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_node_re_replicates_its_dirty_blocks_from_the_survivors() {
    let c = cluster().await;
    let f = c.fs[&1].create(ROOT_INO, b"d", 0o644, 0, 0).await.unwrap();
    let body = data(5, 12 * BLOCK);
    c.fs[&1].write(f.ino, 0, &body).await.unwrap();
    let blocks = c.blocks_of(1, b"/d");
    let on3 = blocks.iter().filter(|id| c.holders(**id).contains(&3)).count();
    assert!(on3 > 0, "some of 12 blocks are on node 3");
    // Node 3 is lost (its store goes away for good).
    {
        let mut w = c.world.0.lock().unwrap();
        w.down.insert(3);
        w.stores.remove(&3);
    }
    let report = c.fs[&1].repair_replicas().await.unwrap();
    assert_eq!(report.live_nodes, vec![1, 2]);
    assert_eq!(report.copies_made as usize, on3, "{report:?}");
    assert!(report.missing.is_empty());
    for id in &blocks {
        assert_eq!(c.holders(*id), vec![1, 2], "block {id} has two live copies again");
    }
    // Nothing more to do on a second pass.
    assert_eq!(c.fs[&1].repair_replicas().await.unwrap().copies_made, 0);
    assert_eq!(c.fs[&2].read(f.ino, 0, body.len()).await.unwrap(), body);
}
