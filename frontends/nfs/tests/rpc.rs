//! The NFS server over TCP (the real `NfsServer` over a real `Fs`) driven by a real NFSv3
//! client library (`nfs3_client`), connecting from chosen loopback source addresses: the
//! export's address list refuses MOUNT and every NFS call (with a handle got earlier) from an
//! address outside it; COMMIT, UNSTABLE writes and the write verifier; plain READDIR paging
//! with cookies; CREATE EXCLUSIVE retransmitted; LINK and MKNOD NOTSUPP; FSSTAT's figures;
//! ACCESS and root squash with AUTH_SYS credentials.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use nfs3_client::nfs3_types::mount::{dirpath, mountstat3};
use nfs3_client::nfs3_types::nfs3::*;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioIo;
use nfs3_client::{MountClient, Nfs3Client};
use tidepool_fs::Fs;
use tidepool_nfs::{ExportOptions, NfsMetrics, NfsServer, TidepoolNfs};
use tidepool_spdk::BlockDevice;
use tidepool_spdk::device::mem::MemDevice;
use tokio::net::{TcpSocket, TcpStream};

mod common;

async fn open_fs(dir: &std::path::Path) -> Arc<Fs> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
    common::open_fs(dir, &dev, true).await
}

/// Serve `fs` on 127.0.0.1 with `exports`; returns the address.
async fn serve(fs: &Arc<Fs>, exports: ExportOptions) -> SocketAddr {
    let nfs = TidepoolNfs::new(fs, "rpc-test", Arc::new(NfsMetrics::default())).with_exports(exports);
    let server = NfsServer::bind("127.0.0.1:0", nfs).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve());
    addr
}

/// A TCP connection to `to` from source address `from` (any port).
async fn connect(from: &str, to: SocketAddr) -> TokioIo<TcpStream> {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0)).unwrap();
    TokioIo::new(s.connect(to).await.unwrap())
}

fn cred(uid: u32, gid: u32) -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix {
        stamp: 1,
        machinename: Opaque::owned(b"test".to_vec()),
        uid,
        gid,
        gids: vec![gid],
    })
}

async fn mount(from: &str, to: SocketAddr) -> Result<nfs_fh3, String> {
    let mut m = MountClient::new_with_auth(connect(from, to).await, cred(0, 0), opaque_auth::default());
    match m.mnt(dirpath(Opaque::owned(b"/".to_vec()))).await {
        Ok(ok) => Ok(nfs_fh3 { data: Opaque::owned(ok.fhandle.0.to_vec()) }),
        Err(e) => Err(format!("{e:?}")),
    }
}

async fn client(from: &str, to: SocketAddr, uid: u32, gid: u32) -> Nfs3Client<TokioIo<TcpStream>> {
    Nfs3Client::new_with_auth(connect(from, to).await, cred(uid, gid), opaque_auth::default())
}

fn status<T, E>(r: Nfs3Result<T, E>) -> nfsstat3 {
    match r {
        Nfs3Result::Ok(_) => nfsstat3::NFS3_OK,
        Nfs3Result::Err((s, _)) => s,
    }
}

fn no_attrs() -> sattr3 {
    sattr3::default()
}

fn fname(s: &str) -> filename3<'static> {
    filename3(Opaque::owned(s.as_bytes().to_vec()))
}

fn fh_of(obj: post_op_fh3) -> nfs_fh3 {
    match obj {
        Nfs3Option::Some(h) => h,
        Nfs3Option::None => panic!("no handle"),
    }
}

