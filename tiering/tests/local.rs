//! `LocalStore`: the conformance suite, the same through the retry and fault wrappers, and
//! the local folder's own promises (temp files never listed and cleaned at open, bad keys
//! refused, folders tidied on delete, readers never see half an object).

mod common;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tidepool_tiering::{FaultConfig, Faulty, LocalStore, ObjectError, ObjectStore, RetryConfig, Retrying};

use common::conformance;

fn open(dir: &tempfile::TempDir) -> LocalStore {
    LocalStore::new(dir.path().join("store")).expect("open local store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_local_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    conformance::run(Arc::new(store.clone())).await;
    // No temp file is left once every write returned.
    let tmp: Vec<_> = fs::read_dir(store.root().join(".tmp")).expect("read .tmp").collect();
    assert!(tmp.is_empty(), "temp files left behind: {tmp:?}");
    // Clean up removed the emptied folders too.
    let left: Vec<_> = fs::read_dir(store.root()).expect("read root").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left, [".tmp"], "only the temp folder is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_faults_and_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = FaultConfig { fail_rate: 0.3, delay_rate: 0.1, delay: Duration::from_millis(2), seed: 11 };
    let retry =
        RetryConfig { max_attempts: 12, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(20) };
    let store =
        Arc::new(Retrying::with_rng(Faulty::new(open(&dir), faults), retry, rand::SeedableRng::seed_from_u64(5)));
    conformance::run(store.clone()).await;
    assert!(store.inner().injected_failures() > 10, "faults were injected: {}", store.inner().injected_failures());
    assert!(store.retries() >= store.inner().injected_failures(), "every injected failure was retried");
}

#[tokio::test]
async fn temp_files_are_never_listed_and_the_folder_is_reserved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    fs::write(store.root().join(".tmp/123.abandoned"), b"half a write").expect("plant a temp file");
    store.put("a", Bytes::from_static(b"x")).await.expect("put");
    let page = store.list("", None, 100).await.expect("list");
    assert_eq!(page.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(store.list(".tmp", None, 100).await.expect("list .tmp").objects.is_empty());
    for r in [
        store.put(".tmp/x", Bytes::new()).await.err(),
        store.get(".tmp/123.abandoned", None).await.err(),
        store.delete(".tmp/123.abandoned").await.err(),
    ] {
        assert!(matches!(r, Some(ObjectError::Invalid(_))), "{r:?}");
    }
    assert!(store.root().join(".tmp/123.abandoned").exists(), "a fresh temp file is not touched");
}

#[tokio::test]
async fn stale_temp_files_are_cleaned_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let store = LocalStore::new(root.clone()).expect("open");
    store.put("kept", Bytes::from_static(b"kept")).await.expect("put");
    let stale = root.join(".tmp/1.stale");
    let fresh = root.join(".tmp/2.fresh");
    fs::write(&stale, b"crashed write").expect("plant stale");
    fs::write(&fresh, b"live write of another store").expect("plant fresh");
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    fs::File::options().write(true).open(&stale).and_then(|f| f.set_modified(hour_ago)).expect("age the stale file");

    let reopened = LocalStore::new(root.clone()).expect("reopen");
    assert!(!stale.exists(), "a temp file older than the limit is removed at open");
    assert!(fresh.exists(), "a recent temp file (maybe another store's write) is kept");
    assert_eq!(reopened.get("kept", None).await.expect("get"), Bytes::from_static(b"kept"));

    LocalStore::with_stale_tmp_after(root.clone(), Duration::ZERO).expect("reopen, cleaning all");
    assert!(!fresh.exists(), "with no age limit every temp file is removed");
}

#[tokio::test]
async fn bad_keys_are_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    for key in ["", "/abs", "../escape", "a/../../escape", "a//b", "a/", ".", "a/./b"] {
        let results = [
            store.put(key, Bytes::from_static(b"x")).await.err(),
            store.put_if_absent(key, Bytes::from_static(b"x")).await.err(),
            store.get(key, None).await.err(),
            store.head(key).await.err(),
            store.delete(key).await.err(),
        ];
        for r in results {
            assert!(matches!(r, Some(ObjectError::Invalid(_))), "key {key:?}: {r:?}");
        }
    }
    assert!(!dir.path().join("escape").exists());
    assert!(matches!(store.list("", None, 0).await, Err(ObjectError::Invalid(_))), "limit 0");
}

