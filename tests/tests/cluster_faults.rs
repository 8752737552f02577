//! A three-node cluster of real `tidepool` processes under failure (issue 7, point 5), each
//! node in its own network namespace on one bridge (10.x.y.0/24; the test runs as root), so
//! that a node can be cut off for real (its link goes down: packets vanish, connections time
//! out) and clients reach every node from the host side.
//!
//! - `killing_the_leader_20_times_loses_no_acknowledged_write`: while an S3 client (curl with
//!   SigV4) and an NFS client (libnfs's `nfs-cp`) write files through the two followers, the
//!   leader is SIGKILLed, a new one takes over, the killed node restarts and catches up; 20
//!   rounds. Then every acknowledged file reads back byte for byte through every node.
//! - `a_cut_off_node_stops_writing_and_catches_up_after_healing`: the leader's link goes down;
//!   writes through it fail, writes through the other two succeed; the link comes back and
//!   the cut-off node serves the files written without it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_e2e::{pattern, read_banner, tidepool_bin};

const KEY: &str = "TPFAULTSKEY000000001";
const SECRET: &str = "faults-secret-faults-secret-faults-secr";
const S3: u16 = 9000;
const NFS: u16 = 11111;
const HTTP: u16 = 9100;
const CLUSTER: u16 = 7100;

/// Network namespaces `tp<tag>n<i>` joined by a bridge `tp<tag>br`; node i is 10.a.b.i, the
/// host side 10.a.b.254. Removed on drop.
struct NetLab {
    tag: String,
    net: String,
    n: usize,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl NetLab {
    fn new(n: usize) -> NetLab {
        // Tests of one process run side by side: each lab its own names and subnet.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let (pid, k) = (std::process::id(), LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let tag = format!("{}{k}", pid % 100_000);
        let id = pid.wrapping_mul(4).wrapping_add(k);
        let net = format!("10.{}.{}", 100 + id % 150, (id / 150) % 250);
        let lab = NetLab { tag, net, n };
        let br = lab.bridge();
        sh(&["ip", "link", "add", &br, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("{}.254/24", lab.net), "dev", &br]);
        sh(&["ip", "link", "set", &br, "up"]);
        for i in 1..=n {
            let (ns, host, inner) = (lab.ns(i), lab.host_if(i), format!("tp{}i{i}", lab.tag));
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &inner]);
            sh(&["ip", "link", "set", &inner, "netns", &ns]);
            sh(&["ip", "link", "set", &host, "master", &br]);
            sh(&["ip", "link", "set", &host, "up"]);
            sh(&["ip", "netns", "exec", &ns, "ip", "addr", "add", &format!("{}/24", lab.ip(i)), "dev", &inner]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up"]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        lab
    }
    fn bridge(&self) -> String {
        format!("tp{}br", self.tag)
    }
    fn ns(&self, i: usize) -> String {
        format!("tp{}n{i}", self.tag)
    }
    fn host_if(&self, i: usize) -> String {
        format!("tp{}h{i}", self.tag)
    }
    fn ip(&self, i: usize) -> String {
        format!("{}.{i}", self.net)
    }
    /// Cuts node i off from everyone (its link goes down), or heals it.
    fn cut(&self, i: usize, on: bool) {
        sh(&["ip", "link", "set", &self.host_if(i), if on { "down" } else { "up" }]);
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for i in 1..=self.n {
            // Deleting the host end deletes the pair; then the namespace.
            let _ = Command::new("ip").args(["link", "del", &self.host_if(i)]).stderr(Stdio::null()).status();
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).status();
    }
}

struct Node {
    child: Option<Child>,
    data: PathBuf,
}

struct Cluster {
    lab: NetLab,
    root: tempfile::TempDir,
    nodes: BTreeMap<usize, Node>,
    token: String,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let lab = NetLab::new(n);
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bucket")).unwrap();
        let mut c = Cluster { lab, root, nodes: BTreeMap::new(), token: String::new() };
        c.spawn(1);
        c.token = std::fs::read_to_string(c.nodes[&1].data.join("cluster.token")).unwrap().trim().to_string();
        for i in 2..=n {
            c.spawn(i);
        }
        c.wait_voters(n);
        let log = std::fs::read_to_string(c.root.path().join("node1.log")).unwrap_or_default();
        assert!(log.contains("raft snapshot sent in pieces"), "the joiners' snapshots went in pieces:\n{}", c.log(1));
        c
    }

    fn spawn(&mut self, i: usize) {
        self.spawn_in(i, &format!("node{i}"), &[]);
    }

