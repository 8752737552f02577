//! Spin-down and rehydration through the real binary, against a real S3 server (s3s-fs, in
//! this process) as the bucket. A tree of mixed files is written through S3 (the aws CLI, user
//! metadata with `--metadata`) and NFS (libnfs's `nfs-cp`, and the small NFSv3 client in
//! `spin/nfs3.rs` for what no libnfs tool does: holes, symlinks, mode / owner / mtime):
//! empty, 1 byte, 4 KiB, 1 MiB - 1, 1 MiB + 1 and 100 MiB files (the last one multipart),
//! sparse files, 12-level-deep folders, an empty folder and an S3 folder marker, unicode names,
//! symlinks (relative, absolute, dangling, unicode). Then `tidepool spin-down`, the data folder
//! is deleted, and `tidepool up --from s3://...` on a new one must give back every entry: bytes
//! (NFS READ and S3 GET), NFS attributes (type, mode, owner, size, nlink, inode, mtime and ctime
//! to the nanosecond), S3 HeadObject (ETag, Last-Modified, Content-Type, user metadata) and the
//! bucket listing, symlink targets, holes still holes, and `tidepool fs dump` of the whole
//! namespace — with `--rehydrate eager` (finished, bytes_done == bytes_total, 100 % resident)
//! and `--rehydrate lazy` (nothing on NVMe ahead of the reads). The old cluster's S3 keys do
//! not come along; the spun-down node refuses writes (S3 AccessDenied, NFS ROFS).
//!
//! Crashes: SIGKILL of the node while `/spin-down/status` says "uploading" with part of the
//! dirty data up (LATEST still names the previous complete manifest, which a new node starts
//! from; the node restarted on its folder spins down again to the end, and the manifest
//! before it, still retained, still has every object it points into), and SIGKILL while
//! rehydration is part way (`tidepool up` again, without `--from`, finishes it, fetching only
//! what was not on NVMe yet).
//!
//! Nodes: 512 MiB device, 8 MiB segments, 1 MiB blocks, loopback ports; every wait is a poll
//! with a deadline. ./test.sh installs the aws CLI and libnfs-utils; a missing one fails.

#[path = "spin/nfs3.rs"]
mod nfs3;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use serde_json::Value;
use tidepool_e2e::{free_port, pattern, read_banner, run, tidepool_bin};

/// tidepool's own S3 front end key (what the aws CLI uses), on every node.
const KEY: &str = "TPSPINE2EACCESSKEY01";
const SECRET: &str = "spin-e2e-secret-abcdefghijklmnop";
/// The key of the bucket's S3 server (what tidepool uses, from AWS_* in its environment).
const BUCKET_KEY: &str = "spin-bucket-key";
const BUCKET_SECRET: &str = "spin-bucket-secret";
const COLD: &str = "cold";
const PREFIX: &str = "tp";
const MIB: usize = 1 << 20;
/// Long waits (a 100 MiB rehydration of a debug build on a busy machine).
const LONG: u64 = 600;

fn bucket_url() -> String {
    format!("s3://{COLD}/{PREFIX}")
}

// ---------------------------------------------------------------------------------------
// A real S3 server: s3s-fs over a folder, on a loopback port, in this process.