#[tokio::test]
async fn a_key_cannot_be_both_an_object_and_a_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store.put("file", Bytes::from_static(b"x")).await.expect("put");
    let below = store.put("file/below", Bytes::from_static(b"y")).await;
    assert!(matches!(below, Err(ObjectError::Invalid(_))), "{below:?}");
    store.put("folder/inside", Bytes::from_static(b"x")).await.expect("put");
    let over = store.put("folder", Bytes::from_static(b"y")).await;
    assert!(matches!(over, Err(ObjectError::Invalid(_))), "{over:?}");
    let over = store.put_if_absent("folder", Bytes::from_static(b"y")).await;
    assert!(matches!(over, Err(ObjectError::Invalid(_))), "{over:?}");
    // A folder is not an object.
    assert_eq!(store.head("folder").await.expect("head"), None);
    assert!(matches!(store.get("folder", None).await, Err(ObjectError::NotFound(_))));
    assert!(matches!(store.get("file/below", None).await, Err(ObjectError::NotFound(_))));
    store.delete("folder").await.expect("deleting a folder name deletes nothing");
    assert!(store.head("folder/inside").await.expect("head").is_some());
    // No temp file leaks from the refused writes.
    assert_eq!(fs::read_dir(store.root().join(".tmp")).expect("read .tmp").count(), 0);
}

#[tokio::test]
async fn delete_removes_emptied_folders_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store.put("x/y/z", Bytes::from_static(b"1")).await.expect("put");
    store.put("x/w", Bytes::from_static(b"2")).await.expect("put");
    store.delete("x/y/z").await.expect("delete");
    assert!(!store.root().join("x/y").exists(), "the emptied folder is removed");
    assert!(store.root().join("x").is_dir(), "a folder still holding a key stays");
    store.delete("x/w").await.expect("delete");
    assert!(!store.root().join("x").exists());
    assert!(store.root().is_dir(), "the root stays");
}

#[tokio::test]
async fn describe_names_the_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    assert_eq!(store.describe(), format!("file://{}", dir.path().join("store").display()));
}

/// Overwrites are atomic: a reader sees the old body or the new one, never a mix or a torn
/// write, and never a missing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_half_an_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir));
    let len = 256 * 1024;
    store.put("hot/key", Bytes::from(vec![b'a'; len])).await.expect("put");
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..40u8 {
                let byte = if i % 2 == 0 { b'b' } else { b'a' };
                store.put("hot/key", Bytes::from(vec![byte; len])).await.expect("overwrite");
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let body = store.get("hot/key", None).await.expect("get during overwrites");
        assert_eq!(body.len(), len, "whole object");
        assert!(body.iter().all(|b| *b == body[0]), "one write's bytes only");
        reads += 1;
    }
    writer.await.expect("writer");
    assert!(reads > 0);
}

/// The writer half of `a_killed_writer_leaves_whole_objects_only`: does nothing unless the
/// parent test started this binary with `TIDEPOOL_CRASH_ROOT` set; then writes (and
/// overwrites) objects forever, printing each key once its put returned.
#[tokio::test]
async fn crash_writer_child() {
    let Ok(root) = std::env::var("TIDEPOOL_CRASH_ROOT") else { return };
    let store = LocalStore::new(root.into()).expect("open in the child");
    for i in 0u64.. {
        let key = format!("crash/{:02x}/object-{}", i % 7, i % 50);
        store.put(&key, conformance::pattern(64 * 1024 + (i % 50) as usize, i % 50)).await.expect("put in the child");
        println!("acked {key}");
    }
}

/// SIGKILL a process in the middle of writing: every object it acknowledged is there whole,
/// no object is torn (each listed key holds exactly one write's bytes), the temp folder is
/// never listed, and the next open with no age limit empties it.
#[test]
fn a_killed_writer_leaves_whole_objects_only() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_writer_child", "--nocapture", "--test-threads=1"])
        .env("TIDEPOOL_CRASH_ROOT", &root)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the writer");
    let stdout = child.stdout.take().expect("piped stdout");
    // Killed while it overwrites: after 300 puts over 350 keys (7 folders x 50 names).
    let mut acked = std::collections::BTreeSet::new();
    let mut puts = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read the writer's output");
        if let Some(key) = line.strip_prefix("acked ") {
            acked.insert(key.to_owned());
            puts += 1;
        }
        if puts >= 300 {
            break;
        }
    }
    child.kill().expect("SIGKILL the writer");
    child.wait().expect("reap the writer");
    assert_eq!(puts, 300, "the writer acknowledged 300 puts before it was killed");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = LocalStore::with_stale_tmp_after(root.clone(), Duration::ZERO).expect("reopen after the crash");
        let (listed, _) = conformance::list_all(&store, "", 7).await;
        let listed: Vec<String> = listed.into_iter().map(|o| o.key).collect();
        for key in &acked {
            assert!(listed.contains(key), "acknowledged {key} is listed");
        }
        for key in &listed {
            let n: u64 = key.rsplit_once('-').and_then(|(_, n)| n.parse().ok()).expect("a writer's key");
            let body = store.get(key, None).await.expect("read back");
            assert!(body == conformance::pattern(64 * 1024 + n as usize, n), "{key} holds one whole write");
        }
        assert_eq!(fs::read_dir(root.join(".tmp")).expect("read .tmp").count(), 0, "reopen emptied .tmp");
    });
}
