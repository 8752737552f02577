//! The `NFSFileSystem` over a real `Fs` (in-memory device, Raft log in a temp folder), called
//! directly: every operation, the error mapping, readdir cookies while the directory changes,
//! and file handles that survive reopening the filesystem.

use std::sync::Arc;

use nfsserve::nfs::{ftype3, nfsstat3, nfstime3, sattr3, set_atime, set_mode3, set_mtime, set_size3};
use nfsserve::vfs::NFSFileSystem;
use tidepool_fs::ROOT_INO;
use tidepool_nfs::{AuthSys, Caller, ExportOptions, NfsMetrics, StableHow, TidepoolNfs, with_caller};
use tidepool_spdk::BlockDevice;
use tidepool_spdk::device::mem::MemDevice;

mod common;

use common::open_fs;

fn name(s: &str) -> nfsserve::nfs::filename3 {
    s.as_bytes().into()
}

/// A call from 127.0.0.1 as root over AUTH_SYS (the default export admits and does not squash it).
fn root() -> Caller {
    Caller { peer: "127.0.0.1:700".parse().unwrap(), auth: Some(AuthSys { uid: 0, gid: 0, gids: vec![] }) }
}

fn err<T: std::fmt::Debug>(r: Result<T, nfsstat3>) -> String {
    format!("{:?}", r.expect_err("expected an error"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_over_fs() {
    with_caller(root(), every_operation_body()).await
}

async fn every_operation_body() {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
    let fs = open_fs(dir.path(), &dev, true).await;
    let metrics = Arc::new(NfsMetrics::default());
    let nfs = TidepoolNfs::new(&fs, "cluster-a", metrics.clone());
    let root = nfs.root_dir();
    assert_eq!(root, ROOT_INO);

    // mkdir, create, write across blocks, read with eof.
    let (d, dattr) = nfs.mkdir(root, &name("d"), &sattr3::default()).await.unwrap();
    assert!(matches!(dattr.ftype, ftype3::NF3DIR));
    let (f, _) = nfs.create(d, &name("f"), sattr3::default()).await.unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let a = nfs.write(f, 0, &data).await.unwrap();
    assert_eq!(a.size, data.len() as u64);
    assert_eq!((a.fileid, a.fsid), (f, nfs.fsid()));
    let (got, eof) = nfs.read(f, 0, 100_000).await.unwrap();
    assert!(got == data[..100_000] && !eof);
    let (got, eof) = nfs.read(f, 100_000, 200_000).await.unwrap();
    assert!(got == data[100_000..] && eof);
    assert_eq!(nfs.lookup(d, &name("f")).await.unwrap(), f);
    assert_eq!(nfs.lookup(d, &name("..")).await.unwrap(), root);
    assert_eq!(err(nfs.lookup(d, &name("nope")).await), "NFS3ERR_NOENT");

    // setattr: mode, uid, gid, size, times.
    let set = sattr3 {
        mode: set_mode3::mode(0o600),
        uid: nfsserve::nfs::set_uid3::uid(1000),
        gid: nfsserve::nfs::set_gid3::gid(1001),
        size: set_size3::size(10),
        atime: set_atime::SET_TO_CLIENT_TIME(nfstime3 { seconds: 1_000_000, nseconds: 5 }),
        mtime: set_mtime::SET_TO_CLIENT_TIME(nfstime3 { seconds: 2_000_000, nseconds: 7 }),
    };
    let a = nfs.setattr(f, set).await.unwrap();
    assert_eq!((a.mode, a.uid, a.gid, a.size), (0o600, 1000, 1001, 10));
    assert_eq!((a.atime.seconds, a.atime.nseconds, a.mtime.seconds, a.mtime.nseconds), (1_000_000, 5, 2_000_000, 7));

    // CREATE UNCHECKED over an existing file applies the size; exclusive refuses it (no
    // verifier of its own); an exclusive create retransmitted with its verifier answers OK.
    let truncate = sattr3 { size: set_size3::size(0), ..sattr3::default() };
    let (f2, a) = nfs.create(d, &name("f"), truncate).await.unwrap();
    assert_eq!((f2, a.size), (f, 0));
    assert_eq!(err(nfs.create_exclusive(d, &name("f"), [1; 8]).await), "NFS3ERR_EXIST");
    let x = nfs.create_exclusive(d, &name("x"), [7; 8]).await.unwrap();
    assert_ne!(x, f);
    assert_eq!(nfs.create_exclusive(d, &name("x"), [7; 8]).await.unwrap(), x, "a retransmission is OK");
    assert_eq!(err(nfs.create_exclusive(d, &name("x"), [8; 8]).await), "NFS3ERR_EXIST");
    assert_eq!(err(nfs.create(root, &name("d"), sattr3::default()).await), "NFS3ERR_EXIST");

    // symlink + readlink; write to a directory.
    let (l, la) = nfs.symlink(d, &name("l"), &b"f".as_slice().into(), &sattr3::default()).await.unwrap();
    assert!(matches!(la.ftype, ftype3::NF3LNK));
    assert_eq!(nfs.readlink(l).await.unwrap().0, b"f");
    assert_eq!(err(nfs.write(d, 0, b"x").await), "NFS3ERR_ISDIR");
    assert_eq!(err(nfs.mkdir(d, &name(&"n".repeat(300)), &sattr3::default()).await), "NFS3ERR_NAMETOOLONG");

    // rename, remove (file, symlink, dir through the same call), NOTEMPTY.
    nfs.rename(d, &name("x"), root, &name("y")).await.unwrap();
    assert_eq!(nfs.lookup(root, &name("y")).await.unwrap(), x);
    assert_eq!(err(nfs.remove(root, &name("d")).await), "NFS3ERR_NOTEMPTY");
    nfs.remove(d, &name("l")).await.unwrap();
    nfs.remove(d, &name("f")).await.unwrap();
    nfs.remove(root, &name("d")).await.unwrap();
    assert_eq!(err(nfs.lookup(root, &name("d")).await), "NFS3ERR_NOENT");

    // A handle of a deleted file is stale, even once a new file takes its name.
    let fh = nfs.id_to_fh(x);
    assert_eq!(nfs.fh_to_id(&fh).unwrap(), x);
    nfs.remove(root, &name("y")).await.unwrap();
    assert_eq!(err(nfs.fh_to_id(&fh)), "NFS3ERR_STALE");
    nfs.create(root, &name("y"), sattr3::default()).await.unwrap();
    assert_eq!(err(nfs.fh_to_id(&fh)), "NFS3ERR_STALE");
    let other = TidepoolNfs::new(&fs, "cluster-b", Arc::new(NfsMetrics::default()));
    assert_eq!(err(other.fh_to_id(&nfs.id_to_fh(root))), "NFS3ERR_STALE");

    let info = nfs.fsinfo(root).await.unwrap();
    assert_eq!((info.wtmax, info.maxfilesize, info.time_delta.nseconds), (1 << 20, i64::MAX as u64, 1));

    let ops = metrics.ops();
    assert!(ops[&("write", "ok")] >= 1 && ops[&("lookup", "NOENT")] >= 1, "{ops:?}");
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(text.contains("tidepool_nfs_ops_total{op=\"create\",status=\"ok\"}"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdir_cookies_survive_changes_and_restarts() {
    with_caller(root(), readdir_cookies_body()).await
}

async fn readdir_cookies_body() {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
    let fs = open_fs(dir.path(), &dev, true).await;
    let nfs = TidepoolNfs::new(&fs, "c", Arc::new(NfsMetrics::default()));
    let (d, _) = nfs.mkdir(ROOT_INO, &name("big"), &sattr3::default()).await.unwrap();
    for i in 0..300 {
        nfs.create(d, &name(&format!("e{i:03}")), sattr3::default()).await.unwrap();
    }
    // Page by 50, deleting the entry each cookie names before using it, and adding entries
    // before and after the cursor: every original entry that stayed is listed exactly once.
    let mut seen = Vec::new();
    let mut cookie = 0;
    loop {
        let page = nfs.readdir(d, cookie, 50).await.unwrap();
        for e in &page.entries {
            seen.push(String::from_utf8(e.name.0.clone()).unwrap());
        }
        if page.end {
            break;
        }
        let last = page.entries.last().unwrap();
        cookie = last.fileid;
        nfs.remove(d, &last.name).await.unwrap();
        nfs.create(d, &name("a-before"), sattr3::default()).await.ok();
    }
    let want: Vec<String> = (0..300).map(|i| format!("e{i:03}")).collect();
    let got: Vec<String> = seen.iter().filter(|n| n.starts_with('e')).cloned().collect();
    assert_eq!(got, want);

    // After a restart the cookie memory is empty: a cookie naming a live entry is found by
    // scanning; one naming an entry gone is BAD_COOKIE.
    let live = nfs.lookup(d, &name("e100")).await.unwrap();
    let fh = nfs.id_to_fh(live);
    drop(nfs);
    Arc::try_unwrap(fs).ok().unwrap().shutdown().await.unwrap();
    let fs = open_fs(dir.path(), &dev, false).await;
    let nfs = TidepoolNfs::new(&fs, "c", Arc::new(NfsMetrics::default()));
    assert_eq!(nfs.fh_to_id(&fh).unwrap(), live, "a handle stays valid across a restart");
    assert_eq!(nfs.getattr(nfs.fh_to_id(&fh).unwrap()).await.unwrap().fileid, live);
    let page = nfs.readdir(d, live, 1).await.unwrap();
    assert_eq!(page.entries[0].name.0, b"e101");
    let gone = nfs.create_exclusive(d, &name("zz"), [0; 8]).await.unwrap();
    nfs.remove(d, &name("zz")).await.unwrap();
    assert_eq!(err(nfs.readdir(d, gone, 10).await), "NFS3ERR_BAD_COOKIE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_read_only_and_spin_down_rofs() {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
    let fs = open_fs(dir.path(), &dev, true).await;
    let only2 = ExportOptions { allowed_clients: vec!["127.0.0.2/32".parse().unwrap()], ..Default::default() };
    let nfs = TidepoolNfs::new(&fs, "c", Arc::new(NfsMetrics::default())).with_exports(only2);
    // The address check the RPC layer asks before MOUNT and every call.
    let from = |ip: &str| Caller { peer: format!("{ip}:900").parse().unwrap(), auth: None };
    assert!(nfs.admit(&from("127.0.0.2")).is_ok());
    assert_eq!(err(nfs.admit(&from("127.0.0.1"))), "NFS3ERR_ACCES");
    assert_eq!(err(nfs.admit(&from("10.0.0.2"))), "NFS3ERR_ACCES");
    // Outside any RPC there is no caller: refused, not treated as root.
    assert_eq!(err(nfs.create(ROOT_INO, &name("x"), sattr3::default()).await), "NFS3ERR_ACCES");

    with_caller(root(), async {
        let nfs = TidepoolNfs::new(&fs, "c", Arc::new(NfsMetrics::default()));
        let (f, _) = nfs.create(ROOT_INO, &name("f"), sattr3::default()).await.unwrap();
        // UNSTABLE writes: answered UNSTABLE, seen at once by GETATTR and READ of this server.
        let (a, how) = nfs.write_stable(f, 0, &[5; 300_000], StableHow::Unstable).await.unwrap();
        assert_eq!((how, a.size), (StableHow::Unstable, 300_000));
        let (a, _) = nfs.write_stable(f, 300_000, &[6; 1000], StableHow::Unstable).await.unwrap();
        assert_eq!(a.size, 301_000);
        assert_eq!(nfs.getattr(f).await.unwrap().size, 301_000);
        let (got, eof) = nfs.read(f, 299_999, 10).await.unwrap();
        assert!(got == [5, 6, 6, 6, 6, 6, 6, 6, 6, 6] && !eof);
        nfs.commit(f, 0, 0).await.unwrap();
        assert_eq!(fs.getattr(f).unwrap().size, 301_000, "durable in the fs after COMMIT");
        let (_, how) = nfs.write_stable(f, 0, b"x", StableHow::DataSync).await.unwrap();
        assert_eq!(how, StableHow::FileSync);

        // Spin-down makes the fs read-only: changes answer ROFS, reads still work.
        fs.set_read_only(true);
        assert_eq!(err(nfs.write(f, 0, b"y").await), "NFS3ERR_ROFS");
        assert_eq!(err(nfs.write_stable(f, 0, b"y", StableHow::Unstable).await), "NFS3ERR_ROFS");
        assert_eq!(err(nfs.create(ROOT_INO, &name("g"), sattr3::default()).await), "NFS3ERR_ROFS");
        assert_eq!(err(nfs.mkdir(ROOT_INO, &name("d"), &sattr3::default()).await), "NFS3ERR_ROFS");
        assert_eq!(err(nfs.remove(ROOT_INO, &name("f")).await), "NFS3ERR_ROFS");
        assert_eq!(nfs.read(f, 0, 1).await.unwrap().0, b"x");
        fs.set_read_only(false);

        // A read-only export: ROFS without asking the fs, ACCESS grants no change.
        let ro = TidepoolNfs::new(&fs, "c", Arc::new(NfsMetrics::default()))
            .with_exports(ExportOptions { read_only: true, ..Default::default() });
        assert_eq!(err(ro.write(f, 0, b"z").await), "NFS3ERR_ROFS");
        assert_eq!(err(ro.create(ROOT_INO, &name("g"), sattr3::default()).await), "NFS3ERR_ROFS");
        assert_eq!(err(ro.setattr(f, sattr3 { size: set_size3::size(0), ..sattr3::default() }).await), "NFS3ERR_ROFS");
        assert_eq!(ro.access(f, 0x3f).await.unwrap(), nfsserve::nfs::ACCESS3_READ);
        assert_eq!(nfs.access(f, 0x3f).await.unwrap(), 0x1f & !nfsserve::nfs::ACCESS3_LOOKUP & !0x10);
        let st = ro.fsstat(ROOT_INO).await.unwrap();
        assert_eq!((st.tbytes, st.abytes), (fs.stat().capacity_bytes, 0));
    })
    .await;
}

/// Sequential READs are read ahead; a range read ahead is never served once the file changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_never_serves_stale_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
    let fs = open_fs(dir.path(), &dev, true).await;
    with_caller(root(), async {
        let nfs = TidepoolNfs::new(&fs, "c", Arc::new(NfsMetrics::default()));
        let (f, _) = nfs.create(ROOT_INO, &name("seq"), sattr3::default()).await.unwrap();
        const C: usize = 100_000;
        let data: Vec<u8> = (0..6 * C).map(|i| (i % 253) as u8).collect();
        nfs.write(f, 0, &data).await.unwrap();
        // Chunks 0 and 1 in order (chunk 2 is then read ahead), then chunk 2 changes behind
        // NFS's back (as an S3 or `tidepool fs` write would): the READ sees the new bytes.
        for i in 0..2 {
            assert_eq!(nfs.read(f, (i * C) as u64, C as u32).await.unwrap().0, data[i * C..(i + 1) * C]);
        }
        fs.write(f, 2 * C as u64, &[9; C]).await.unwrap();
        assert_eq!(nfs.read(f, 2 * C as u64, C as u32).await.unwrap().0, vec![9; C]);
        // Unchanged, the rest reads as written, up to eof.
        for i in 3..6 {
            let (got, eof) = nfs.read(f, (i * C) as u64, C as u32).await.unwrap();
            assert!(got == data[i * C..(i + 1) * C] && eof == (i == 5), "chunk {i}");
        }
        // A SETATTR truncation between sequential READs: the short tail, not the old bytes.
        nfs.read(f, 0, C as u32).await.unwrap();
        nfs.setattr(f, sattr3 { size: set_size3::size((C + 10) as u64), ..sattr3::default() }).await.unwrap();
        let (got, eof) = nfs.read(f, C as u64, C as u32).await.unwrap();
        assert!(got == data[C..C + 10] && eof);
    })
    .await;
}
