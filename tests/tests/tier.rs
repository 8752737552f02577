//! The cold tier through the real binary: `tidepool up` tiering what the aws CLI writes
//! through its S3 front end to a real S3 server (s3s-fs, started in this process), to Azurite,
//! and to a local folder through the fault-injecting wrapper; then releasing it from NVMe and
//! reading it back byte for byte (read-through). Also: SIGKILL while uploads are in flight
//! (restart, nothing lost, GC leaves no unrecorded object), wrong credentials and a missing
//! bucket refused at start, and an unreachable bucket stopping writers at the dirty limit
//! until it is back.
//!
//! Every node runs on a 64 MiB device with 1 MiB blocks and loopback ports. ./test.sh installs
//! the aws CLI, curl and Azurite; a missing one fails its test saying so.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tidepool_e2e::{free_port, ok, pattern, read_banner, run, tidepool_bin};

/// The key of tidepool's own S3 front end (what the aws CLI uses).
const KEY: &str = "TPTIERE2EACCESSKEY01";
const SECRET: &str = "tier-e2e-secret-abcdefghijklmnop";
/// The key of the cold bucket's S3 server (what tidepool uses, from AWS_* in its environment).
const BUCKET_KEY: &str = "cold-bucket-key";
const BUCKET_SECRET: &str = "cold-bucket-secret";
/// The bucket on the S3 server, and tidepool's prefix in it.
const COLD: &str = "cold";
const PREFIX: &str = "tp";
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// A real S3 server: s3s-fs over a folder, on a loopback port, in this process.