    /// Starts node i (namespace i) on data folder `name`; node 1 starts a cluster (with
    /// `first_args`, e.g. `--from URL`), the others join node 1.
    fn spawn_in(&mut self, i: usize, name: &str, first_args: &[&str]) {
        let data = self.root.path().join(name);
        let ip = self.lab.ip(i);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.lab.ns(i)]).arg(tidepool_bin()).arg("up");
        let fresh = !data.join("cluster.token").exists();
        if i != 1 && fresh {
            cmd.args(["--join", &format!("{}:{CLUSTER}", self.lab.ip(1)), "--token", &self.token]);
        }
        if i == 1 {
            cmd.args(first_args);
        }
        cmd.current_dir(self.root.path())
            .env("TIDEPOOL_DATA_DIR", &data)
            .env("TIDEPOOL_BUCKET", format!("file://{}", self.root.path().join("bucket").display()))
            .env("TIDEPOOL_DEVICE_SIZE", "256MiB")
            .env("TIDEPOOL_SEGMENT_SIZE", "8MiB")
            .env("TIDEPOOL_BLOCK_SIZE", "1MiB")
            // Nothing goes to the bucket during the test: every byte read back comes from a
            // node's NVMe, so a lost replica would show.
            .env("TIDEPOOL_TIER_AFTER_SECS", "3600")
            // Every snapshot a joining (or lagging) node gets travels in 256-byte pieces, as one
            // of a namespace too big for a transport frame would.
            .env("TIDEPOOL_RAFT_SNAPSHOT_CHUNK_SIZE", "256")
            .env("TIDEPOOL_HTTP_LISTEN", format!("{ip}:{HTTP}"))
            .env("TIDEPOOL_S3_LISTEN", format!("{ip}:{S3}"))
            .env("TIDEPOOL_NFS_LISTEN", format!("{ip}:{NFS}"))
            .env("TIDEPOOL_NFS_ALLOWED_CLIENTS", "10.0.0.0/8,127.0.0.0/8")
            .env("TIDEPOOL_CLUSTER_LISTEN", format!("{ip}:{CLUSTER}"))
            .env("TIDEPOOL_S3_ACCESS_KEY_ID", KEY)
            .env("TIDEPOOL_S3_SECRET_ACCESS_KEY", SECRET)
            .env("TIDEPOOL_LOG", "info,s3s=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.root.path().join(format!("node{i}.log")))
                    .unwrap(),
            ));
        let mut child = cmd.spawn().expect("spawn tidepool up");
        let banner = read_banner(&mut child);
        assert!(banner.contains("is up"), "node {i} did not start: {banner}\nlog: {}", self.log(i));
        self.nodes.insert(i, Node { child: Some(child), data });
    }

    fn log(&self, i: usize) -> String {
        let s = std::fs::read_to_string(self.root.path().join(format!("node{i}.log"))).unwrap_or_default();
        s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes.get_mut(&i).and_then(|n| n.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `/status` of node i (None if it does not answer within 2 s).
    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-s", "-m", "2", &format!("http://{}:{HTTP}/status", self.lab.ip(i))])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The node every answering node agrees is the leader.
    fn leader(&self) -> Option<usize> {
        let ids: Vec<(usize, u64, u64)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.child.is_some())
            .filter_map(|(i, _)| {
                let s = self.status(*i)?;
                Some((*i, s.pointer("/meta/node_id")?.as_u64()?, s.pointer("/meta/leader_id")?.as_u64()?))
            })
            .collect();
        let leader_id = ids.first()?.2;
        if leader_id == 0 || ids.iter().any(|(_, _, l)| *l != leader_id) {
            return None;
        }
        ids.iter().find(|(_, id, _)| *id == leader_id).map(|(i, _, _)| *i)
    }

    fn wait_leader(&self, not: Option<usize>, within: Duration) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.leader()
                && Some(l) != not
            {
                return l;
            }
            assert!(t0.elapsed() < within, "no leader within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_voters(&self, n: usize) {
        let t0 = Instant::now();
        while !(1..=n).all(|i| {
            self.status(i).and_then(|s| s.pointer("/meta/voters").and_then(|v| v.as_array()).map(|v| v.len()))
                == Some(n)
        }) {
            assert!(t0.elapsed() < Duration::from_secs(30), "the cluster did not form:\n{}", self.log(1));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn s3_url(&self, i: usize, key: &str) -> String {
        format!("http://{}:{S3}/{key}", self.lab.ip(i))
    }

    /// PUT through node i's S3 front end; true if acknowledged (200).
    fn put(&self, i: usize, key: &str, file: &Path, timeout_s: u32) -> bool {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", &timeout_s.to_string()])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{KEY}:{SECRET}")])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T"])
            .arg(file)
            .arg(self.s3_url(i, key))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout) == "200"
    }

    /// GET through node i's S3 front end.
    fn get(&self, i: usize, key: &str) -> Option<Vec<u8>> {
        let out = Command::new("curl")
            .args(["-s", "-f", "-m", "20", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{KEY}:{SECRET}"))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(self.s3_url(i, key))
            .output()
            .expect("curl");
        out.status.success().then_some(out.stdout)
    }

    /// nfs-cp a local file to `/path` through node i; true if it exited 0.
    fn nfs_put(&self, i: usize, path: &str, file: &Path) -> bool {
        let url = format!("nfs://{}{path}?nfsport={NFS}&mountport={NFS}&timeo=50&retrans=1", self.lab.ip(i));
        let mut c = Command::new("timeout");
        c.args(["20", "nfs-cp"]).arg(file).arg(url);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c.status().map(|s| s.success()).unwrap_or(false)
    }

    fn mkbucket(&self, i: usize, bucket: &str) {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "20", "-X", "PUT"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{KEY}:{SECRET}")])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(self.s3_url(i, bucket))
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "create bucket {bucket}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<usize> = self.nodes.keys().copied().collect();
        for i in ids {
            self.kill(i);
        }
    }
}

/// Files under `dir`, recursively.
fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        usize::from(!e.file_name().to_string_lossy().starts_with('.'))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn body(seed: u64) -> Vec<u8> {
    pattern(seed, 1000 + (seed as usize * 7919) % (300 << 10))
}

#[test]
fn killing_the_leader_20_times_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3);
    c.mkbucket(1, "data");
    let files = c.root.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    // key -> seed of every acknowledged write (a key is written once).
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut seed = 0u64;
    let mut stalls = Vec::new();
    for round in 0..20 {
        let leader = c.wait_leader(None, Duration::from_secs(20));
        let others: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
        // Writes before, during and after the kill, through the two followers.
        let writes_per_phase = 2;
        let mut killed_at = None;
        for phase in 0..3 {
            if phase == 1 {
                c.kill(leader);
                killed_at = Some(Instant::now());
            }
            for _ in 0..writes_per_phase {
                seed += 1;
                let f = files.join(seed.to_string());
                std::fs::write(&f, body(seed)).unwrap();
                let s3_key = format!("data/s3-{round}-{seed}");
                if c.put(others[0], &s3_key, &f, 20) {
                    acked.insert(s3_key, seed);
                }
                seed += 1;
                let g = files.join(seed.to_string());
                std::fs::write(&g, body(seed)).unwrap();
                let nfs_key = format!("data/nfs-{round}-{seed}");
                if c.nfs_put(others[1], &format!("/{nfs_key}"), &g) {
                    acked.insert(nfs_key, seed);
                }
            }
            if phase == 1 {
                c.wait_leader(Some(leader), Duration::from_secs(15));
                // The first two writes after the kill: their time is the clients' stall.
                let stall = killed_at.map(|t| t.elapsed()).unwrap_or_default();
                stalls.push(stall.as_secs_f64());
            }
        }
        // With the old leader still down, what was acknowledged reads back through a
        // survivor: every dirty block has a copy on a node that is up (replicas = 2). Recent
        // writes all, and every 7th older one.
        for (n, (key, seed)) in acked.iter().enumerate() {
            if key.contains(&format!("-{round}-")) || n % 7 == round % 7 {
                let got = c.get(others[n % 2], key);
                assert!(
                    got.as_deref() == Some(&body(*seed)[..]),
                    "round {round}: {key} unreadable through node {} while node {leader} is down",
                    others[n % 2]
                );
            }
        }
        c.spawn(leader);
    }
    c.wait_voters(3);
    // Every node has caught up and has every acknowledged write, byte for byte.
    let (s3, nfs) =
        acked.keys().fold((0, 0), |(a, b), k| if k.starts_with("data/s3-") { (a + 1, b) } else { (a, b + 1) });
    eprintln!("20 rounds: {} of {seed} writes acknowledged ({s3} through S3, {nfs} through NFS)", acked.len());
    stalls.sort_by(f64::total_cmp);
    eprintln!(
        "kill to 4 writes done and a new leader agreed: median {:.2} s, max {:.2} s",
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
    assert!(acked.len() >= 100 && s3 > 0 && nfs > 0, "only {} of {seed} writes were acknowledged", acked.len());
    let bucket = c.root.path().join("bucket");
    let tiered = walk(&bucket.join("chunks")) + walk(&bucket.join("packs"));
    assert_eq!(tiered, 0, "nothing was to be tiered during the test");
    for i in 1..=3 {
        for (key, seed) in &acked {
            let got = c.get(i, key);
            assert!(
                got.as_deref() == Some(&body(*seed)[..]),
                "node {i}: {key} lost or wrong (acknowledged)\n{}",
                c.log(i)
            );
        }
    }
}

#[test]
fn a_cut_off_node_stops_writing_and_catches_up_after_healing() {
    let c = Cluster::start(3);
    c.mkbucket(1, "part");
    let f = c.root.path().join("f");
    std::fs::write(&f, pattern(1, 200 << 10)).unwrap();
    let leader = c.wait_leader(None, Duration::from_secs(20));
    c.lab.cut(leader, true);
    // The cut-off node answers no write (its proposals time out, or it answers 503).
    assert!(!c.put(leader, "part/minority", &f, 25), "a write through the cut-off node was acknowledged");
    // The other two elect a leader and take writes.
    let others: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    let t0 = Instant::now();
    let mut n = 0;
    while n < 5 {
        if c.put(others[n % 2], &format!("part/majority-{n}"), &f, 20) {
            n += 1;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the majority side took no writes");
    }
    c.lab.cut(leader, false);
    let t0 = Instant::now();
    loop {
        if (0..5).all(|n| c.get(leader, &format!("part/majority-{n}")).as_deref() == Some(&pattern(1, 200 << 10)[..])) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the healed node did not catch up\n{}", c.log(leader));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(c.get(others[0], "part/minority").is_none(), "the unacknowledged write must not appear");
}
