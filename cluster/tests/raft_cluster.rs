//! The Raft driver as a group of three: joining, proposals from any node (forwarded to the
//! leader, applied exactly once even when the network loses or repeats messages), ReadIndex
//! reads on followers, losing the leader, and a network cut (the minority stops, the majority
//! goes on, the cut-off node catches up after healing).
//!
//! The network here is in-process (each node's outgoing messages are handed to the other's
//! inbox), so that loss, duplication and cuts are exact; the TCP transport has its own tests
//! (`transport.rs`) and the real processes theirs (`tests/tests/cluster.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use tidepool_cluster::raft::{MetaGroup, RaftError, RaftInbox, RaftNet, RaftOptions};

mod common;
use common::{Kv, KvCmd};

/// Faults the network applies to every message.
#[derive(Default, Clone, Copy)]
struct Faults {
    drop: f64,
    dup: f64,
}

#[derive(Default)]
struct NetInner {
    inboxes: HashMap<u64, RaftInbox>,
    /// Nodes cut off from everyone.
    cut: HashSet<u64>,
    faults: Faults,
    rng: Option<rand::rngs::SmallRng>,
}

#[derive(Clone, Default)]
struct Net(Arc<Mutex<NetInner>>);

impl Net {
    fn attach(&self, id: u64, inbox: RaftInbox) {
        self.0.lock().unwrap().inboxes.insert(id, inbox);
    }
    fn detach(&self, id: u64) {
        self.0.lock().unwrap().inboxes.remove(&id);
    }
    fn cut(&self, id: u64, on: bool) {
        let mut n = self.0.lock().unwrap();
        if on {
            n.cut.insert(id)
        } else {
            n.cut.remove(&id)
        };
    }
    fn faults(&self, f: Faults) {
        let mut n = self.0.lock().unwrap();
        n.faults = f;
        n.rng = Some(rand::rngs::SmallRng::seed_from_u64(7));
    }
}

struct Port {
    net: Net,
}

impl RaftNet for Port {
    fn send(&self, msg: raft::eraftpb::Message) {
        let mut n = self.net.0.lock().unwrap();
        if n.cut.contains(&msg.from) || n.cut.contains(&msg.to) {
            return;
        }
        let f = n.faults;
        let (drop, dup) = match n.rng.as_mut() {
            Some(r) => (r.gen_bool(f.drop), r.gen_bool(f.dup)),
            None => (false, false),
        };
        if drop {
            return;
        }
        if let Some(inbox) = n.inboxes.get(&msg.to) {
            if dup {
                inbox.step(msg.clone());
            }
            inbox.step(msg);
        }
    }
}

/// Short ticks; the proposal deadline is short so that the cut test's minority fails fast
/// (the lossy test gives more: a proposal there may need several sends).
fn opts(id: u64, join: bool, propose_timeout: Duration) -> RaftOptions {
    RaftOptions { node_id: id, tick: Duration::from_millis(20), join, propose_timeout, ..RaftOptions::default() }
}

struct Cluster {
    net: Net,
    root: PathBuf,
    nodes: BTreeMap<u64, MetaGroup<Kv>>,
    propose_timeout: Duration,
}

impl Cluster {
    /// Node 1 alone, then 2 and 3 join it.
    async fn three(root: &Path) -> Cluster {
        Self::three_with(root, Duration::from_secs(3)).await
    }

    async fn three_with(root: &Path, propose_timeout: Duration) -> Cluster {
        let mut c = Cluster { net: Net::default(), root: root.to_path_buf(), nodes: BTreeMap::new(), propose_timeout };
        c.start(1, false);
        let first = &c.nodes[&1];
        first.propose(KvCmd::Put("before-join".into(), 1)).await.unwrap();
        // No snapshot yet: add_voter takes one (a joiner learns the first voter from it).
        assert_eq!(first.status().snapshot_index, 0);
        for id in [2, 3] {
            c.start(id, true);
            c.nodes[&1].add_voter(id).await.unwrap();
        }
        c.wait(|c| c.nodes.values().all(|g| g.status().voters == vec![1, 2, 3]), "all see three voters").await;
        c
    }

    fn start(&mut self, id: u64, join: bool) {
        let port: Arc<dyn RaftNet> = Arc::new(Port { net: self.net.clone() });
        let g = MetaGroup::open_with(
            &self.root.join(id.to_string()),
            opts(id, join, self.propose_timeout),
            Kv::default(),
            Some(port),
        )
        .unwrap_or_else(|e| panic!("open node {id}: {e}"));
        self.net.attach(id, g.inbox());
        self.nodes.insert(id, g);
    }

    async fn stop(&mut self, id: u64) {
        self.net.detach(id);
        let g = self.nodes.remove(&id).expect("node running");
        g.shutdown().await.unwrap();
    }

    fn leader(&self) -> Option<u64> {
        self.nodes.values().map(|g| g.status()).find(|s| s.leader_id == s.node_id).map(|s| s.node_id)
    }

