//! The Raft driver end to end with a toy key-value state machine: propose/apply, restart from
//! disk, snapshots and compaction, torn tails, corruption, unknown versions, and many
//! concurrent proposals.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_cluster::raft::{MetaGroup, RaftError, RaftOptions};

mod common;
use common::{Kv, KvCmd};

fn opts(snapshot_log_bytes: u64) -> RaftOptions {
    RaftOptions { snapshot_log_bytes, tick: Duration::from_millis(20), ..Default::default() }
}

fn open(dir: &Path, snapshot_log_bytes: u64) -> MetaGroup<Kv> {
    match MetaGroup::open(dir, opts(snapshot_log_bytes), Kv::default()) {
        Ok(g) => g,
        Err(e) => panic!("open {}: {e}", dir.display()),
    }
}

fn open_err(dir: &Path) -> RaftError {
    match MetaGroup::open(dir, opts(1 << 20), Kv::default()) {
        Ok(_) => panic!("open {} succeeded, expected an error", dir.display()),
        Err(e) => e,
    }
}

fn snapshot_of(g: &MetaGroup<Kv>) -> Kv {
    g.read(|s| s.clone())
}

async fn put_many(g: &MetaGroup<Kv>, prefix: &str, n: u64) {
    for i in 0..n {
        let out = g.propose(KvCmd::Put(format!("{prefix}-{i:04}"), i)).await;
        assert!(matches!(out, Ok(None)), "put {prefix}-{i}: {out:?}");
    }
}