struct S3Server {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl S3Server {
    /// s3s-fs over `root` (the bucket `COLD` is the folder `root/cold`) on `port` (0: any).
    fn start(root: &Path, port: u16) -> S3Server {
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
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap_or_else(|e| panic!("bind the S3 server to 127.0.0.1:{port}: {e}"));
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
            // The listener is dropped (the port refuses) and every connection is cut.
            conns.abort_all();
        });
        S3Server { rt, addr, stop: Some(stop), task: Some(task) }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and cuts every connection: the port refuses from here on.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self.rt.block_on(task);
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Environment for a node whose bucket is `s3://cold/tp` on `server`.
fn s3_bucket_env(server: &S3Server) -> Vec<(&'static str, String)> {
    vec![
        ("TIDEPOOL_BUCKET", format!("s3://{COLD}/{PREFIX}")),
        ("TIDEPOOL_BUCKET_ENDPOINT", server.endpoint()),
        ("TIDEPOOL_BUCKET_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", BUCKET_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", BUCKET_SECRET.into()),
    ]
}

/// (chunk objects, pack objects) in a bucket folder (`<root>/cold/tp` for s3s-fs).
fn bucket_objects(folder: &Path) -> (usize, usize) {
    (count_files(&folder.join("chunks")), count_files(&folder.join("packs")))
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.map(|e| e.expect("read_dir entry"))
        .map(|e| if e.file_type().unwrap().is_dir() { count_files(&e.path()) } else { 1 })
        .sum()
}

// ---------------------------------------------------------------------------------------
// A tidepool node.

struct Node {
    child: Child,
    data: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    s3_endpoint: String,
    http_port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The settings every node of these tests runs with, then `extra` (later wins).
fn node_env(extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("TIDEPOOL_DEVICE_SIZE", "64MiB"),
        ("TIDEPOOL_SEGMENT_SIZE", "4MiB"),
        ("TIDEPOOL_BLOCK_SIZE", "1MiB"),
        ("TIDEPOOL_TIER_AFTER_SECS", "1"),
        ("TIDEPOOL_S3_ACCESS_KEY_ID", KEY),
        ("TIDEPOOL_S3_SECRET_ACCESS_KEY", SECRET),
        ("TIDEPOOL_LOG", "info,s3s=off,tidepool_tiering=debug"),
        // Only what a test gives: no profile, no shared files, no instance metadata.
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.push(("TIDEPOOL_HTTP_LISTEN".into(), format!("127.0.0.1:{}", free_port())));
    env.push(("TIDEPOOL_S3_LISTEN".into(), format!("127.0.0.1:{}", free_port())));
    env.push(("TIDEPOOL_NFS_LISTEN".into(), format!("127.0.0.1:{}", free_port())));
    for (k, v) in extra {
        env.retain(|(x, _)| x != k);
        env.push((k.to_string(), v.clone()));
    }
    env
}

/// `tidepool --data-dir DATA` with exactly `env` for the cloud credentials.
fn tidepool(data: &Path, env: &[(String, String)]) -> Command {
    let mut c = Command::new(tidepool_bin());
    c.arg("--data-dir").arg(data);
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"] {
        c.env_remove(k);
    }
    for k in ["AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"] {
        c.env_remove(k);
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    c
}

impl Node {
    /// Starts `tidepool up` on `data` (stderr to `<data>.log`) and waits for its banner.
    fn start(data: &Path, env: Vec<(String, String)>) -> Node {
        let log = data.with_extension("log");
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open the node log");
        let mut child =
            tidepool(data, &env).arg("up").stdout(Stdio::piped()).stderr(f).spawn().expect("start tidepool up");
        let banner = read_banner(&mut child);
        let get = |k: &str| env.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone()).unwrap();
        let http_port = get("TIDEPOOL_HTTP_LISTEN").rsplit(':').next().unwrap().parse().unwrap();
        let s3_endpoint = format!("http://{}", get("TIDEPOOL_S3_LISTEN"));
        let node = Node { child, data: data.to_path_buf(), log, env, s3_endpoint, http_port };
        assert!(banner.contains("Ctrl-C to stop."), "tidepool up did not start:\n{banner}\n{}", node.log_text());
        node
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `tidepool ...` against this node (its data folder, for the admin token, and its ports).
    fn cli(&self, args: &[&str]) -> Command {
        let mut c = tidepool(&self.data, &self.env);
        c.args(args);
        c
    }

    /// [`Node::cli`], asserting success; returns stdout.
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

    /// `tidepool tier status PATH --json`.
    fn tier_status(&self, path: &str) -> serde_json::Value {
        let text = self.ok(&["tier", "status", path, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("tier status --json is not JSON ({e}): {text}"))
    }

    /// The aws CLI against this node's S3 front end.
    fn aws(&self, args: &[&str]) -> Command {
        let mut c = Command::new("aws");
        c.arg("--endpoint-url").arg(&self.s3_endpoint).args(args);
        c.env("AWS_ACCESS_KEY_ID", KEY).env("AWS_SECRET_ACCESS_KEY", SECRET).env("AWS_DEFAULT_REGION", "us-east-1");
        c.env("AWS_CONFIG_FILE", "/dev/null").env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
        c
    }

    /// One value of /metrics (`name` with its labels, as printed).
    fn metric(&self, name: &str) -> u64 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).expect("connect to /metrics");
        write!(s, "GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
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

    /// Waits until nothing is dirty; returns that status of `/`.
    fn wait_clean(&self, secs: u64) -> serde_json::Value {
        self.wait("every dirty block uploaded", secs, || {
            let st = self.tier_status("/");
            (st["dirty_bytes_total"] == 0).then_some(st)
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Files to write and compare.

/// `big` files (MiB sizes, not block aligned) under `big/` and `small` files of 100 B to
/// ~20 KiB under `small/dNN/`; returns (total bytes, total 1 MiB blocks).
fn make_tree(dir: &Path, big: &[usize], small: usize, seed: u64) -> (u64, u64) {
    let (mut bytes, mut blocks) = (0u64, 0u64);
    let mut put = |rel: String, len: usize, s: u64| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, pattern(s, len)).unwrap();
        bytes += len as u64;
        blocks += len.div_ceil(MIB) as u64;
    };
    for (i, mib) in big.iter().enumerate() {
        put(format!("big/f{i}.bin"), mib * MIB + 4093 * (i + 1), seed * 1000 + i as u64);
    }
    for i in 0..small {
        put(format!("small/d{:02}/s{i:04}.txt", i % 17), 100 + (i * 7919) % 20_000, seed * 1_000_000 + i as u64);
    }
    (bytes, blocks)
}

/// Every file below `expected` is in `actual` with the same bytes, and nothing more.
fn same_tree(expected: &Path, actual: &Path) {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(root, &e.path(), out);
            } else {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    walk(expected, expected, &mut a);
    walk(actual, actual, &mut b);
    a.sort();
    b.sort();
    assert_eq!(a.len(), b.len(), "file count read back");
    assert_eq!(a, b, "names read back");
    for rel in &a {
        let (x, y) = (std::fs::read(expected.join(rel)).unwrap(), std::fs::read(actual.join(rel)).unwrap());
        assert!(x == y, "{} differs after the round trip ({} vs {} bytes)", rel.display(), x.len(), y.len());
    }
}

/// Uploads `src` into the bucket `data` of the node.
fn upload_tree(node: &Node, src: &Path) {
    ok(node.aws(&["s3", "mb", "s3://data"]));
    ok(node.aws(&["s3", "cp", "--recursive", "--only-show-errors", src.to_str().unwrap(), "s3://data/"]));
}

/// Downloads the bucket `data` into a fresh `dst` and compares it with `src`.
fn read_back(node: &Node, src: &Path, dst: &Path) {
    let _ = std::fs::remove_dir_all(dst);
    ok(node.aws(&["s3", "cp", "--recursive", "--only-show-errors", "s3://data/", dst.to_str().unwrap()]));
    same_tree(src, dst);
}

/// The first number in a line like "released 312 blocks, 12.0MiB from NVMe".
fn count_in(line: &str, word: &str) -> u64 {
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(w.first(), Some(&word), "{line}");
    w.get(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count in {line:?}"))
}

// ---------------------------------------------------------------------------------------

/// 1. A real S3 bucket: large files go up as chunk objects, small ones packed together; after
///    `tier release /` every byte comes back through read-through; fetch, pin and unpin.
#[test]
fn s3_bucket_tiers_releases_and_reads_through() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"), 0);
    let node = Node::start(&dir.path().join("data"), node_env(&s3_bucket_env(&s3)));
    let src = dir.path().join("src");
    let (bytes, blocks) = make_tree(&src, &[3, 5, 2], 300, 1);
    upload_tree(&node, &src);

    let st = node.wait_clean(120);
    let p = &st["path"];
    assert_eq!((p["files"].as_u64(), p["clean_files"].as_u64()), (Some(303), Some(303)), "{st:#}");
    assert_eq!((p["clean_bytes"].as_u64(), p["resident_percent"].as_f64()), (Some(bytes), Some(100.0)), "{st:#}");
    assert!(st["last_upload_error"].is_null(), "{st:#}");
    let (chunks, packs) = bucket_objects(&dir.path().join("s3").join(COLD).join(PREFIX));
    assert!(chunks >= 3, "one chunk object at least per large file: chunks={chunks}");
    assert!((1..=30).contains(&packs), "300 small files go into a few pack objects, not one each: packs={packs}");
    assert_eq!(st["objects"].as_u64(), Some((chunks + packs) as u64), "recorded objects = objects in the bucket");
    assert_eq!(node.metric("tidepool_dirty_bytes"), 0);
    assert_eq!(node.metric("tidepool_bucket_objects"), (chunks + packs) as u64);
    assert!(node.metric("tidepool_tier_total{what=\"uploaded_objects\"}") >= (chunks + packs) as u64);

    let out = node.ok(&["tier", "release", "/"]);
    assert_eq!(count_in(&out, "released"), blocks, "{out}");
    let st = node.tier_status("/");
    assert_eq!(st["path"]["cold_files"].as_u64(), Some(303), "{st:#}");
    assert_eq!((st["path"]["cold_bytes"].as_u64(), st["path"]["resident_percent"].as_f64()), (Some(bytes), Some(0.0)));

    // Fetch the large files back onto NVMe; the small ones stay cold.
    let out = node.ok(&["tier", "fetch", "/data/big"]);
    assert_eq!(count_in(&out, "fetched"), 4 + 6 + 3, "3, 5 and 2 MiB and a bit: 13 blocks\n{out}");
    assert_eq!(node.tier_status("/data/big")["path"]["resident_percent"].as_f64(), Some(100.0));
    assert_eq!(node.tier_status("/data/small")["path"]["resident_percent"].as_f64(), Some(0.0));
    let again = node.ok(&["tier", "fetch", "/data/big"]);
    assert_eq!(count_in(&again, "fetched"), 0, "nothing left to fetch: {again}");

    assert_eq!(node.ok(&["pin", "/data/big"]).trim(), "pinned /data/big");
    let text = node.ok(&["tier", "status", "/data/big"]);
    assert!(text.contains("/data/big (pinned)") && text.contains("resident      100.0 %"), "{text}");
    assert_eq!(node.tier_status("/data/big")["path"]["pinned"], true);
    assert_eq!(node.tier_status("/data/small")["path"]["pinned"], false);
    assert_eq!(node.ok(&["unpin", "/data/big"]).trim(), "unpinned /data/big");
    assert_eq!(node.tier_status("/data/big")["path"]["pinned"], false);
    let out = run(node.cli(&["pin", "/data/nope"]));
    assert!(!out.status.success(), "pinning a missing path fails");

    // Read everything back through the S3 front end: the small files come from the bucket.
    read_back(&node, &src, &dir.path().join("back"));
    let text = node.ok(&["tier", "status"]);
    assert!(text.contains("resident      100.0 %") && text.contains("dirty         0 B"), "{text}");
    assert!(text.contains(&format!("bucket        s3://{COLD}/{PREFIX}")), "{text}");
    assert!(node.metric("tidepool_tier_total{what=\"read_through_blocks\"}") >= blocks);
}

/// 2. SIGKILL while uploads are in flight: after a restart on the same data folder and bucket
///    everything goes up, every recorded object is there (release, then read back) and GC
///    leaves no object the metadata does not record.
#[test]
fn sigkill_during_uploads_loses_nothing_and_gc_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"), 0);
    let folder = dir.path().join("s3").join(COLD).join(PREFIX);
    let data = dir.path().join("data");
    let mut sizes = s3_bucket_env(&s3);
    sizes.extend([
        // One object per 1 MiB block and per 1 MiB of small files: many objects to upload.
        ("TIDEPOOL_CHUNK_OBJECT_SIZE", "1MiB".to_string()),
        ("TIDEPOOL_PACK_OBJECT_SIZE", "1MiB".to_string()),
        ("TIDEPOOL_DIRTY_HIGH", "32MiB".to_string()),
        ("TIDEPOOL_DIRTY_LIMIT", "40MiB".to_string()),
    ]);
    let mut first = sizes.clone();
    first.extend([
        // Nothing goes up on its own: `tier flush` starts the uploads, then the kill.
        ("TIDEPOOL_TIER_AFTER_SECS", "3600".to_string()),
        // Every object store call 50 ms late, two at once: the uploads take a while.
        ("TIDEPOOL_FAULT_DELAY_RATE", "1".to_string()),
        ("TIDEPOOL_UPLOAD_PARALLELISM", "2".to_string()),
    ]);
    let mut node = Node::start(&data, node_env(&first));
    let src = dir.path().join("src");
    let (bytes, _) = make_tree(&src, &[1; 12], 200, 2);
    upload_tree(&node, &src);
    let st = node.tier_status("/");
    assert_eq!(st["dirty_bytes_total"].as_u64(), Some(bytes), "nothing uploaded before the flush: {st:#}");
    assert_eq!(node.metric("tidepool_tier_total{what=\"uploaded_objects\"}"), 0);

    let mut flush = node.cli(&["tier", "flush"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (up, dirty) =
            (node.metric("tidepool_tier_total{what=\"uploaded_objects\"}"), node.metric("tidepool_dirty_bytes"));
        if up > 0 && dirty > 0 {
            node.kill();
            eprintln!("killed with {up} objects uploaded and {dirty} bytes dirty");
            break;
        }
        assert!(dirty > 0, "the flush finished before the kill: make the uploads slower");
        assert!(Instant::now() < deadline, "no upload within 120 s\n{}", node.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = flush.wait();
    let (c, p) = bucket_objects(&folder);
    eprintln!("bucket after the kill: {c} chunk and {p} pack objects");
    // Whether the kill fell between a PUT and its record is luck: make sure one such object
    // exists, a chunk PUT through the server under a key tidepool could have made.
    let orphan = orphan_key();
    let body = dir.path().join("orphan.bin");
    std::fs::write(&body, pattern(99, 4096)).unwrap();
    let mut c = Command::new("aws");
    c.arg("--endpoint-url").arg(s3.endpoint());
    c.args(["s3", "cp", "--only-show-errors", body.to_str().unwrap(), &format!("s3://{COLD}/{PREFIX}/{orphan}")]);
    c.env("AWS_ACCESS_KEY_ID", BUCKET_KEY).env("AWS_SECRET_ACCESS_KEY", BUCKET_SECRET);
    c.env("AWS_DEFAULT_REGION", "us-east-1").env("AWS_CONFIG_FILE", "/dev/null");
    c.env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
    ok(c);
    assert!(folder.join(&orphan).exists(), "the planted object is in the bucket folder");

    let mut second = sizes.clone();
    second.extend([("TIDEPOOL_TIER_AFTER_SECS", "0".to_string()), ("TIDEPOOL_GC_INTERVAL_SECS", "1".to_string())]);
    let node = Node::start(&data, node_env(&second));
    node.wait_clean(120);
    // Every recorded object exists: with nothing on NVMe, every byte is read from the bucket.
    node.ok(&["tier", "release", "/"]);
    assert_eq!(node.tier_status("/")["path"]["resident_percent"].as_f64(), Some(0.0));
    read_back(&node, &src, &dir.path().join("back"));
    // No object the metadata does not record (GC swept what the crash left behind).
    let (recorded, in_bucket) = node.wait("the bucket holds exactly the recorded objects", 60, || {
        let recorded = node.tier_status("/")["objects"].as_u64().unwrap();
        let (c, p) = bucket_objects(&folder);
        let n = (c + p) as u64;
        (recorded == n).then_some((recorded, n))
    });
    let swept = node.metric("tidepool_tier_total{what=\"gc_orphans_deleted\"}");
    eprintln!("after restart: {recorded} objects recorded and in the bucket; gc swept {swept} orphans");
    assert!(in_bucket > 0);
    assert!(swept >= 1 && !folder.join(&orphan).exists(), "the planted unrecorded object is swept");
}

/// A chunk key as the engine makes them (`chunks/<low byte of crc32c(id LE)>/<32 hex>`), for
/// an id no upload draws.
fn orphan_key() -> String {
    let id: u128 = 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef;
    format!("chunks/{:02x}/{id:032x}", crc32c::crc32c(&id.to_le_bytes()) as u8)
}

/// 3. A wrong secret, an unknown key and a missing bucket stop `tidepool up` at once with one
///    clear error, not a retry storm.
#[test]
fn wrong_credentials_or_missing_bucket_stop_up_with_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"), 0);
    // (what is wrong, the environment that makes it so, words the error must hold)
    type Case = (&'static str, Vec<(&'static str, String)>, &'static [&'static str]);
    let cases: [Case; 3] = [
        ("wrong secret", vec![("AWS_SECRET_ACCESS_KEY", "not-the-secret".into())], &["credential"]),
        ("unknown key", vec![("AWS_ACCESS_KEY_ID", "nobody".into())], &["credential"]),
        ("missing bucket", vec![("TIDEPOOL_BUCKET", "s3://nosuch/tp".into())], &["nosuch", "bucket"]),
    ];
    for (i, (case, extra, words)) in cases.into_iter().enumerate() {
        let mut env = s3_bucket_env(&s3);
        // What a user sees: `up`'s default log level.
        env.push(("TIDEPOOL_LOG", "info,s3s=off".into()));
        env.extend(extra);
        let data = dir.path().join(format!("data{i}"));
        let mut child = tidepool(&data, &node_env(&env))
            .arg("up")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tidepool up");
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        // A bound against a hang (a node that starts anyway, or retries forever), not a timing check.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{case}: tidepool up still runs after 30 s:\n{}", reader.join().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = reader.join().unwrap();
        assert_eq!(status.code(), Some(1), "{case}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{case}: one error line:\n{err}");
        eprintln!("{case}: {}", errors[0]);
        let lower = errors[0].to_lowercase();
        assert!(words.iter().all(|w| lower.contains(w)), "{case}: the error names {words:?}: {}", errors[0]);
        assert!(!err.contains("WARN"), "{case}: no retries or warnings at start, one error:\n{err}");
        assert!(errors[0].len() < 400, "{case}: a clear error, not a dump: {}", errors[0]);
    }
}

/// 4. The bucket goes away: writes go on to NVMe up to the dirty limit, then PUTs fail with
///    the dirty-limit error (503); once the server is back, `tier flush` uploads everything,
///    writes succeed again and every acknowledged file reads back from the bucket.
#[test]
fn unreachable_bucket_stops_writers_at_the_dirty_limit_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s3");
    let port = free_port();
    let mut s3 = S3Server::start(&root, port);
    let mut env = s3_bucket_env(&s3);
    env.extend([("TIDEPOOL_DIRTY_LIMIT", "8MiB".to_string()), ("TIDEPOOL_DIRTY_HIGH", "4MiB".to_string())]);
    let node = Node::start(&dir.path().join("data"), node_env(&env));
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let put = |name: &str, seed: u64| {
        let f = work.join(name);
        std::fs::write(&f, pattern(seed, MIB)).unwrap();
        let mut c =
            node.aws(&["s3api", "put-object", "--bucket", "data", "--key", name, "--body", f.to_str().unwrap()]);
        // One attempt: the CLI's own retries would only hide the answer.
        c.env("AWS_MAX_ATTEMPTS", "1").env("AWS_RETRY_MODE", "standard");
        run(c)
    };
    ok(node.aws(&["s3", "mb", "s3://data"]));
    assert!(put("f00", 0).status.success());
    node.wait_clean(60);

    s3.stop();
    let mut acked = vec!["f00".to_string()];
    let mut refused = None;
    for i in 1..=40 {
        let name = format!("f{i:02}");
        let out = put(&name, i);
        if out.status.success() {
            acked.push(name);
            continue;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("dirty data limit reached"), "{name}: the dirty-limit error:\n{err}");
        assert!(err.contains("ServiceUnavailable") || err.contains("503"), "{name}: a 503-class error:\n{err}");
        refused = Some(name);
        break;
    }
    let refused = refused.expect("a PUT is refused once 8 MiB are dirty and the bucket is down");
    eprintln!("bucket down: {} PUTs acknowledged, {refused} refused", acked.len() - 1);
    // Writes go on to NVMe while the bucket is down, exactly up to the limit: 8 x 1 MiB.
    assert_eq!(acked.len() - 1, 8, "PUTs acknowledged with the bucket down: {acked:?}");
    let st = node.tier_status("/");
    assert!(st["last_upload_error"].is_string(), "{st:#}");
    assert!(st["dirty_bytes_total"].as_u64().unwrap() > 0);
    assert_eq!(node.metric("tidepool_tier_failing"), 1);
    assert!(node.metric("tidepool_tier_total{what=\"dirty_refusals\"}") >= 1);

    let s3 = S3Server::start(&root, port);
    let out = node.ok(&["tier", "flush"]);
    assert!(out.starts_with("uploaded "), "{out}");
    let st = node.tier_status("/");
    assert_eq!(st["dirty_bytes_total"].as_u64(), Some(0), "{st:#}");
    assert!(st["last_upload_error"].is_null(), "{st:#}");
    for i in 41..44 {
        let name = format!("f{i:02}");
        let out = put(&name, i);
        assert!(out.status.success(), "{name} after the bucket is back: {}", String::from_utf8_lossy(&out.stderr));
        acked.push(name);
    }
    node.ok(&["tier", "flush"]);
    node.ok(&["tier", "release", "/"]);
    let back = dir.path().join("back");
    ok(node.aws(&["s3", "cp", "--recursive", "--only-show-errors", "s3://data/", back.to_str().unwrap()]));
    let mut names: Vec<String> =
        std::fs::read_dir(&back).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, acked, "exactly the acknowledged objects; {refused} was refused");
    for name in &acked {
        let seed: u64 = name[1..].parse().unwrap();
        assert!(std::fs::read(back.join(name)).unwrap() == pattern(seed, MIB), "{name} differs");
    }
    drop(s3);
}

/// 5. A local-folder bucket failing 20 % of calls and delaying 20 %: tiering still completes,
///    and every file reads back from the bucket.
#[test]
fn tiering_completes_through_injected_faults() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("TIDEPOOL_FAULT_FAIL_RATE", "0.2".to_string()), ("TIDEPOOL_FAULT_DELAY_RATE", "0.2".to_string())];
    let data = dir.path().join("data");
    let node = Node::start(&data, node_env(&env));
    let src = dir.path().join("src");
    let (bytes, blocks) = make_tree(&src, &[2, 3], 120, 5);
    upload_tree(&node, &src);
    let st = node.wait_clean(180);
    assert_eq!(st["path"]["clean_bytes"].as_u64(), Some(bytes), "{st:#}");
    let (chunks, packs) = bucket_objects(&data.join("objects"));
    assert!(chunks >= 2 && packs >= 1, "chunks={chunks} packs={packs}");
    let out = node.ok(&["tier", "release", "/"]);
    assert_eq!(count_in(&out, "released"), blocks, "{out}");
    read_back(&node, &src, &dir.path().join("back"));
    assert_eq!(node.tier_status("/")["path"]["resident_percent"].as_f64(), Some(100.0));
}

// ---------------------------------------------------------------------------------------
// Azure: Azurite's blob service, started by the test.

/// Azurite's development account and its key, public in Azurite's documentation.
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

struct Azurite {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Azurite {
    fn start() -> Azurite {
        let bin = match std::env::var_os("TIDEPOOL_AZURITE_BIN") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.peers/azurite/node_modules/.bin/azurite-blob"),
        };
        assert!(
            bin.exists(),
            "azurite is not installed: run ./test.sh (it installs azurite with npm into .peers/azurite) or set \
             TIDEPOOL_AZURITE_BIN bin={}",
            bin.display()
        );
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(data.path().join("azurite.log")).unwrap();
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
            .arg(data.path().join("store"))
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start azurite: {e} bin={}", bin.display()));
        let mut az = Azurite { child, port, _data: data };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = az.child.try_wait() {
                panic!("azurite exited before listening: {st}");
            }
            assert!(Instant::now() < deadline, "azurite did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        az
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZ_ACCOUNT}", self.port)
    }
}

/// An account SAS (blob service; service, container and object; read, write, delete, list,
/// add, create), signed with the account key as the Azure documentation builds one.
fn account_sas() -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let (permissions, services, resource_types, expiry, protocol, version) =
        ("rwdlac", "b", "sco", "2099-01-01T00:00:00Z", "https,http", "2021-08-06");
    let to_sign =
        format!("{AZ_ACCOUNT}\n{permissions}\n{services}\n{resource_types}\n\n{expiry}\n\n{protocol}\n{version}\n\n");
    // Invariant: HMAC takes keys of any length.
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&b64_decode(AZ_KEY)).expect("any key length");
    mac.update(to_sign.as_bytes());
    let signature = b64_encode(&mac.finalize().into_bytes());
    let enc = |t: &str| -> String {
        t.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "sv={version}&ss={services}&srt={resource_types}&sp={permissions}&se={}&spr={}&sig={}",
        enc(expiry),
        enc(protocol),
        enc(&signature)
    )
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() { B64[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&x| x == c).expect("a base64 test key") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// 6. An `az://` bucket on Azurite with a SAS: write, flush, release, read back.
#[test]
fn azure_bucket_on_azurite_with_a_sas() {
    let az = Azurite::start();
    let sas = account_sas();
    let container = format!("{}/tidepool", az.endpoint());
    let mut c = Command::new("curl");
    c.args(["-sS", "-f", "-X", "PUT", "-H", "x-ms-version: 2021-08-06", "-H", "Content-Length: 0"]);
    c.arg(format!("{container}?restype=container&{sas}"));
    ok(c);

    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TIDEPOOL_BUCKET", "az://tidepool/tp".to_string()),
        ("TIDEPOOL_BUCKET_ENDPOINT", az.endpoint()),
        ("TIDEPOOL_TIER_AFTER_SECS", "3600".to_string()),
        ("AZURE_STORAGE_ACCOUNT", AZ_ACCOUNT.to_string()),
        ("AZURE_STORAGE_SAS_TOKEN", sas.clone()),
    ];
    let node = Node::start(&dir.path().join("data"), node_env(&env));
    let src = dir.path().join("src");
    let (bytes, blocks) = make_tree(&src, &[2, 3], 60, 6);
    upload_tree(&node, &src);
    let out = node.ok(&["tier", "flush"]);
    assert!(count_in(&out, "uploaded") >= 3, "two chunk objects and a pack at least: {out}");
    let st = node.tier_status("/");
    assert_eq!(st["dirty_bytes_total"].as_u64(), Some(0), "{st:#}");
    assert_eq!(st["path"]["clean_bytes"].as_u64(), Some(bytes), "{st:#}");
    assert!(st["bucket"].as_str().unwrap_or("").contains("tidepool"), "{st:#}");

    // The container holds exactly the recorded objects.
    let mut c = Command::new("curl");
    c.args(["-sS", "-f", "-H", "x-ms-version: 2021-08-06"]);
    c.arg(format!("{container}?restype=container&comp=list&prefix=tp/&{sas}"));
    let list = ok(c);
    let n = list.matches("<Name>tp/chunks/").count() + list.matches("<Name>tp/packs/").count();
    assert_eq!(st["objects"].as_u64(), Some(n as u64), "{list}");

    let out = node.ok(&["tier", "release", "/"]);
    assert_eq!(count_in(&out, "released"), blocks, "{out}");
    read_back(&node, &src, &dir.path().join("back"));
    assert_eq!(node.tier_status("/")["path"]["resident_percent"].as_f64(), Some(100.0));
}
