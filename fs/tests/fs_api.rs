//! The filesystem API over a real meta group (Raft log in a temp folder) and a block store
//! on the in-memory device: every operation, the POSIX errors for misuse, copy-on-write,
//! and ENOSPC with nothing acknowledged lost.

use std::sync::Arc;

use tidepool_cluster::{ManualClock, MetaGroup, MetaState, RaftOptions};
use tidepool_fs::{ErrorKind, Fs, FsOptions, InodeKind, ROOT_INO, SetAttr};
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::{BlockDevice, BlockStore, StoreOptions};

struct Env {
    _dir: tempfile::TempDir,
    fs: Fs,
}

async fn env_with(device_bytes: u64, block: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(device_bytes));
    let opts = StoreOptions { segment_bytes: 4 << 20, max_block_bytes: block, crc_cache_bytes: 1 << 20 };
    let store = Arc::new(BlockStore::format(dev, opts).await.unwrap());
    let meta = MetaGroup::open(&dir.path().join("meta"), RaftOptions::default(), MetaState::new()).unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let (fs, report) =
        Fs::open(meta, store, clock, FsOptions { block_size: block, id_batch: 64, ..FsOptions::default() })
            .await
            .unwrap();
    assert_eq!(report.orphans_freed, 0);
    Env { _dir: dir, fs }
}

async fn env() -> Env {
    env_with(64 << 20, 1 << 20).await
}

