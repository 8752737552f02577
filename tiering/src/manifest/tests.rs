//! Manifest round trips and every way a manifest can be bad.

use std::collections::BTreeMap;
use std::sync::Arc;

use tidepool_cluster::MetaState;
use tidepool_cluster::meta::{Command, NewBlock, NewKind, ObjectKind, TieredBlock};

use super::*;
use crate::{LocalStore, ObjectStore};

/// A namespace of `files` small files in a few dirs, every block tiered into one pack.
fn state(files: u64) -> MetaState {
    let mut s = MetaState::new();
    let now = 1_700_000_000_000_000_000;
    s.apply(&Command::Create { parent: 1, name: b"d".to_vec(), kind: NewKind::Dir, mode: 0o755, uid: 1, gid: 1, now })
        .unwrap();
    s.apply(&Command::AllocBlockIds { count: files + 1 }).unwrap();
    let mut tiered = Vec::new();
    for i in 0..files {
        let a = s
            .apply(&Command::Publish {
                parent: 2,
                name: format!("f-{i}-\u{00e9}").into_bytes(),
                blocks: vec![NewBlock { id: i + 1, len: 100 + (i % 1000) as u32 }],
                // Hash-like values: the stream must not compress to nothing, so it spans parts.
                xattrs: BTreeMap::from([(
                    "k".to_string(),
                    format!("{:016x}", (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                )]),
                mode: 0o644,
                uid: 1,
                gid: 1,
                now,
            })
            .unwrap();
        assert!(a.attr.is_some());
        tiered.push(TieredBlock { id: i + 1, offset: i * 3000, len: 100 + (i % 1000) as u32, crc: i as u32 });
    }
    s.apply(&Command::RecordTiered {
        object: 77,
        kind: ObjectKind::Pack,
        size_bytes: files * 3000 + 48,
        blocks: tiered,
        from: None,
        now,
    })
    .unwrap();
    s.apply(&Command::SetPin { ino: 2, pinned: true }).unwrap();
    s.apply(&Command::KeepObjects { epoch: 4, oldest_retained: 2, objects: vec![77] }).unwrap();
    s.check_invariants().unwrap();
    s
}

fn store() -> (tempfile::TempDir, Arc<dyn ObjectStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().to_path_buf()).unwrap());
    (dir, s)
}

async fn write(store: &Arc<dyn ObjectStore>, s: &MetaState, epoch: u64, part_bytes: usize) -> Root {
    let heat = BTreeMap::from([(3, 9)]);
    let settings = BTreeMap::from([("block_size".to_string(), "4MiB".to_string())]);
    let root = write_state(store.clone(), epoch, s, &heat, settings, part_bytes, 5).await.unwrap();
    switch_latest(store, epoch).await.unwrap();
    root
}

/// The state a manifest restores: the original without what stays behind (access keys).
fn expected(s: &MetaState) -> MetaState {
    let mut e = s.clone();
    e.access_keys.clear();
    e
}

#[tokio::test]
async fn round_trip_in_many_parts() {
    let (_d, store) = store();
    let s = state(2000);
    let root = write(&store, &s, 4, 1024).await;
    assert!(root.parts.len() >= 2, "small parts: {}", root.parts.len());
    assert_eq!((root.summary.files, root.summary.dirs, root.summary.objects), (2000, 2, 1));
    assert_eq!(read_latest(&store).await.unwrap(), 4);
    let loaded = read_manifest(&store, 4).await.unwrap();
    assert_eq!(loaded.state, expected(&s));
    assert_eq!(loaded.heat.get(&3), Some(&9));
    assert_eq!(loaded.header.settings["block_size"], "4MiB");
}

#[tokio::test]
async fn missing_latest_and_existing_epoch_are_clear_errors() {
    let (_d, store) = store();
    assert!(matches!(read_latest(&store).await, Err(ManifestError::NoLatest(_))));
    let s = state(3);
    write(&store, &s, 4, 1 << 20).await;
    let again = write_state(store.clone(), 4, &s, &BTreeMap::new(), BTreeMap::new(), 1 << 20, 6).await;
    assert!(again.unwrap_err().to_string().contains("already exists"));
}

#[tokio::test]
async fn newer_version_truncated_and_corrupt_manifests_are_refused() {
    let (dir, store) = store();
    let s = state(3000);
    let root = write(&store, &s, 4, 1024).await;
    let path = |k: &str| dir.path().join(k);
    // A newer root version.
    let good_root = std::fs::read(path(&root_key(4))).unwrap();
    let mut newer = good_root.clone();
    newer[4..6].copy_from_slice(&(MANIFEST_VERSION + 1).to_le_bytes());
    std::fs::write(path(&root_key(4)), &newer).unwrap();
    let e = read_manifest(&store, 4).await.unwrap_err();
    assert!(matches!(e, ManifestError::NewerVersion { .. }), "{e}");
    assert!(e.to_string().contains("upgrade tidepool"));
    // A flipped byte in the root.
    let mut flipped = good_root.clone();
    flipped[10] ^= 1;
    std::fs::write(path(&root_key(4)), &flipped).unwrap();
    assert!(matches!(read_manifest(&store, 4).await, Err(ManifestError::Corrupt(_))));
    std::fs::write(path(&root_key(4)), &good_root).unwrap();
    // A truncated part, a corrupt part, a missing part.
    let (k, _, _) = &root.parts[1];
    let good_part = std::fs::read(path(k)).unwrap();
    std::fs::write(path(k), &good_part[..good_part.len() / 2]).unwrap();
    assert!(matches!(read_manifest(&store, 4).await, Err(ManifestError::Corrupt(_))));
    let mut bad = good_part.clone();
    bad[0] ^= 0xff;
    std::fs::write(path(k), &bad).unwrap();
    assert!(matches!(read_manifest(&store, 4).await, Err(ManifestError::Corrupt(_))));
    std::fs::remove_file(path(k)).unwrap();
    assert!(read_manifest(&store, 4).await.is_err());
    std::fs::write(path(k), &good_part).unwrap();
    assert_eq!(read_manifest(&store, 4).await.unwrap().state, expected(&s));
    // A corrupt LATEST.
    std::fs::write(path(LATEST_KEY), b"tidepool-manifest-latest v1\nepoch 5\ncrc 00000000\n").unwrap();
    assert!(matches!(read_latest(&store).await, Err(ManifestError::Corrupt(_))));
}

#[tokio::test]
async fn retention_deletes_older_manifests_roots_first() {
    let (_d, store) = store();
    let s = state(5);
    for epoch in 1..=4 {
        write(&store, &s, epoch, 1 << 20).await;
    }
    assert_eq!(delete_older_than(&store, 3).await.unwrap(), 4); // two roots, two parts
    assert!(store.head(&root_key(2)).await.unwrap().is_none());
    assert!(read_manifest(&store, 3).await.is_ok());
    assert_eq!(epoch_of_key(&part_key(12, 3)), Some(12));
    assert_eq!(epoch_of_key(LATEST_KEY), None);
}