async fn create(c: &mut Nfs3Client<TokioIo<TcpStream>>, dir: &nfs_fh3, name: &str, how: createhow3) -> CREATE3res {
    c.create(&CREATE3args { where_: diropargs3 { dir: dir.clone(), name: fname(name) }, how }).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_addresses_at_mount_and_on_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let fs = open_fs(dir.path()).await;
    let exports = ExportOptions { allowed_clients: vec!["127.0.0.2/32".parse().unwrap()], ..Default::default() };
    let addr = serve(&fs, exports).await;

    // 127.0.0.2 is allowed: it mounts and uses the handle.
    let root = mount("127.0.0.2", addr).await.unwrap();
    let mut ok = client("127.0.0.2", addr, 0, 0).await;
    assert!(matches!(ok.getattr(&GETATTR3args { object: root.clone() }).await.unwrap(), Nfs3Result::Ok(_)));
    let f = fh_of(create(&mut ok, &root, "f", createhow3::UNCHECKED(no_attrs())).await.unwrap().obj);

    // 127.0.0.3 and 127.0.0.1 are not: MOUNT is refused, and so is every call with the
    // handles 127.0.0.2 got, on a connection of their own.
    for from in ["127.0.0.3", "127.0.0.1"] {
        let e = mount(from, addr).await.unwrap_err();
        assert!(e.contains(&format!("{:?}", mountstat3::MNT3ERR_ACCES)), "{from}: {e}");
        let mut bad = client(from, addr, 0, 0).await;
        let st = status(bad.getattr(&GETATTR3args { object: root.clone() }).await.unwrap());
        assert_eq!(st, nfsstat3::NFS3ERR_ACCES, "{from} GETATTR");
        let r = bad.lookup(&LOOKUP3args { what: diropargs3 { dir: root.clone(), name: fname("f") } }).await;
        assert_eq!(status(r.unwrap()), nfsstat3::NFS3ERR_ACCES, "{from} LOOKUP");
        let r = bad.read(&READ3args { file: f.clone(), offset: 0, count: 10 }).await.unwrap();
        assert_eq!(status(r), nfsstat3::NFS3ERR_ACCES, "{from} READ");
        let data = Opaque::owned(b"nope".to_vec());
        let w = WRITE3args { file: f.clone(), offset: 0, count: 4, stable: stable_how::FILE_SYNC, data };
        assert_eq!(status(bad.write(&w).await.unwrap()), nfsstat3::NFS3ERR_ACCES, "{from} WRITE");
        let r = bad
            .rename(&RENAME3args {
                from: diropargs3 { dir: root.clone(), name: fname("f") },
                to: diropargs3 { dir: root.clone(), name: fname("g") },
            })
            .await;
        assert_eq!(status(r.unwrap()), nfsstat3::NFS3ERR_ACCES, "{from} RENAME");
        let args = READDIR3args { dir: root.clone(), cookie: 0, cookieverf: cookieverf3::default(), count: 4096 };
        assert_eq!(status(bad.readdir(&args).await.unwrap()), nfsstat3::NFS3ERR_ACCES, "{from} READDIR");
        bad.null().await.unwrap(); // NULL (a ping) is answered
    }
    // Nothing the refused clients sent changed anything.
    assert_eq!(fs.lookup(tidepool_fs::ROOT_INO, b"f").unwrap().size, 0);
    assert!(fs.lookup(tidepool_fs::ROOT_INO, b"g").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_readdir_cookies_exclusive_create_and_access() {
    let dir = tempfile::tempdir().unwrap();
    let fs = open_fs(dir.path()).await;
    let addr = serve(&fs, ExportOptions { root_squash: true, ..Default::default() }).await;
    let root = mount("127.0.0.1", addr).await.unwrap();
    // The root folder belongs to root (0755): a squashed root (uid 0 -> 65534) may not create.
    let mut sq = client("127.0.0.1", addr, 0, 0).await;
    let r = create(&mut sq, &root, "x", createhow3::UNCHECKED(no_attrs())).await;
    assert_eq!(status(r), nfsstat3::NFS3ERR_ACCES);
    let a = sq.access(&ACCESS3args { object: root.clone(), access: 0x3f }).await.unwrap().unwrap();
    assert_eq!(a.access, ACCESS3_READ | ACCESS3_LOOKUP, "squashed root gets other's r-x on /");
    // A folder open to all: the squashed root's files there are owned by 65534.
    let pub_dir = fs.mkdir(tidepool_fs::ROOT_INO, b"pub", 0o777, 0, 0).await.unwrap();
    let mut user = client("127.0.0.1", addr, 1000, 1000).await;
    let lk = user.lookup(&LOOKUP3args { what: diropargs3 { dir: root.clone(), name: fname("pub") } }).await;
    let pub_fh = lk.unwrap().unwrap().object;
    let made = create(&mut sq, &pub_fh, "by-root", createhow3::UNCHECKED(no_attrs())).await.unwrap();
    let Nfs3Option::Some(attr) = made.obj_attributes else { panic!("no attributes") };
    assert_eq!((attr.uid, attr.gid), (65534, 65534), "root squashed to nobody");
    // uid 1000 makes a 0600 file; uid 1001 may neither read nor write it, and ACCESS says so.
    let mode600 = sattr3 { mode: Nfs3Option::Some(0o600), ..no_attrs() };
    let secret = fh_of(create(&mut user, &pub_fh, "secret", createhow3::GUARDED(mode600)).await.unwrap().obj);
    let mut other = client("127.0.0.1", addr, 1001, 1001).await;
    let a = other.access(&ACCESS3args { object: secret.clone(), access: 0x3f }).await.unwrap().unwrap();
    assert_eq!(a.access, 0);
    let a = user.access(&ACCESS3args { object: secret.clone(), access: 0x3f }).await.unwrap().unwrap();
    assert_eq!(a.access, ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND);
    let r = other.read(&READ3args { file: secret.clone(), offset: 0, count: 10 }).await.unwrap();
    assert_eq!(status(r), nfsstat3::NFS3ERR_ACCES);

    // UNSTABLE writes are answered UNSTABLE with this server's verifier; COMMIT answers the
    // same verifier, after which the bytes are in the fs (durable: Fs::write is).
    let mut verfs = Vec::new();
    for i in 0..8u64 {
        let data = Opaque::owned(vec![i as u8; 100_000]);
        let w = WRITE3args {
            file: secret.clone(),
            offset: i * 100_000,
            count: 100_000,
            stable: stable_how::UNSTABLE,
            data,
        };
        let ok = user.write(&w).await.unwrap().unwrap();
        assert_eq!((ok.count, ok.committed), (100_000, stable_how::UNSTABLE));
        verfs.push(ok.verf);
    }
    let c = user.commit(&COMMIT3args { file: secret.clone(), offset: 0, count: 0 }).await.unwrap().unwrap();
    assert!(verfs.iter().all(|v| *v == c.verf));
    let ino = fs.lookup(pub_dir.ino, b"secret").unwrap().ino;
    let back = fs.read(ino, 0, 800_000).await.unwrap();
    assert!(back.chunks(100_000).enumerate().all(|(i, ch)| ch.iter().all(|b| *b == i as u8)));
    let w = WRITE3args {
        file: secret.clone(),
        offset: 0,
        count: 3,
        stable: stable_how::FILE_SYNC,
        data: Opaque::owned(b"abc".to_vec()),
    };
    assert_eq!(user.write(&w).await.unwrap().unwrap().committed, stable_how::FILE_SYNC);
    // Another server (a restart) has another verifier, so a client resends what it did not commit.
    let addr2 = serve(&fs, ExportOptions::default()).await;
    mount("127.0.0.1", addr2).await.unwrap();
    let mut u2 = client("127.0.0.1", addr2, 1000, 1000).await;
    let c2 = u2.commit(&COMMIT3args { file: secret.clone(), offset: 0, count: 0 }).await.unwrap().unwrap();
    assert_ne!(c2.verf, c.verf);

    // CREATE EXCLUSIVE: a retransmission (same verifier) is OK with the same file; another
    // verifier is EXIST.
    let v = createverf3([9, 8, 7, 6, 5, 4, 3, 2]);
    let first = fh_of(create(&mut user, &pub_fh, "excl", createhow3::EXCLUSIVE(v)).await.unwrap().obj);
    let again = fh_of(create(&mut user, &pub_fh, "excl", createhow3::EXCLUSIVE(v)).await.unwrap().obj);
    assert_eq!(first.data.as_ref(), again.data.as_ref());
    let r = create(&mut user, &pub_fh, "excl", createhow3::EXCLUSIVE(createverf3([1; 8]))).await;
    assert_eq!(status(r), nfsstat3::NFS3ERR_EXIST);

    // LINK and MKNOD: no hard links nor device files in tidepool.
    let args = LINK3args { file: secret.clone(), link: diropargs3 { dir: pub_fh.clone(), name: fname("hl") } };
    assert_eq!(status(user.link(&args).await.unwrap()), nfsstat3::NFS3ERR_NOTSUPP);
    let what = mknoddata3::NF3FIFO(no_attrs());
    let args = MKNOD3args { where_: diropargs3 { dir: pub_fh.clone(), name: fname("fifo") }, what };
    assert_eq!(status(user.mknod(&args).await.unwrap()), nfsstat3::NFS3ERR_NOTSUPP);

    // Plain READDIR pages by cookie (small `count`), while entries are added and the entry
    // each cookie names is removed: every original entry is listed once, in order.
    let many = fs.mkdir(tidepool_fs::ROOT_INO, b"many", 0o777, 1000, 1000).await.unwrap();
    for i in 0..120 {
        fs.create(many.ino, format!("n{i:03}").as_bytes(), 0o644, 1000, 1000).await.unwrap();
    }
    let lk = user.lookup(&LOOKUP3args { what: diropargs3 { dir: root.clone(), name: fname("many") } }).await;
    let many_fh = lk.unwrap().unwrap().object;
    let (mut cookie, mut verf, mut seen, mut pages) = (0, cookieverf3::default(), Vec::new(), 0);
    loop {
        let args = READDIR3args { dir: many_fh.clone(), cookie, cookieverf: verf, count: 600 };
        let ok = user.readdir(&args).await.unwrap().unwrap();
        pages += 1;
        verf = ok.cookieverf;
        let entries = ok.reply.entries.into_inner();
        for e in &entries {
            seen.push(String::from_utf8(e.name.0.to_vec()).unwrap());
        }
        if ok.reply.eof {
            break;
        }
        let last = entries.last().expect("a page that is not the last has entries");
        cookie = last.cookie;
        fs.unlink(many.ino, &last.name.0).await.unwrap();
        fs.create(many.ino, format!("a{pages:03}").as_bytes(), 0o644, 1000, 1000).await.unwrap();
        assert!(pages < 200, "READDIR does not advance");
    }
    let want: Vec<String> = (0..120).map(|i| format!("n{i:03}")).collect();
    let got: Vec<String> = seen.into_iter().filter(|n| n.starts_with('n')).collect();
    assert_eq!(got, want);
    assert!(pages >= 4, "{pages} pages");

    // FSSTAT: the device's figures.
    let st = user.fsstat(&FSSTAT3args { fsroot: root.clone() }).await.unwrap().unwrap();
    let s = fs.stat();
    assert_eq!((st.tbytes, st.fbytes), (s.capacity_bytes, s.free_bytes));
    assert!(st.tbytes < 1 << 40);
}

/// An ONC RPC call record body: NFSv3 procedure `proc` with AUTH_NULL, then `args`.
fn raw_call(xid: u32, proc: u32, args: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for w in [xid, 0, 2, 100003, 3, proc, 0, 0, 0, 0] {
        b.extend_from_slice(&w.to_be_bytes());
    }
    b.extend_from_slice(args);
    b
}

/// One fragment of a record: its mark (`last`: the record's last fragment) and bytes.
fn fragment(body: &[u8], last: bool) -> Vec<u8> {
    let mut f = ((body.len() as u32) | if last { 1 << 31 } else { 0 }).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Several calls pipelined on one connection in one write (one record in two fragments, a
/// READ asking for 1 MiB, which runs on its own task) are each answered once, whatever order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_on_one_connection_each_get_their_reply() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let fs = open_fs(dir.path()).await;
    let addr = serve(&fs, ExportOptions::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut bytes = Vec::new();
    bytes.extend(fragment(&raw_call(1, 0, &[]), true));
    let split = raw_call(2, 0, &[]);
    bytes.extend(fragment(&split[..10], false));
    bytes.extend(fragment(&split[10..], true));
    // READ3args: an empty (bad) handle, offset 0, count 1 MiB.
    let mut read = Vec::new();
    for w in [0u32, 0, 0, 1 << 20] {
        read.extend_from_slice(&w.to_be_bytes());
    }
    bytes.extend(fragment(&raw_call(3, 6, &read), true));
    bytes.extend(fragment(&raw_call(4, 0, &[]), true));
    s.write_all(&bytes).await.unwrap();
    let mut xids = Vec::new();
    for _ in 0..4 {
        let mark = s.read_u32().await.unwrap();
        assert!(mark & (1 << 31) != 0, "one fragment per reply");
        let mut body = vec![0u8; (mark & !(1 << 31)) as usize];
        s.read_exact(&mut body).await.unwrap();
        xids.push(u32::from_be_bytes(body[..4].try_into().unwrap()));
        if xids.last() == Some(&3) {
            // accepted (0), then NFS3ERR_BADHANDLE for the handle.
            let word = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().unwrap());
            assert_eq!((word(4), word(8), word(20), word(24)), (1, 0, 0, 10001));
        }
    }
    xids.sort();
    assert_eq!(xids, [1, 2, 3, 4]);
}