fn errno<T: std::fmt::Debug>(r: Result<T, tidepool_fs::FsError>) -> i32 {
    r.unwrap_err().errno()
}

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_write_read_and_overwrite_is_copy_on_write() {
    let e = env().await;
    let fs = &e.fs;
    let f = fs.create(ROOT_INO, b"a", 0o644, 1000, 1000).await.unwrap();
    assert_eq!((f.kind, f.size, f.mode, f.uid), (InodeKind::File, 0, 0o644, 1000));
    // Spans three 1 MiB blocks.
    let data = bytes(1, 2_500_000);
    let a = fs.write(f.ino, 0, &data).await.unwrap();
    assert_eq!(a.size, data.len() as u64);
    assert_eq!(fs.read(f.ino, 0, data.len()).await.unwrap(), data);
    let blocks_before = fs.store().ids();
    // Overwrite a range straddling a block boundary: new blocks, old data elsewhere intact.
    let patch = bytes(7, 300_000);
    fs.write(f.ino, 900_000, &patch).await.unwrap();
    let mut want = data.clone();
    want[900_000..1_200_000].copy_from_slice(&patch);
    assert_eq!(fs.read(f.ino, 0, want.len() + 10).await.unwrap(), want, "read past EOF is short");
    let blocks_after = fs.store().ids();
    assert!(blocks_after.iter().any(|b| !blocks_before.contains(b)), "overwrite wrote new blocks");
    // Any sub-range.
    for (off, len) in [(0, 1), (899_999, 2), (1_199_999, 5), (2_499_999, 1), (1_048_575, 4097)] {
        assert_eq!(fs.read(f.ino, off, len).await.unwrap(), want[off as usize..off as usize + len]);
    }
    // Write past EOF leaves a hole of zeros.
    fs.write(f.ino, 3_000_000, b"tail").await.unwrap();
    let hole = fs.read(f.ino, 2_500_000, 500_000).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert_eq!(fs.read(f.ino, 3_000_000, 10).await.unwrap(), b"tail");
    assert_eq!(fs.read(f.ino, 10_000_000, 10).await.unwrap(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_shrinks_and_extends_and_frees_blocks() {
    let e = env().await;
    let fs = &e.fs;
    let f = fs.create(ROOT_INO, b"t", 0o600, 0, 0).await.unwrap();
    let data = bytes(3, 3 << 20);
    fs.write(f.ino, 0, &data).await.unwrap();
    assert_eq!(fs.store().ids().len(), 3);
    let a = fs.setattr(f.ino, SetAttr { size: Some(1000), ..Default::default() }).await.unwrap();
    assert_eq!(a.size, 1000);
    assert_eq!(fs.store().ids().len(), 1, "blocks past the new end are freed");
    let a = fs.setattr(f.ino, SetAttr { size: Some(5000), mode: Some(0o640), ..Default::default() }).await.unwrap();
    assert_eq!((a.size, a.mode), (5000, 0o640));
    let got = fs.read(f.ino, 0, 10_000).await.unwrap();
    assert_eq!(&got[..1000], &data[..1000]);
    assert!(got[1000..].iter().all(|&b| b == 0) && got.len() == 5000);
    let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).await.unwrap();
    assert_eq!(
        fs.setattr(dir.ino, SetAttr { size: Some(0), ..Default::default() }).await.unwrap_err().errno(),
        libc::EISDIR
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_errors_for_misuse() {
    let e = env().await;
    let fs = &e.fs;
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).await.unwrap();
    let f = fs.create(d.ino, b"f", 0o644, 0, 0).await.unwrap();
    assert_eq!(errno(fs.lookup(ROOT_INO, b"missing")), libc::ENOENT);
    assert_eq!(errno(fs.create(d.ino, b"f", 0o644, 0, 0).await), libc::EEXIST);
    assert_eq!(errno(fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).await), libc::EEXIST);
    assert_eq!(errno(fs.create(f.ino, b"x", 0o644, 0, 0).await), libc::ENOTDIR);
    assert_eq!(errno(fs.lookup(f.ino, b"x")), libc::ENOTDIR);
    assert_eq!(errno(fs.write(d.ino, 0, b"x").await), libc::EISDIR);
    assert_eq!(errno(fs.read(d.ino, 0, 1).await), libc::EISDIR);
    assert_eq!(errno(fs.rmdir(ROOT_INO, b"d").await), libc::ENOTEMPTY);
    assert_eq!(errno(fs.rmdir(d.ino, b"f").await), libc::ENOTDIR);
    assert_eq!(errno(fs.unlink(ROOT_INO, b"d").await), libc::EISDIR);
    assert_eq!(errno(fs.create(ROOT_INO, &[b'n'; 256], 0o644, 0, 0).await), libc::ENAMETOOLONG);
    assert!(fs.create(ROOT_INO, &[b'n'; 255], 0o644, 0, 0).await.is_ok(), "255 bytes is allowed");
    assert_eq!(errno(fs.create(ROOT_INO, b"a/b", 0o644, 0, 0).await), libc::EINVAL);
    assert_eq!(errno(fs.create(ROOT_INO, b"a\0b", 0o644, 0, 0).await), libc::EINVAL);
    assert_eq!(errno(fs.create(ROOT_INO, b"", 0o644, 0, 0).await), libc::EINVAL);
    assert_eq!(errno(fs.create(ROOT_INO, b"..", 0o644, 0, 0).await), libc::EINVAL);
    assert_eq!(errno(fs.getattr(999_999)), libc::ENOENT);
    assert_eq!(errno(fs.readlink(f.ino)), libc::EINVAL);
    // Misuse changed nothing.
    let (list, eof) = fs.readdir(d.ino, None, 10).unwrap();
    assert!(eof);
    assert_eq!(list.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), vec![b"f".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_over_existing_and_across_directories() {
    let e = env().await;
    let fs = &e.fs;
    let a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0).await.unwrap();
    let b = fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0).await.unwrap();
    let x = fs.create(a.ino, b"x", 0o644, 0, 0).await.unwrap();
    fs.write(x.ino, 0, b"xxxx").await.unwrap();
    let y = fs.create(b.ino, b"y", 0o644, 0, 0).await.unwrap();
    fs.write(y.ino, 0, b"yy").await.unwrap();
    assert_eq!(fs.store().ids().len(), 2);
    fs.rename(a.ino, b"x", b.ino, b"y").await.unwrap();
    assert_eq!(fs.lookup(a.ino, b"x").unwrap_err().kind(), ErrorKind::NotFound);
    let moved = fs.lookup(b.ino, b"y").unwrap();
    assert_eq!(moved.ino, x.ino);
    assert_eq!(fs.read(moved.ino, 0, 10).await.unwrap(), b"xxxx");
    assert_eq!(fs.store().ids().len(), 1, "the replaced file's blocks are freed");
    assert_eq!(fs.getattr(y.ino).unwrap_err().kind(), ErrorKind::NotFound);
    // Directory moves, and the errors of rename.
    fs.rename(ROOT_INO, b"a", b.ino, b"a2").await.unwrap();
    assert_eq!(fs.resolve(b"/b/a2").unwrap().ino, a.ino);
    assert_eq!(fs.rename(ROOT_INO, b"b", a.ino, b"inside").await.unwrap_err().errno(), libc::EINVAL);
    let f = fs.create(ROOT_INO, b"f", 0o644, 0, 0).await.unwrap();
    assert_eq!(fs.rename(ROOT_INO, b"f", ROOT_INO, b"b").await.unwrap_err().errno(), libc::EISDIR);
    assert_eq!(fs.rename(ROOT_INO, b"b", ROOT_INO, b"f").await.unwrap_err().errno(), libc::ENOTDIR);
    let empty = fs.mkdir(ROOT_INO, b"empty", 0o755, 0, 0).await.unwrap();
    fs.create(a.ino, b"keep", 0o644, 0, 0).await.unwrap(); // a2 is not empty now
    assert_eq!(fs.rename(ROOT_INO, b"empty", b.ino, b"a2").await.unwrap_err().errno(), libc::ENOTEMPTY);
    fs.rename(b.ino, b"a2", ROOT_INO, b"empty").await.unwrap(); // over an empty dir
    assert_eq!(fs.getattr(empty.ino).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(fs.rename(ROOT_INO, b"nope", ROOT_INO, b"z").await.unwrap_err().errno(), libc::ENOENT);
    assert_eq!(fs.getattr(f.ino).unwrap().kind, InodeKind::File);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_readdir_paging_xattrs_unlink_rmdir() {
    let e = env().await;
    let fs = &e.fs;
    let l = fs.symlink(ROOT_INO, b"link", b"../some/where", 0, 0).await.unwrap();
    assert_eq!(l.kind, InodeKind::Symlink);
    assert_eq!(fs.readlink(l.ino).unwrap(), b"../some/where");
    let d = fs.mkdir(ROOT_INO, b"many", 0o755, 0, 0).await.unwrap();
    for i in 0..250 {
        fs.create(d.ino, format!("n{i:04}").as_bytes(), 0o644, 0, 0).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (page, eof) = fs.readdir(d.ino, after.as_deref(), 64).unwrap();
        assert!(page.len() <= 64);
        seen.extend(page.iter().map(|e| e.name.clone()));
        after = page.last().map(|e| e.name.clone());
        if eof {
            break;
        }
    }
    let want: Vec<Vec<u8>> = (0..250).map(|i| format!("n{i:04}").into_bytes()).collect();
    assert_eq!(seen, want, "every entry once, in name order");

    let f = fs.lookup(d.ino, b"n0001").unwrap();
    fs.set_xattr(f.ino, "dataset", "train").await.unwrap();
    fs.set_xattr(f.ino, "loss", "0.31").await.unwrap();
    assert_eq!(fs.get_xattr(f.ino, "loss").unwrap().as_deref(), Some("0.31"));
    fs.remove_xattr(f.ino, "loss").await.unwrap();
    assert_eq!(fs.get_xattrs(f.ino).unwrap().into_iter().collect::<Vec<_>>(), vec![("dataset".into(), "train".into())]);
    fs.replace_xattrs(f.ino, [("a".to_string(), "1".to_string())].into()).await.unwrap();
    assert_eq!(fs.get_xattrs(f.ino).unwrap().len(), 1);

    for i in 0..250 {
        fs.unlink(d.ino, format!("n{i:04}").as_bytes()).await.unwrap();
    }
    fs.rmdir(ROOT_INO, b"many").await.unwrap();
    fs.unlink(ROOT_INO, b"link").await.unwrap();
    let (list, eof) = fs.readdir(ROOT_INO, None, 10).unwrap();
    assert!(list.is_empty() && eof);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_refuses_writes() {
    let e = env().await;
    let fs = &e.fs;
    let f = fs.create(ROOT_INO, b"f", 0o644, 0, 0).await.unwrap();
    fs.set_read_only(true);
    assert_eq!(fs.write(f.ino, 0, b"x").await.unwrap_err().errno(), libc::EROFS);
    assert_eq!(fs.create(ROOT_INO, b"g", 0o644, 0, 0).await.unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(fs.read(f.ino, 0, 1).await.unwrap(), b"", "reads still work");
    fs.set_read_only(false);
    fs.write(f.ino, 0, b"x").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_when_full_loses_nothing_acknowledged() {
    // 32 MiB device, 4 MiB segments: a few segments of room.
    let e = env_with(32 << 20, 1 << 20).await;
    let fs = &e.fs;
    let mut files = Vec::new();
    let mut full = None;
    for i in 0..64u8 {
        let f = fs.create(ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0, 0).await.unwrap();
        let data = bytes(i, 1 << 20);
        match fs.write(f.ino, 0, &data).await {
            Ok(_) => files.push((f.ino, data)),
            Err(err) => {
                full = Some(err);
                break;
            }
        }
    }
    let err = full.expect("a 32 MiB device fills up before 64 MiB are written");
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(!files.is_empty());
    for (ino, data) in &files {
        assert_eq!(&fs.read(*ino, 0, data.len()).await.unwrap(), data, "acknowledged data intact after ENOSPC");
    }
    // Free space and write again. Segments hold three 1 MiB blocks and one segment is kept
    // for the cleaner, so free two segments' worth for certain whatever the layout.
    for _ in 0..6 {
        let (victim, _) = files.remove(0);
        fs.setattr(victim, SetAttr { size: Some(0), ..Default::default() }).await.unwrap();
    }
    fs.store().clean().await.unwrap();
    let g = fs.create(ROOT_INO, b"after", 0o644, 0, 0).await.unwrap();
    fs.write(g.ino, 0, &bytes(9, 1 << 20)).await.expect("room again after deleting and cleaning");
    for (ino, data) in &files {
        assert_eq!(&fs.read(*ino, 0, data.len()).await.unwrap(), data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_upload_commits_once_or_leaves_nothing() {
    let e = env().await;
    let fs = &e.fs;
    let f = fs.create(ROOT_INO, b"up", 0o644, 0, 0).await.unwrap();
    let parts: Vec<Vec<u8>> = (0..5).map(|i| bytes(i, 700_000)).collect();
    let mut staged = tidepool_fs::Staged::default();
    for p in &parts {
        staged.append(fs.stage(p).await.unwrap());
    }
    assert_eq!(staged.len_bytes(), 3_500_000);
    assert_eq!(fs.getattr(f.ino).unwrap().size, 0, "nothing visible before the commit");
    let commits_before = fs.meta().status().commit_index;
    let a = fs.commit_staged(f.ino, 0, staged).await.unwrap();
    assert_eq!(fs.meta().status().commit_index, commits_before + 1, "one metadata commit for the whole body");
    assert_eq!(a.size, 3_500_000);
    assert_eq!(fs.read(f.ino, 0, 4_000_000).await.unwrap(), parts.concat());

    // Aborted: the staged blocks go away and the file is untouched.
    let blocks_before = fs.store().ids().len();
    let s = fs.stage(&bytes(9, 2_000_000)).await.unwrap();
    assert!(fs.store().ids().len() > blocks_before);
    fs.discard_staged(s).await;
    assert_eq!(fs.store().ids().len(), blocks_before);
    // A commit to a file that is gone fails and frees its blocks.
    let s = fs.stage(&bytes(3, 10_000)).await.unwrap();
    fs.unlink(ROOT_INO, b"up").await.unwrap();
    assert_eq!(fs.commit_staged(f.ino, 0, s).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(fs.store().ids().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concat_moves_parts_into_a_file_without_copying() {
    let e = env().await;
    let fs = &e.fs;
    let up = fs.mkdir(ROOT_INO, b"up", 0o755, 0, 0).await.unwrap();
    let parts: Vec<Vec<u8>> = vec![bytes(1, 1_500_000), bytes(2, 10), bytes(3, 2_100_000)];
    let mut inos = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let f = fs.create(up.ino, format!("{}", i + 1).as_bytes(), 0o644, 0, 0).await.unwrap();
        fs.write(f.ino, 0, p).await.unwrap();
        inos.push(f.ino);
    }
    let dst = fs.create(ROOT_INO, b"obj", 0o644, 0, 0).await.unwrap();
    let blocks_before = fs.store().ids();
    let commits_before = fs.meta().status().commit_index;
    // Out of order on purpose: the order given is the order of the bytes.
    let a = fs.concat(dst.ino, &[inos[2], inos[0], inos[1]]).await.unwrap();
    assert_eq!(fs.meta().status().commit_index, commits_before + 1, "one metadata commit");
    assert_eq!(a.size, 3_600_010);
    let want = [parts[2].clone(), parts[0].clone(), parts[1].clone()].concat();
    assert_eq!(fs.read(dst.ino, 0, want.len() + 1).await.unwrap(), want);
    assert_eq!(fs.store().ids(), blocks_before, "no block written or freed");
    assert!(fs.readdir(up.ino, None, 10).unwrap().0.is_empty(), "sources removed");
    assert_eq!(fs.getattr(inos[0]).unwrap_err().kind(), ErrorKind::NotFound);
    // Misuse is refused and changes nothing.
    let other = fs.create(up.ino, b"x", 0o644, 0, 0).await.unwrap();
    assert_eq!(fs.concat(dst.ino, &[other.ino, other.ino]).await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(fs.concat(dst.ino, &[up.ino]).await.unwrap_err().kind(), ErrorKind::IsDir);
    assert_eq!(fs.concat(dst.ino, &[]).await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(fs.getattr(dst.ino).unwrap().size, 3_600_010);
    // The moved blocks belong to the destination now: removing it frees them all.
    fs.unlink(ROOT_INO, b"obj").await.unwrap();
    assert_eq!(fs.store().ids().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_creates_or_replaces_a_file_in_one_commit() {
    use std::collections::BTreeMap;
    let e = env().await;
    let fs = &e.fs;
    let meta = |k: &str| BTreeMap::from([(k.to_string(), "v".to_string())]);
    // Create: content and xattrs exact, one commit; `xattrs` gets the new mtime.
    let body = bytes(1, 2_500_000);
    let s = fs.stage(&body).await.unwrap();
    let commits_before = fs.meta().status().commit_index;
    let mut seen = 0;
    let a = fs
        .publish(
            ROOT_INO,
            b"obj",
            s,
            |now| {
                seen = now;
                meta("a")
            },
            0o640,
            3,
            4,
        )
        .await
        .unwrap();
    assert_eq!(fs.meta().status().commit_index, commits_before + 1, "one metadata commit");
    assert_eq!((a.kind, a.size, a.mode, a.uid, a.gid, a.mtime), (InodeKind::File, 2_500_000, 0o640, 3, 4, seen));
    assert_eq!(fs.lookup(ROOT_INO, b"obj").unwrap(), a);
    assert_eq!(fs.read(a.ino, 0, 3_000_000).await.unwrap(), body);
    assert_eq!(fs.get_xattrs(a.ino).unwrap(), meta("a"));
    let old_blocks = fs.store().ids();

    // Replace: new inode, old blocks freed, exact new content and xattrs (old ones gone).
    let body2 = bytes(2, 10_000);
    let s = fs.stage(&body2).await.unwrap();
    let commits_before = fs.meta().status().commit_index;
    let b = fs.publish(ROOT_INO, b"obj", s, |_| meta("b"), 0o644, 0, 0).await.unwrap();
    assert_eq!(fs.meta().status().commit_index, commits_before + 1, "one metadata commit");
    assert_ne!(b.ino, a.ino);
    assert_eq!(fs.getattr(a.ino).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(fs.read(b.ino, 0, 20_000).await.unwrap(), body2);
    assert_eq!(fs.get_xattrs(b.ino).unwrap(), meta("b"));
    let now_blocks = fs.store().ids();
    assert!(old_blocks.iter().all(|id| !now_blocks.contains(id)), "old blocks freed");
    assert_eq!(now_blocks.len(), 1);
    // An empty body: an empty file.
    let c =
        fs.publish(ROOT_INO, b"obj", tidepool_fs::Staged::default(), |_| BTreeMap::new(), 0o644, 0, 0).await.unwrap();
    assert_eq!(c.size, 0);
    assert_eq!(fs.store().ids().len(), 0);

    // A directory of that name: IsDir; a missing parent: NotFound. Nothing changes and the
    // staged blocks are discarded.
    fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).await.unwrap();
    let s = fs.stage(&bytes(3, 5_000)).await.unwrap();
    assert_eq!(fs.publish(ROOT_INO, b"d", s, |_| meta("x"), 0o644, 0, 0).await.unwrap_err().kind(), ErrorKind::IsDir);
    assert_eq!(fs.store().ids().len(), 0);
    assert_eq!(fs.lookup(ROOT_INO, b"d").unwrap().kind, InodeKind::Dir);
    let s = fs.stage(&bytes(3, 5_000)).await.unwrap();
    assert_eq!(fs.publish(999, b"x", s, |_| meta("x"), 0o644, 0, 0).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(fs.store().ids().len(), 0);
    // try_publish hands the blocks back instead: a retry under a real parent succeeds.
    let s = fs.stage(&bytes(4, 5_000)).await.unwrap();
    let (err, s) = fs.try_publish(999, b"x", s, |_| meta("x"), 0o644, 0, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(fs.store().ids().len(), 1);
    let x = fs.try_publish(ROOT_INO, b"x", s, |_| meta("x"), 0o644, 0, 0).await.unwrap();
    assert_eq!(fs.read(x.ino, 0, 10_000).await.unwrap(), bytes(4, 5_000));
    assert_eq!(fs.readdir(ROOT_INO, None, 10).unwrap().0.len(), 3);
}