struct S3Server {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl S3Server {
    /// s3s-fs over `root` (the bucket `COLD` is the folder `root/cold`) on a free port.
    fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root.join(COLD)).expect("create the bucket folder");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the S3 server");
        let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs over the folder");
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(BUCKET_KEY, BUCKET_SECRET));
            b.build()
        };
        let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0))).expect("bind the S3 server");
        let addr = listener.local_addr().expect("local addr");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(async move {
            let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((sock, _)) = accepted else { continue };
                        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(sock), service.clone()).into_owned();
                        conns.spawn(async move {
                            let _ = conn.await;
                        });
                    }
                    _ = &mut stopped => break,
                }
            }
            conns.abort_all();
        });
        S3Server { rt, addr, root: root.to_path_buf(), stop: Some(stop), task: Some(task) }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An object of tidepool's prefix, read from the server's folder (None if absent).
    fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(COLD).join(PREFIX).join(key)).ok()
    }

    /// The epoch `manifests/LATEST` names, if it exists.
    fn latest(&self) -> Option<u64> {
        let text = String::from_utf8(self.object("manifests/LATEST")?).expect("LATEST is text");
        let epoch = text.lines().find_map(|l| l.strip_prefix("epoch ")).unwrap_or_else(|| panic!("LATEST: {text}"));
        Some(epoch.parse().unwrap_or_else(|_| panic!("LATEST: {text}")))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self.rt.block_on(task);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Nodes.

/// Settings of every node here; the bucket only for nodes that do not start `--from` (a new
/// node knows its bucket from the command line alone, as `spin-down` tells the operator).
fn node_env(server: &S3Server, with_bucket: bool, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("TIDEPOOL_DEVICE_SIZE", "512MiB"),
        ("TIDEPOOL_SEGMENT_SIZE", "8MiB"),
        ("TIDEPOOL_BLOCK_SIZE", "1MiB"),
        // Nothing goes up on its own during a test: spin-down has all of it to do.
        ("TIDEPOOL_TIER_AFTER_SECS", "3600"),
        ("TIDEPOOL_S3_ACCESS_KEY_ID", KEY),
        ("TIDEPOOL_S3_SECRET_ACCESS_KEY", SECRET),
        ("TIDEPOOL_LOG", "info,s3s=off"),
        ("TIDEPOOL_BUCKET_ENDPOINT", &server.endpoint()),
        ("TIDEPOOL_BUCKET_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", BUCKET_KEY),
        ("AWS_SECRET_ACCESS_KEY", BUCKET_SECRET),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if with_bucket {
        env.push(("TIDEPOOL_BUCKET".into(), bucket_url()));
    }
    env.push(("TIDEPOOL_HTTP_LISTEN".into(), format!("127.0.0.1:{}", free_port())));
    env.push(("TIDEPOOL_S3_LISTEN".into(), format!("127.0.0.1:{}", free_port())));
    env.push(("TIDEPOOL_NFS_LISTEN".into(), format!("127.0.0.1:{}", free_port())));
    for (k, v) in extra {
        env.retain(|(x, _)| x != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// `tidepool --data-dir DATA` with exactly `env` (no cloud credentials from the test's own).
fn tidepool(data: &Path, env: &[(String, String)]) -> Command {
    let mut c = Command::new(tidepool_bin());
    c.arg("--data-dir").arg(data);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("AZURE_") || k.starts_with("TIDEPOOL_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    c
}

struct Node {
    child: Child,
    data: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    banner: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// `tidepool up [--from URL --rehydrate MODE]` on `data` (stderr to `<data>.log`), once
    /// its banner is out.
    fn start(data: &Path, env: &[(String, String)], from: Option<&str>) -> Node {
        Self::start_with(data, env, from, &[])
    }

    /// [`Node::start`] with more arguments for `up`.
    fn start_with(data: &Path, env: &[(String, String)], from: Option<&str>, extra: &[&str]) -> Node {
        let log = data.with_extension("log");
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open the node log");
        let mut c = tidepool(data, env);
        c.arg("up");
        if let Some(mode) = from {
            c.args(["--from", &bucket_url(), "--rehydrate", mode]);
        }
        c.args(extra);
        let mut child = c.stdout(Stdio::piped()).stderr(f).spawn().expect("start tidepool up");
        let banner = read_banner(&mut child);
        let node = Node { child, data: data.to_path_buf(), log, env: env.to_vec(), banner };
        assert!(
            node.banner.contains("Ctrl-C to stop."),
            "tidepool up did not start:\n{}\n{}",
            node.banner,
            node.log_text()
        );
        node
    }

    fn get(&self, key: &str) -> String {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap()
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut c = tidepool(&self.data, &self.env);
        c.args(args);
        c
    }

    /// `tidepool ARGS` against this node, asserting success; stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = run(self.cli(args));
        assert!(
            out.status.success(),
            "tidepool {args:?} failed:\n{}\n{}\nnode log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("tidepool {args:?} is not JSON ({e}): {text}"))
    }

    fn tier_status(&self, path: &str) -> Value {
        self.json(&["tier", "status", path, "--json"])
    }

    fn rehydrate_status(&self) -> Value {
        self.json(&["rehydrate", "status", "--json"])
    }

    /// A GET on the status endpoint, answered as JSON (None while it does not answer).
    fn http_json(&self, path: &str) -> Option<Value> {
        let mut s = std::net::TcpStream::connect(self.get("TIDEPOOL_HTTP_LISTEN")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
    }

    /// The aws CLI against this node's S3 front end.
    fn aws(&self, args: &[&str]) -> Command {
        let mut c = Command::new("aws");
        c.arg("--endpoint-url").arg(format!("http://{}", self.get("TIDEPOOL_S3_LISTEN"))).args(args);
        c.env("AWS_ACCESS_KEY_ID", KEY).env("AWS_SECRET_ACCESS_KEY", SECRET).env("AWS_DEFAULT_REGION", "us-east-1");
        c.env("AWS_CONFIG_FILE", "/dev/null").env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
        c
    }

    fn aws_ok(&self, args: &[&str]) -> String {
        let out = run(self.aws(args));
        assert!(
            out.status.success(),
            "aws {args:?} failed:\n{}\n{}\nnode log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nfs_port(&self) -> u16 {
        self.get("TIDEPOOL_NFS_LISTEN").rsplit(':').next().unwrap().parse().unwrap()
    }

    fn nfs(&self) -> nfs3::Nfs {
        nfs3::Nfs::connect(self.nfs_port()).unwrap_or_else(|e| panic!("NFS mount: {e}\n{}", self.log_text()))
    }

    /// Polls `f` every 100 ms until it gives a value; fails after `secs` with the node's log.
    fn wait<T>(&self, what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: not within {secs} s\nnode log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL (an instance terminated, or a crash).
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGINT, and a clean exit.
    fn stop(mut self) {
        let ok = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status().unwrap().success();
        assert!(ok, "kill -INT");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tidepool up did not stop cleanly: {status}\n{}", self.log_text());
    }

    /// `tidepool spin-down` to the end; the epoch of the manifest it wrote.
    fn spin_down(&self) -> u64 {
        let out = self.ok(&["spin-down"]);
        assert!(out.contains("LATEST now points at it"), "{out}");
        assert!(out.contains("the nodes may now be terminated"), "{out}");
        assert!(out.contains(&format!("tidepool up --from {}", bucket_url())), "{out}");
        epoch_in(&out)
    }

    /// Waits for eager rehydration to finish with every byte done; then every byte is on NVMe.
    fn wait_rehydrated(&self) -> Value {
        let st = self.wait("rehydration finished", LONG, || {
            let st = self.rehydrate_status();
            (st["finished"] == true).then_some(st)
        });
        assert_eq!(st["bytes_done"], st["bytes_total"], "{st}");
        assert_eq!(st["files_done"], st["files_total"], "{st}");
        assert_eq!(st["percent"].as_f64(), Some(100.0), "{st}");
        let t = self.tier_status("/");
        assert_eq!(t["path"]["resident_percent"].as_f64(), Some(100.0), "{t}");
        assert_eq!(t["path"]["cold_bytes"], 0, "{t}");
        assert_eq!(t["path"]["cold_files"], 0, "{t}");
        // The marker says done (written right after the status flips to finished).
        self.wait("rehydrate.json marked done", 60, || {
            let m: Value = serde_json::from_slice(&std::fs::read(self.data.join("rehydrate.json")).ok()?).ok()?;
            (m["done"] == true).then_some(())
        });
        st
    }
}

/// The number after "manifest epoch " in a command's output.
fn epoch_in(out: &str) -> u64 {
    let rest = out.split("manifest epoch ").nth(1).unwrap_or_else(|| panic!("no manifest epoch in: {out}"));
    rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap_or_else(|_| panic!("{out}"))
}

// ---------------------------------------------------------------------------------------
// The tree: what is written, and what a node must give back.

#[derive(Clone)]
enum Kind {
    File(Arc<Vec<u8>>),
    Dir,
    Link(String),
}

/// Everything a node must give back, recorded from the node that wrote it.
#[derive(Clone, Default)]
struct Expect {
    /// Absolute path -> what is there (every folder on the way included).
    entries: BTreeMap<String, Kind>,
    /// Absolute path -> NFS attributes (GETATTR after the tree was written).
    attrs: BTreeMap<String, nfs3::Attr>,
    /// S3 key in bucket `data` -> HeadObject.
    heads: BTreeMap<String, Value>,
    /// ListObjectsV2 of bucket `data`.
    listing: Value,
    /// Files with holes -> bytes of data written into them (what may be stored).
    sparse: BTreeMap<String, u64>,
}

impl Expect {
    fn add(&mut self, path: &str, kind: Kind) {
        let mut p = String::new();
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for d in &parts[..parts.len() - 1] {
            p.push('/');
            p.push_str(d);
            self.entries.entry(p.clone()).or_insert(Kind::Dir);
        }
        self.entries.insert(path.to_string(), kind);
    }

    /// `tidepool fs dump` lines of this tree (outside `/.tidepool`).
    fn dump(&self) -> BTreeSet<String> {
        self.entries
            .iter()
            .map(|(p, k)| match k {
                Kind::Dir => format!("dir {p}"),
                Kind::Link(t) => format!("link {p} -> {t}"),
                Kind::File(b) => format!("file {p} {} {:08x}", b.len(), crc32c::crc32c(b)),
            })
            .collect()
    }
}

/// The deep S3 key and NFS folder: 12 levels.
fn deep(prefix: &str, n: usize) -> String {
    (1..=n).map(|i| format!("{prefix}{i:02}")).collect::<Vec<_>>().join("/")
}

/// Writes the tree through the node's front ends; returns what it must look like.
fn build_tree(node: &Node, work: &Path) -> Expect {
    let mut exp = Expect::default();
    std::fs::create_dir_all(work).unwrap();
    node.aws_ok(&["s3", "mb", "s3://data"]);
    // Through S3, with user metadata on most. (key, size, metadata, content type)
    let deep_key = format!("deep/{}/leaf.txt", deep("d", 12));
    let s3_files: Vec<(String, usize, &str, Option<&str>)> = vec![
        ("empty".into(), 0, "kind=empty", None),
        ("one.byte".into(), 1, "kind=one,owner=spin-test", Some("application/x-one")),
        ("four-k.bin".into(), 4096, "", None),
        ("edges/under-1m.bin".into(), MIB - 1, "edge=under", Some("application/octet-stream")),
        ("edges/over-1m.bin".into(), MIB + 1, "edge=over", None),
        ("big/100m.bin".into(), 100 * MIB, "size=100MiB,multipart=yes", None),
        ("ünïcødé/日本語/файл 😀.txt".into(), 777, "lang=many", Some("text/plain; charset=utf-8")),
        (deep_key, 123, "depth=12", None),
    ];
    for (i, (key, len, meta, ctype)) in s3_files.iter().enumerate() {
        let bytes = Arc::new(pattern(100 + i as u64, *len));
        let local = work.join(format!("s3-{i}"));
        std::fs::write(&local, &*bytes).unwrap();
        let dst = format!("s3://data/{key}");
        let mut args = vec!["s3", "cp", "--only-show-errors", local.to_str().unwrap(), &dst];
        if !meta.is_empty() {
            args.extend(["--metadata", meta]);
        }
        if let Some(t) = ctype {
            args.extend(["--content-type", t]);
        }
        node.aws_ok(&args);
        exp.add(&format!("/data/{key}"), Kind::File(bytes));
    }
    // An S3 folder marker: an empty folder.
    node.aws_ok(&["s3api", "put-object", "--bucket", "data", "--key", "marker-dir/"]);
    exp.add("/data/marker-dir", Kind::Dir);

    // Through NFS.
    let mut nfs = node.nfs();
    let root = nfs.root.clone();
    let posix = nfs.mkdir(&root, "posix", &nfs3::Set::default()).unwrap();
    exp.add("/posix", Kind::Dir);
    // Holes: data at 0 and at 3 MiB + 5, the size set to 6 MiB (a hole at the end too).
    let f = nfs.create(&posix, "sparse.bin", &nfs3::Set::default()).unwrap();
    let (a, b) = (pattern(200, 4096), pattern(201, 4096));
    nfs.write(&f, 0, &a).unwrap();
    nfs.write(&f, (3 * MIB + 5) as u64, &b).unwrap();
    nfs.setattr(&f, &nfs3::Set { size: Some(6 * MIB as u64), ..Default::default() }).unwrap();
    let mut want = vec![0u8; 6 * MIB];
    want[..4096].copy_from_slice(&a);
    want[3 * MIB + 5..3 * MIB + 5 + 4096].copy_from_slice(&b);
    exp.add("/posix/sparse.bin", Kind::File(Arc::new(want)));
    exp.sparse.insert("/posix/sparse.bin".into(), 8192);
    // Nothing but a hole.
    let f = nfs.create(&posix, "all-hole.bin", &nfs3::Set::default()).unwrap();
    nfs.setattr(&f, &nfs3::Set { size: Some(2 * MIB as u64 + 7), ..Default::default() }).unwrap();
    exp.add("/posix/all-hole.bin", Kind::File(Arc::new(vec![0u8; 2 * MIB + 7])));
    exp.sparse.insert("/posix/all-hole.bin".into(), 0);
    // A local sparse file copied with nfs-cp (which writes its zeros too): the zeros survive.
    let local = work.join("sparse-local.bin");
    {
        let mut lf = std::fs::File::create(&local).unwrap();
        lf.set_len(3 * MIB as u64).unwrap();
        lf.write_all(&pattern(202, 1000)).unwrap();
        std::io::Seek::seek(&mut lf, std::io::SeekFrom::Start(2 * MIB as u64)).unwrap();
        lf.write_all(&pattern(203, 1000)).unwrap();
    }
    let url = format!("nfs://127.0.0.1/posix/sparse-nfs-cp.bin?nfsport={p}&mountport={p}", p = node.nfs_port());
    tidepool_e2e::ok({
        let mut c = Command::new("nfs-cp");
        c.arg(&local).arg(&url);
        c
    });
    exp.add("/posix/sparse-nfs-cp.bin", Kind::File(Arc::new(std::fs::read(&local).unwrap())));
    // Modes, owners and times set by the client.
    let when = (1_000_000_000, 123_456_789);
    for (name, mode, owner, seed, len) in
        [("mode-600.txt", 0o600, None, 210, 3000), ("exec.sh", 0o755, Some(1000), 211, 60_000)]
    {
        let f = nfs.create(&posix, name, &nfs3::Set { mode: Some(mode), ..Default::default() }).unwrap();
        let bytes = pattern(seed, len);
        nfs.write(&f, 0, &bytes).unwrap();
        let set = nfs3::Set { mode: Some(mode), uid: owner, gid: owner, mtime: Some(when), ..Default::default() };
        nfs.setattr(&f, &set).unwrap();
        exp.add(&format!("/posix/{name}"), Kind::File(Arc::new(bytes)));
    }
    // Unicode names.
    let u = nfs.mkdir(&posix, "ünï", &nfs3::Set::default()).unwrap();
    let f = nfs.create(&u, "名前.bin", &nfs3::Set::default()).unwrap();
    let bytes = pattern(220, 12_345);
    nfs.write(&f, 0, &bytes).unwrap();
    exp.add("/posix/ünï/名前.bin", Kind::File(Arc::new(bytes)));
    // 12 levels, a file and an empty folder at the bottom.
    let mut d = nfs.mkdir(&posix, "deep", &nfs3::Set::default()).unwrap();
    for i in 1..=12 {
        d = nfs.mkdir(&d, &format!("l{i:02}"), &nfs3::Set::default()).unwrap();
    }
    let bottom = format!("/posix/deep/{}", deep("l", 12));
    let f = nfs.create(&d, "bottom.bin", &nfs3::Set::default()).unwrap();
    let bytes = pattern(230, 5000);
    nfs.write(&f, 0, &bytes).unwrap();
    exp.add(&format!("{bottom}/bottom.bin"), Kind::File(Arc::new(bytes)));
    nfs.mkdir(&d, "empty-dir", &nfs3::Set::default()).unwrap();
    exp.add(&format!("{bottom}/empty-dir"), Kind::Dir);
    // Symlinks: relative, absolute, dangling, unicode; then the folder's mtime set.
    let links = nfs.mkdir(&posix, "links", &nfs3::Set::default()).unwrap();
    for (name, target) in [
        ("rel", "../mode-600.txt"),
        ("abs", "/data/one.byte"),
        ("dangling", "no/such/target"),
        ("ünï-link", "../ünï/名前.bin"),
    ] {
        nfs.symlink(&links, name, target).unwrap();
        exp.add(&format!("/posix/links/{name}"), Kind::Link(target.into()));
    }
    nfs.setattr(&links, &nfs3::Set { mtime: Some((1_234_567_890, 5)), ..Default::default() }).unwrap();
    // A private folder with its own mode and time.
    let p = nfs.mkdir(&posix, "private", &nfs3::Set { mode: Some(0o700), ..Default::default() }).unwrap();
    nfs.setattr(&p, &nfs3::Set { mode: Some(0o700), mtime: Some(when), ..Default::default() }).unwrap();
    exp.add("/posix/private", Kind::Dir);
    record(node, &mut exp);
    exp
}

/// Takes the attributes, HeadObjects and the listing the tree has now on `node`.
fn record(node: &Node, exp: &mut Expect) {
    let mut nfs = node.nfs();
    exp.attrs.clear();
    exp.heads.clear();
    for (path, kind) in &exp.entries {
        let fh = nfs.resolve(path).unwrap();
        let a = nfs.getattr(&fh).unwrap();
        let want_type = match kind {
            Kind::File(b) => {
                assert_eq!(a.size, b.len() as u64, "{path}: size as written");
                nfs3::NF3REG
            }
            Kind::Dir => nfs3::NF3DIR,
            Kind::Link(_) => nfs3::NF3LNK,
        };
        assert_eq!(a.ftype, want_type, "{path}: type as written");
        exp.attrs.insert(path.clone(), a);
        if let (Some(key), Kind::File(_)) = (path.strip_prefix("/data/"), kind) {
            exp.heads.insert(key.into(), head(node, key));
        }
    }
    // What the client set is what the server keeps.
    let a = &exp.attrs["/posix/exec.sh"];
    assert_eq!((a.mode & 0o7777, a.uid, a.gid, a.mtime), (0o755, 1000, 1000, (1_000_000_000, 123_456_789)));
    assert_eq!(exp.attrs["/posix/private"].mode & 0o7777, 0o700);
    let one = &exp.heads["one.byte"];
    assert_eq!(one["Metadata"], serde_json::json!({"kind": "one", "owner": "spin-test"}), "{one}");
    assert_eq!(one["ContentType"], "application/x-one", "{one}");
    assert!(exp.heads["big/100m.bin"]["ETag"].as_str().unwrap().ends_with("-13\""), "100 MiB in 8 MiB parts");
    exp.listing = listing(node);
}

fn head(node: &Node, key: &str) -> Value {
    let out = node.aws_ok(&["s3api", "head-object", "--bucket", "data", "--key", key]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("head-object {key}: {e}: {out}"))
}

fn listing(node: &Node) -> Value {
    let out = node.aws_ok(&["s3api", "list-objects-v2", "--bucket", "data"]);
    serde_json::from_str(&out).unwrap()
}

/// The attributes that must survive (not atime: reads may move it; not fsid: a new cluster).
fn kept(a: &nfs3::Attr) -> impl PartialEq + std::fmt::Debug {
    (a.ftype, a.mode, a.nlink, a.uid, a.gid, a.size, a.used, a.fileid, a.mtime, a.ctime)
}

/// Every entry of `exp` on `node`, byte for byte and attribute for attribute.
fn check_tree(node: &Node, exp: &Expect, work: &Path) {
    std::fs::create_dir_all(work).unwrap();
    let mut nfs = node.nfs();
    for (path, kind) in &exp.entries {
        let fh = nfs.resolve(path).unwrap_or_else(|e| panic!("{e}\n{}", node.log_text()));
        let a = nfs.getattr(&fh).unwrap();
        assert_eq!(kept(&a), kept(&exp.attrs[path]), "{path}: attributes");
        match kind {
            Kind::Dir => {}
            Kind::Link(t) => assert_eq!(nfs.readlink(&fh).unwrap(), t.as_bytes(), "{path}: symlink target"),
            Kind::File(want) => {
                let got = nfs.read_all(&fh).unwrap_or_else(|e| panic!("{path}: {e}\n{}", node.log_text()));
                assert!(got == **want, "{path}: NFS READ gave other bytes ({} vs {} bytes)", got.len(), want.len());
            }
        }
    }
    // Through S3: bytes, HeadObject (ETag, Last-Modified, type, user metadata), the listing.
    for (key, h) in &exp.heads {
        let Kind::File(want) = &exp.entries[&format!("/data/{key}")] else { unreachable!() };
        let local = work.join("get.bin");
        let _ = std::fs::remove_file(&local);
        node.aws_ok(&["s3", "cp", "--only-show-errors", &format!("s3://data/{key}"), local.to_str().unwrap()]);
        assert!(std::fs::read(&local).unwrap() == **want, "{key}: S3 GET gave other bytes");
        assert_eq!(&head(node, key), h, "{key}: HeadObject");
    }
    assert_eq!(listing(node), exp.listing, "ListObjectsV2 of s3://data");
    // Holes stay holes: only the written data is stored.
    for (path, data) in &exp.sparse {
        let p = &node.tier_status(path)["path"];
        let stored =
            p["dirty_bytes"].as_u64().unwrap() + p["clean_bytes"].as_u64().unwrap() + p["cold_bytes"].as_u64().unwrap();
        assert_eq!(stored, *data, "{path}: stored bytes (the holes must not become data): {p}");
    }
}

/// `tidepool fs dump` of a stopped node's folder: exactly the tree (outside `/.tidepool`).
fn check_dump(data: &Path, env: &[(String, String)], exp: &Expect) {
    let out = run({
        let mut c = tidepool(data, env);
        c.args(["fs", "dump"]);
        c
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fs dump: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let got: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.is_empty() && !l.split(' ').nth(1).is_some_and(|p| p.starts_with("/.tidepool")))
        .map(str::to_string)
        .collect();
    let want = exp.dump();
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(missing.is_empty() && extra.is_empty(), "fs dump: missing {missing:#?}\nextra {extra:#?}");
}

/// Bytes of file data stored on `node` (what rehydration brings back): every file's length
/// but for the holes of the sparse files, which hold only what was written into them (a file
/// copied with nfs-cp holds its zeros too, as nfs-cp writes them).
fn stored_bytes(node: &Node, exp: &Expect) -> u64 {
    let p = &node.tier_status("/")["path"];
    let stored = ["dirty_bytes", "clean_bytes", "cold_bytes"].iter().map(|k| p[k].as_u64().unwrap()).sum();
    let sizes: u64 = exp.entries.values().map(|k| if let Kind::File(b) = k { b.len() as u64 } else { 0 }).sum();
    let holes: u64 = exp.sparse.iter().map(|(p, written)| exp.attrs[p].size - written).sum();
    assert!(stored <= sizes - holes && stored > 100 * MIB as u64, "stored {stored} of {sizes} file bytes: {p}");
    stored
}

/// A rehydrated node's banner names the bucket and the mode.
fn assert_rehydrate_banner(node: &Node, mode: &str) {
    assert!(node.banner.contains(&format!("rehydrate     {mode} from {}", bucket_url())), "banner:\n{}", node.banner);
}

/// `up --from` (lazy) on a copy of the bucket `<dir>/s3`, with its `LATEST` switched to
/// `epoch` if given, must give back `exp`. A copy, so that the new cluster's own work (its GC
/// sweep of objects it does not know, its manifests) cannot touch the bucket the first cluster
/// still uses: two clusters on one bucket is not a supported state.
fn up_from_a_copy(dir: &Path, name: &str, epoch: Option<u64>, exp: &Expect, work: &Path) {
    let copy = dir.join(format!("{name}-s3"));
    tidepool_e2e::ok({
        let mut c = Command::new("cp");
        c.arg("-a").arg(dir.join("s3")).arg(&copy);
        c
    });
    let s3c = S3Server::start(&copy);
    if let Some(epoch) = epoch {
        // LATEST as tidepool writes it (tiering/src/manifest/mod.rs), PUT through the server.
        let body = format!("tidepool-manifest-latest v1\nepoch {epoch}\n");
        let latest = work.join("LATEST");
        std::fs::write(&latest, format!("{body}crc {:08x}\n", crc32c::crc32c(body.as_bytes()))).unwrap();
        let mut c = Command::new("aws");
        c.arg("--endpoint-url").arg(s3c.endpoint());
        c.args(["s3", "cp", "--only-show-errors", latest.to_str().unwrap()]);
        c.arg(format!("s3://{COLD}/{PREFIX}/manifests/LATEST"));
        c.env("AWS_ACCESS_KEY_ID", BUCKET_KEY).env("AWS_SECRET_ACCESS_KEY", BUCKET_SECRET);
        c.env("AWS_DEFAULT_REGION", "us-east-1").env("AWS_CONFIG_FILE", "/dev/null");
        c.env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
        tidepool_e2e::ok(c);
        assert_eq!(s3c.latest(), Some(epoch));
    }
    // A spin-down that did not finish leaves its marker: `up --from` refuses, clearly, unless
    // told to take the last complete manifest anyway.
    let unfinished = copy.join(COLD).join(PREFIX).join("manifests/SPIN-DOWN").exists();
    let extra: &[&str] = if unfinished {
        let mut c = tidepool(&dir.join(format!("{name}-refused")), &node_env(&s3c, false, &[]));
        c.args(["up", "--from", &bucket_url(), "--rehydrate", "lazy"]);
        let out = c.output().expect("run tidepool up");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("did not finish"), "up --from must refuse: {err}");
        &["--force"]
    } else {
        &[]
    };
    let node = Node::start_with(&dir.join(name), &node_env(&s3c, false, &[]), Some("lazy"), extra);
    if let Some(epoch) = epoch {
        assert!(node.banner.contains(&format!("loaded manifest epoch {epoch} ")), "{}", node.banner);
    }
    check_tree(&node, exp, work);
    node.kill();
}

// ---------------------------------------------------------------------------------------

#[test]
fn spin_down_then_up_from_the_bucket_eager_and_lazy_gives_back_every_byte_and_attribute() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"));
    let work = dir.path().join("work");
    let env = node_env(&s3, true, &[]);
    let a = Node::start(&dir.path().join("a"), &env, None);
    let exp = build_tree(&a, &work);
    let total = stored_bytes(&a, &exp);
    assert!(a.tier_status("/")["dirty_bytes_total"].as_u64().unwrap() >= total, "everything is still dirty");
    // An S3 key of this cluster: it does not go along (a new cluster makes its own).
    let out = a.ok(&["keys", "create", "--name", "old-cluster"]);
    let field = |name: &str| {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in: {out}"));
        line.split_whitespace().last().unwrap().to_string()
    };
    let (old_id, old_secret) = (field("access key id"), field("secret access key"));
    let with_old_key = |node: &Node| {
        let mut c = node.aws(&["s3api", "head-object", "--bucket", "data", "--key", "one.byte"]);
        c.env("AWS_ACCESS_KEY_ID", &old_id).env("AWS_SECRET_ACCESS_KEY", &old_secret);
        run(c)
    };
    assert!(with_old_key(&a).status.success(), "the new key works on its own cluster");

    let epoch = a.spin_down();
    assert_eq!(s3.latest(), Some(epoch), "LATEST names the spin-down's manifest");
    assert_eq!(a.tier_status("/")["dirty_bytes_total"], 0, "nothing dirty after spin-down");
    // Read-only now: S3 and NFS refuse writes; reads go on.
    let out = run(a.aws(&["s3api", "put-object", "--bucket", "data", "--key", "late"]));
    assert!(!out.status.success(), "a PUT after spin-down succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("AccessDenied"), "{}", String::from_utf8_lossy(&out.stderr));
    let mut nfs = a.nfs();
    let root = nfs.root.clone();
    let e = nfs.create(&root, "late", &nfs3::Set::default()).unwrap_err();
    assert!(e.contains("NFS3ERR 30"), "NFS CREATE after spin-down: {e} (want ROFS)");
    drop(nfs);
    // The node is terminated and its folder is gone.
    a.kill();
    std::fs::remove_dir_all(dir.path().join("a")).unwrap();

    // Eager: usable at once, everything back on NVMe in the background.
    let env_b = node_env(&s3, false, &[]);
    let b = Node::start(&dir.path().join("b"), &env_b, Some("eager"));
    assert_rehydrate_banner(&b, "eager");
    assert!(b.banner.contains(&format!("loaded manifest epoch {epoch} from {}", bucket_url())), "{}", b.banner);
    let mut nfs = b.nfs();
    let fh = nfs.resolve("/posix/exec.sh").unwrap();
    let Kind::File(want) = &exp.entries["/posix/exec.sh"] else { unreachable!() };
    assert!(nfs.read_all(&fh).unwrap() == **want, "a read while rehydrating");
    drop(nfs);
    let out = with_old_key(&b);
    assert!(!out.status.success(), "a key of the old cluster works on the new one");
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"), "{}", String::from_utf8_lossy(&out.stderr));
    let st = b.wait_rehydrated();
    assert_eq!(st["bytes_total"].as_u64(), Some(total), "every stored byte is rehydrated: {st}");
    check_tree(&b, &exp, &work);
    b.stop();
    check_dump(&dir.path().join("b"), &env_b, &exp);
    std::fs::remove_dir_all(dir.path().join("b")).unwrap();

    // Lazy: nothing on NVMe until it is read; the reads are right all the same.
    let env_c = node_env(&s3, false, &[]);
    let c = Node::start(&dir.path().join("c"), &env_c, Some("lazy"));
    assert_rehydrate_banner(&c, "lazy");
    let t = c.tier_status("/");
    assert_eq!(t["path"]["cold_bytes"].as_u64(), Some(total), "lazy: every byte cold at start: {t}");
    assert_eq!((t["path"]["clean_bytes"].as_u64(), t["path"]["dirty_bytes"].as_u64()), (Some(0), Some(0)), "{t}");
    let st = c.rehydrate_status();
    assert_eq!(st["bytes_total"], 0, "lazy rehydrates nothing ahead: {st}");
    check_tree(&c, &exp, &work);
    let t = c.tier_status("/");
    assert_eq!(t["path"]["resident_percent"].as_f64(), Some(100.0), "what was read is on NVMe now: {t}");
    c.stop();
    check_dump(&dir.path().join("c"), &env_c, &exp);
}

#[test]
fn sigkill_during_spin_down_keeps_latest_complete_and_spin_down_again_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"));
    let work = dir.path().join("work");
    // One object at a time, 8 MiB each, every bucket call 50 ms late: a wide "uploading" window.
    let slow = [
        ("TIDEPOOL_UPLOAD_PARALLELISM", "1"),
        ("TIDEPOOL_CHUNK_OBJECT_SIZE", "8MiB"),
        ("TIDEPOOL_FAULT_DELAY_RATE", "1"),
        ("TIDEPOOL_SNAPSHOT_INTERVAL_SECS", "0"),
    ];
    let env = node_env(&s3, true, &slow);
    let a = Node::start(&dir.path().join("a"), &env, None);
    let v1 = build_tree(&a, &work);
    let e1 = epoch_in(&a.ok(&["snapshot"]));
    assert_eq!(s3.latest(), Some(e1));

    // Version 2: the 100 MiB file rewritten, a file removed, one added: 100+ MiB dirty.
    let mut v2 = v1.clone();
    let big = Arc::new(pattern(300, 100 * MIB));
    std::fs::write(work.join("big-v2"), &*big).unwrap();
    a.aws_ok(&["s3", "cp", "--only-show-errors", work.join("big-v2").to_str().unwrap(), "s3://data/big/100m.bin"]);
    v2.entries.insert("/data/big/100m.bin".into(), Kind::File(big));
    a.aws_ok(&["s3", "rm", "--only-show-errors", "s3://data/four-k.bin"]);
    v2.entries.remove("/data/four-k.bin");
    let added = Arc::new(pattern(301, 70_000));
    std::fs::write(work.join("added"), &*added).unwrap();
    a.aws_ok(&["s3", "cp", "--only-show-errors", work.join("added").to_str().unwrap(), "s3://data/added.bin"]);
    v2.add("/data/added.bin", Kind::File(added));
    record(&a, &mut v2);

    // Spin-down, SIGKILLed once some objects are up and some are not.
    let mut cli = a.cli(&["spin-down"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(LONG);
    loop {
        let st = a.http_json("/spin-down/status");
        if let Some(st) = &st {
            let (start, now) = (st["dirty_bytes_start"].as_u64().unwrap_or(0), st["dirty_bytes_now"].as_u64().unwrap());
            if st["phase"] == "uploading" && now > 0 && now < start {
                break;
            }
            assert!(
                !["manifest", "done", "failed"].contains(&st["phase"].as_str().unwrap_or("")),
                "spin-down left the uploading phase before the test could kill it: {st}"
            );
        }
        assert!(Instant::now() < deadline, "spin-down never got part way: {st:?}\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill();
    let _ = cli.kill();
    let _ = cli.wait();

    // LATEST still names the last complete manifest, and a new node starts from it.
    assert_eq!(s3.latest(), Some(e1), "LATEST moved although no manifest was finished");
    assert!(dir.path().join("s3").join(COLD).join(PREFIX).join("manifests/SPIN-DOWN").exists(), "no spin-down marker");
    up_from_a_copy(dir.path(), "scratch", None, &v1, &work);

    // The node restarted on its folder spins down again, to the end.
    let a = Node::start(&dir.path().join("a"), &env, None);
    let e2 = a.spin_down();
    assert!(e2 > e1, "a new manifest: {e2} after {e1}");
    assert_eq!(s3.latest(), Some(e2));
    a.kill();
    std::fs::remove_dir_all(dir.path().join("a")).unwrap();
    // The manifest before it is still retained (manifest_retain 3): the objects it points into,
    // the first 100 MiB among them, are still in the bucket, although empty since.
    up_from_a_copy(dir.path(), "retained", Some(e1), &v1, &work);

    let env_b = node_env(&s3, false, &[]);
    let b = Node::start(&dir.path().join("b"), &env_b, Some("eager"));
    b.wait_rehydrated();
    check_tree(&b, &v2, &work);
    b.stop();
    check_dump(&dir.path().join("b"), &env_b, &v2);
}

#[test]
fn sigkill_during_rehydration_then_up_again_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"));
    let work = dir.path().join("work");
    // 2 MiB chunk objects: rehydration needs one ranged GET per object at least (it joins
    // close blocks of one object), so the 100 MiB take 50 of them.
    let a = Node::start(&dir.path().join("a"), &node_env(&s3, true, &[("TIDEPOOL_CHUNK_OBJECT_SIZE", "2MiB")]), None);
    let exp = build_tree(&a, &work);
    let total = stored_bytes(&a, &exp);
    a.spin_down();
    a.kill();
    std::fs::remove_dir_all(dir.path().join("a")).unwrap();

    // One fetch at a time, every bucket call 50 ms late: a wide window to kill it in (polled
    // on the route `tidepool rehydrate status` reads, every 20 ms).
    let slow = [("TIDEPOOL_REHYDRATE_PARALLELISM", "1"), ("TIDEPOOL_FAULT_DELAY_RATE", "1")];
    let env_b = node_env(&s3, false, &slow);
    let data = dir.path().join("b");
    let b = Node::start(&data, &env_b, Some("eager"));
    let deadline = Instant::now() + Duration::from_secs(LONG);
    let st = loop {
        if let Some(st) = b.http_json("/rehydrate/status") {
            let (done, all) = (st["bytes_done"].as_u64().unwrap(), st["bytes_total"].as_u64().unwrap());
            assert!(st["finished"] != true, "rehydration finished before the test could kill it: {st}");
            if done > 0 && done < all {
                break st;
            }
        }
        assert!(Instant::now() < deadline, "rehydration never got part way\n{}", b.log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    b.kill();
    assert_eq!(st["bytes_total"].as_u64(), Some(total), "{st}");
    let marker: Value = serde_json::from_slice(&std::fs::read(data.join("rehydrate.json")).unwrap()).unwrap();
    assert_eq!(marker["done"], false, "{marker}");

    // Up again on the same folder, without --from: rehydration resumes and finishes.
    let b = Node::start(&data, &env_b, None);
    assert_rehydrate_banner(&b, "eager");
    let st2 = b.wait_rehydrated();
    assert_eq!(st2["bytes_total"].as_u64(), Some(total), "{st2}");
    // It resumed: what was on NVMe before the kill was not fetched again (the finished run
    // leaves the bytes it fetched in the bucket, for `tidepool cost`).
    let stats: Value = b.wait("stats/rehydrate.json in the bucket", 60, || {
        serde_json::from_slice(&s3.object("stats/rehydrate.json")?).ok()
    });
    let (fetched, before) = (stats["bytes"].as_u64().unwrap(), st["bytes_done"].as_u64().unwrap());
    assert!(fetched > 0 && fetched <= total - before, "fetched {fetched} after {before} of {total} were done: {stats}");
    check_tree(&b, &exp, &work);
    b.stop();
    check_dump(&data, &env_b, &exp);
}