fn log_path(dir: &Path) -> std::path::PathBuf {
    dir.join("raft.log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_applies_and_returns_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path(), 1 << 20);
    assert_eq!(g.propose(KvCmd::Put("a".into(), 1)).await.expect("put"), None);
    assert_eq!(g.propose(KvCmd::Put("a".into(), 5)).await.expect("put"), Some(1));
    assert_eq!(g.propose(KvCmd::Incr("a".into(), 2)).await.expect("incr"), Some(7));
    assert_eq!(g.read(|s| s.map.get("a").copied()), Some(7));
    let st = g.status();
    assert_eq!(st.leader_id, 1);
    assert_eq!(st.node_id, 1);
    assert!(st.term >= 1);
    assert_eq!(st.applied_index, st.commit_index);
    // An empty leader entry plus three commands.
    assert!(st.applied_index >= 4, "{st:?}");
    assert!(st.log_bytes > 8);
    g.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_disk_gives_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path(), 1 << 20);
    put_many(&g, "k", 50).await;
    g.propose(KvCmd::Incr("k-0003".into(), 10)).await.expect("incr");
    let before = snapshot_of(&g);
    let applied = g.status().applied_index;
    drop(g); // no shutdown: the driver must stop and the data must still be there

    let g = open(dir.path(), 1 << 20);
    assert_eq!(snapshot_of(&g), before);
    assert!(g.status().applied_index > applied, "a new term's empty entry is applied on top");
    assert_eq!(g.propose(KvCmd::Incr("k-0003".into(), 1)).await.expect("incr"), Some(14));
    g.shutdown().await.expect("shutdown");

    let g = open(dir.path(), 1 << 20);
    assert_eq!(g.read(|s| s.map.get("k-0003").copied()), Some(14));
    g.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_by_size_compacts_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path(), 4096);
    let long = "x".repeat(40);
    put_many(&g, &long, 400).await;
    let st = g.status();
    assert!(st.snapshots_taken >= 1, "{st:?}");
    assert!(st.snapshot_index > 0, "{st:?}");
    // 400 records of 60+ bytes were appended; the compacted log holds only the tail.
    assert!(st.log_bytes < 8192, "log not compacted: {st:?}");
    let on_disk = std::fs::metadata(log_path(dir.path())).expect("log").len();
    assert!(on_disk < 8192, "log file not compacted: {on_disk} bytes");
    assert!(dir.path().join("snapshot.tpsn").exists());
    let before = snapshot_of(&g);
    g.shutdown().await.expect("shutdown");

    let g = open(dir.path(), 4096);
    assert_eq!(snapshot_of(&g), before);
    assert!(g.status().snapshot_index >= st.snapshot_index);
    put_many(&g, "after", 10).await;
    g.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_now_shrinks_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path(), 1 << 30);
    put_many(&g, "k", 100).await;
    let grown = std::fs::metadata(log_path(dir.path())).expect("log").len();
    g.snapshot_now().await.expect("snapshot");
    let st = g.status();
    let shrunk = std::fs::metadata(log_path(dir.path())).expect("log").len();
    println!("log bytes before snapshot {grown}, after {shrunk}");
    assert!(shrunk < grown / 4, "before={grown} after={shrunk}");
    assert_eq!(st.snapshots_taken, 1);
    assert_eq!(st.snapshot_index, st.applied_index);
    let before = snapshot_of(&g);
    drop(g);
    let g = open(dir.path(), 1 << 30);
    assert_eq!(snapshot_of(&g), before);
    g.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_discarded_and_acknowledged_data_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path(), 1 << 20);
    put_many(&g, "k", 20).await;
    let before = snapshot_of(&g);
    drop(g);

    // A record header promising more bytes than follow, then garbage: a write cut short.
    let mut f = std::fs::OpenOptions::new().append(true).open(log_path(dir.path())).expect("log");
    f.write_all(&[200, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 7, 7, 7, 7, 7]).expect("garbage");
    drop(f);

    let g = open(dir.path(), 1 << 20);
    assert_eq!(snapshot_of(&g), before);
    put_many(&g, "more", 5).await;
    let after = snapshot_of(&g);
    drop(g);
    // The tail was truncated, so the records written after it are not behind garbage.
    let g = open(dir.path(), 1 << 20);
    assert_eq!(snapshot_of(&g), after);
    g.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_the_middle_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path(), 1 << 20);
    put_many(&g, "k", 40).await;
    g.shutdown().await.expect("shutdown");

    let path = log_path(dir.path());
    let mut bytes = std::fs::read(&path).expect("log");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&path, &bytes).expect("write");
    match open_err(dir.path()) {
        RaftError::CorruptLog { offset, .. } => assert!(offset as usize <= mid),
        e => panic!("expected CorruptLog, got {e}"),
    }
    // Nothing was truncated.
    assert_eq!(std::fs::read(&path).expect("log"), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_versions_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path(), 1 << 20);
    put_many(&g, "k", 5).await;
    g.snapshot_now().await.expect("snapshot");
    g.shutdown().await.expect("shutdown");

    let set_version = |name: &str, v: u32| {
        let path = dir.path().join(name);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[4..8].copy_from_slice(&v.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
    };
    set_version("raft.log", 99);
    match open_err(dir.path()) {
        RaftError::UnsupportedVersion { found: 99, supported: 1 } => {}
        e => panic!("expected UnsupportedVersion for the log, got {e}"),
    }
    set_version("raft.log", 1);
    set_version("snapshot.tpsn", 7);
    match open_err(dir.path()) {
        RaftError::UnsupportedVersion { found: 7, supported: 2 } => {}
        e => panic!("expected UnsupportedVersion for the snapshot, got {e}"),
    }
    set_version("snapshot.tpsn", 2);
    let g = open(dir.path(), 1 << 20);
    assert_eq!(g.read(|s| s.map.len()), 5);
    g.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_proposals_apply_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = Arc::new(open(dir.path(), 1 << 20));
    // One at a time first, for comparison: one fsync per proposal.
    let started = Instant::now();
    for i in 0..100u64 {
        g.propose(KvCmd::Put("seq".into(), i)).await.expect("sequential put");
    }
    let secs = started.elapsed().as_secs_f64();
    println!("100 sequential proposals in {secs:.3}s: {:.0} proposals/s", 100.0 / secs);

    const N: u64 = 1000;
    let started = Instant::now();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let g = Arc::clone(&g);
            tokio::spawn(async move {
                let incr = g.propose(KvCmd::Incr("counter".into(), 1)).await;
                let put = g.propose(KvCmd::Put(format!("p-{i:04}"), i)).await;
                (incr, put)
            })
        })
        .collect();
    let mut seen = vec![false; N as usize + 1];
    for t in tasks {
        let (incr, put) = t.await.expect("task");
        let v = incr.expect("incr").expect("incr output") as usize;
        assert!(!seen[v], "counter value {v} returned twice");
        seen[v] = true;
        assert_eq!(put.expect("put"), None);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} proposals in {:.3}s: {:.0} proposals/s (log bytes {})",
        2 * N,
        secs,
        (2 * N) as f64 / secs,
        g.status().log_bytes
    );
    assert!(seen[1..].iter().all(|s| *s));
    assert_eq!(g.read(|s| s.map.get("counter").copied()), Some(N));
    assert_eq!(g.read(|s| s.map.len()), N as usize + 2);
    let g = Arc::try_unwrap(g).unwrap_or_else(|_| panic!("all tasks finished"));
    let before = snapshot_of(&g);
    g.shutdown().await.expect("shutdown");
    let g = open(dir.path(), 1 << 20);
    assert_eq!(snapshot_of(&g), before);
    g.shutdown().await.expect("shutdown");
}