    async fn wait(&self, f: impl Fn(&Cluster) -> bool, what: &str) {
        let t0 = Instant::now();
        while !f(self) {
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn state(&self, id: u64) -> Kv {
        self.nodes[&id].read(|s| s.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_proposes_and_reads_what_another_node_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::three(dir.path()).await;
    let leader = c.leader().expect("a leader");
    let followers: Vec<u64> = c.nodes.keys().copied().filter(|i| *i != leader).collect();
    // A proposal on a follower returns the output the state machine computed for it.
    assert_eq!(c.nodes[&followers[0]].propose(KvCmd::Incr("n".into(), 5)).await.unwrap(), Some(5));
    assert_eq!(c.nodes[&leader].propose(KvCmd::Incr("n".into(), 2)).await.unwrap(), Some(7));
    // After a barrier, the other follower's local read sees both.
    c.nodes[&followers[1]].read_barrier().await.unwrap();
    assert_eq!(c.nodes[&followers[1]].read(|s| s.map.get("n").copied()), Some(7));
    assert_eq!(c.state(followers[1]).map.get("before-join"), Some(&1), "the joiner got the snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_apply_exactly_once_on_a_lossy_repeating_network() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::three_with(dir.path(), Duration::from_secs(30)).await;
    c.net.faults(Faults { drop: 0.15, dup: 0.15 });
    let mut tasks = Vec::new();
    for (i, g) in c.nodes.values().enumerate() {
        for j in 0..60u64 {
            let fut = g.propose(KvCmd::Incr("sum".into(), (i as u64 + 1) * 1000 + j));
            tasks.push(fut);
        }
    }
    let outs = futures_util::future::join_all(tasks).await;
    let failed = outs.iter().filter(|o| o.is_err()).count();
    let expect: u64 = (1..=3u64).map(|i| (0..60).map(|j| i * 1000 + j).sum::<u64>()).sum();
    c.net.faults(Faults::default());
    c.wait(|c| c.nodes.values().all(|g| g.status().applied_index == c.nodes[&1].status().commit_index), "caught up")
        .await;
    for id in [1, 2, 3] {
        c.nodes[&id].read_barrier().await.unwrap();
    }
    let sums: Vec<u64> = [1, 2, 3].iter().map(|id| c.state(*id).map["sum"]).collect();
    // Every acknowledged proposal applied once; a timed-out one applied at most once.
    assert!(sums.iter().all(|s| *s == sums[0]), "nodes disagree: {sums:?}");
    assert!(failed == 0 && sums[0] == expect, "sum {} expected {expect}, {failed} proposals failed", sums[0]);
    // Each acknowledged output is distinct (no increment answered twice).
    let mut seen = HashSet::new();
    for o in outs.into_iter().flatten() {
        assert!(seen.insert(o), "output {o:?} answered twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_elects_another_and_the_old_one_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::three(dir.path()).await;
    for round in 0..3u64 {
        let old = c.leader().expect("a leader");
        c.stop(old).await;
        let t0 = Instant::now();
        // A proposal on a survivor waits out the election and succeeds (it is sent again).
        let survivor = *c.nodes.keys().next().unwrap();
        let out = c.nodes[&survivor].propose(KvCmd::Put(format!("r{round}"), round)).await;
        assert!(out.is_ok(), "round {round}: proposal after losing leader {old}: {out:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "round {round}: stall {:?}", t0.elapsed());
        assert!(c.leader().is_some_and(|l| l != old));
        c.start(old, true);
        c.wait(|c| c.state(old).map.get(&format!("r{round}")) == Some(&round), "the restarted node catches up").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_stops_writing_and_catches_up_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::three(dir.path()).await;
    let leader = c.leader().unwrap();
    // Cut the leader off: it is the minority now.
    c.net.cut(leader, true);
    let err = c.nodes[&leader].propose(KvCmd::Put("minority".into(), 1)).await;
    assert!(matches!(err, Err(RaftError::Timeout { .. })), "minority write: {err:?}");
    let read = c.nodes[&leader].read_barrier().await;
    assert!(matches!(read, Err(RaftError::Timeout { .. })), "minority linearizable read: {read:?}");
    let majority: Vec<u64> = c.nodes.keys().copied().filter(|i| *i != leader).collect();
    for (i, id) in majority.iter().enumerate() {
        c.nodes[id].propose(KvCmd::Put(format!("majority{i}"), 1)).await.unwrap();
    }
    c.net.cut(leader, false);
    c.wait(|c| c.state(leader).map.contains_key("majority1"), "the healed node catches up").await;
    // The minority's write was never acknowledged; whether it applied later (it was sent
    // again after healing, within its deadline) or not, every node agrees.
    c.wait(
        |c| {
            let s = c.state(majority[0]);
            [leader, majority[1]].iter().all(|id| c.state(*id) == s)
        },
        "all nodes agree",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_leaves_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::three(dir.path()).await;
    let leader = c.leader().unwrap();
    let gone = *c.nodes.keys().find(|i| **i != leader).unwrap();
    c.nodes[&leader].remove_node(gone).await.unwrap();
    c.stop(gone).await;
    c.wait(|c| c.nodes.values().all(|g| !g.status().voters.contains(&gone)), "the others drop it").await;
    // Two voters left: both are needed, both are there.
    c.nodes[&leader].propose(KvCmd::Put("after-remove".into(), 1)).await.unwrap();
}
