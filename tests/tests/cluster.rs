//! A three-node cluster of real `tidepool` processes, each on its own loopback address
//! (127.a.b.1..3, the same ports on each): node 1 starts the cluster, a node with a wrong
//! token is refused at join (and its data folder is never created), nodes 2 and 3 join with
//! the token; `node list` shows three reachable voters; files written through S3 on node 2
//! read back byte for byte through nodes 3 and 1 (and a file written with `nfs-cp` on node 3
//! through S3 on node 1 and NFS on node 2); the leader is SIGKILLed, a new one is
//! elected, writes through the two survivors succeed and read back on each other; the killed
//! node restarts, catches up and reads the new files; `status` lists every node; `tier flush`
//! and removing the leader are refused on a follower with the leader named; a follower is
//! removed (dirty blocks to the bucket first) and every file still reads through the other two.
//! A second test spins a 3-node cluster down and brings a 2-node cluster up from its bucket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tidepool_e2e::{ok, pattern, read_banner, run, tidepool_bin};

struct Node {
    ip: String,
    data: PathBuf,
    bucket: PathBuf,
    child: Option<Child>,
    banner: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Node {
    fn new(root: &Path, ip: String, name: &str) -> Node {
        Node::with_bucket(root, ip, name, "bucket")
    }

    fn with_bucket(root: &Path, ip: String, name: &str, bucket: &str) -> Node {
        Node { ip, data: root.join(name), bucket: root.join(bucket), child: None, banner: String::new() }
    }

    fn http(&self) -> String {
        format!("{}:9100", self.ip)
    }

    fn s3(&self) -> String {
        format!("http://{}:9000", self.ip)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(tidepool_bin());
        c.arg("--data-dir").arg(&self.data);
        c.env("TIDEPOOL_DEVICE_SIZE", "128MiB").env("TIDEPOOL_SEGMENT_SIZE", "16MiB");
        c.env("TIDEPOOL_BUCKET", format!("file://{}", self.bucket.display()));
        c.env("TIDEPOOL_CLUSTER_LISTEN", format!("{}:7100", self.ip));
        c.env("TIDEPOOL_HTTP_LISTEN", self.http());
        c.env("TIDEPOOL_S3_LISTEN", format!("{}:9000", self.ip));
        c.env("TIDEPOOL_NFS_LISTEN", format!("{}:11111", self.ip));
        c.env_remove("TIDEPOOL_S3_ACCESS_KEY_ID").env_remove("TIDEPOOL_S3_SECRET_ACCESS_KEY");
        c.env_remove("TIDEPOOL_JOIN").env_remove("TIDEPOOL_CLUSTER_TOKEN");
        c
    }

    fn up(&mut self, args: &[&str]) {
        self.up_with(args, &[]);
    }

    fn up_with(&mut self, args: &[&str], env: &[(&str, &str)]) {
        let mut c = self.cmd();
        c.arg("up").args(args).envs(env.iter().copied()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = c.spawn().expect("start tidepool up");
        let banner = read_banner(&mut child);
        assert!(banner.contains("Ctrl-C"), "tidepool up at {} did not start:\n{banner}", self.ip);
        self.banner = banner;
        self.child = Some(child);
    }

    fn sigkill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { kill(child.id() as i32, 15) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "tidepool up at {} did not stop", self.ip);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `tidepool node list --json` against this node.
    fn nodes(&self) -> serde_json::Value {
        let out = ok({
            let mut c = self.cmd();
            c.args(["node", "list", "--json"]);
            c
        });
        serde_json::from_str(&out).unwrap()
    }

    fn aws(&self, key: &(String, String), args: &[&str]) -> Output {
        let mut c = Command::new("aws");
        c.arg("--endpoint-url").arg(self.s3()).args(args);
        c.env("AWS_ACCESS_KEY_ID", &key.0).env("AWS_SECRET_ACCESS_KEY", &key.1).env("AWS_DEFAULT_REGION", "us-east-1");
        c.env("AWS_CONFIG_FILE", "/dev/null").env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
        run(c)
    }

    fn put(&self, key: &(String, String), src: &Path, dst: &str) {
        let out = self.aws(key, &["s3", "cp", "--only-show-errors", src.to_str().unwrap(), dst]);
        assert!(out.status.success(), "PUT {dst} through {}: {}", self.ip, String::from_utf8_lossy(&out.stderr));
    }

    fn get(&self, key: &(String, String), src: &str, dst: &Path) -> Vec<u8> {
        let out = self.aws(key, &["s3", "cp", "--only-show-errors", src, dst.to_str().unwrap()]);
        assert!(out.status.success(), "GET {src} through {}: {}", self.ip, String::from_utf8_lossy(&out.stderr));
        std::fs::read(dst).unwrap()
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// The S3 key the first node printed.
fn banner_key(banner: &str) -> (String, String) {
    let line = banner.lines().find(|l| l.contains("access key id")).unwrap_or_else(|| panic!("no key in:\n{banner}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    let at = |k: &str| w[w.iter().position(|x| *x == k).unwrap() + 1].to_string();
    (at("id"), at("secret"))
}

fn voters(v: &serde_json::Value) -> Vec<u64> {
    v["nodes"].as_array().unwrap().iter().filter(|n| n["voter"] == true).map(|n| n["id"].as_u64().unwrap()).collect()
}

#[test]
fn three_nodes_form_replicate_fail_over_and_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (rand::random::<u8>() % 200 + 20, rand::random::<u8>() % 250 + 1);
    let ip = |i: u8| format!("127.{a}.{b}.{i}");
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::new(dir.path(), ip(i), &format!("node{i}"))).collect();
    nodes[0].up(&[]);
    let key = banner_key(&nodes[0].banner);
    assert!(nodes[0].banner.contains("--join"), "the banner says how to add a node:\n{}", nodes[0].banner);
    let token = std::fs::read_to_string(nodes[0].data.join("cluster.token")).unwrap().trim().to_string();
    let printed = ok({
        let mut c = nodes[0].cmd();
        c.args(["cluster", "token"]);
        c
    });
    assert_eq!(printed.trim(), token);
    let seed = format!("{}:7100", nodes[0].ip);

    // A wrong token: refused by the handshake, with a clear error, and nothing written.
    let mut intruder = Node::new(dir.path(), ip(4), "intruder");
    let (cluster_id, _) = token.split_once('.').unwrap();
    let wrong = format!("{cluster_id}.{}", "ab".repeat(32));
    let out = run({
        let mut c = intruder.cmd();
        c.args(["up", "--join", &seed, "--token", &wrong]);
        c
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong token must be refused");
    assert!(err.contains("refused this node: wrong cluster secret"), "{err}");
    assert!(!intruder.data.exists(), "a refused joiner writes nothing");
    intruder.child = None;

    for n in &mut nodes[1..] {
        n.up(&["--join", &seed, "--token", &token]);
        assert!(n.banner.contains("S3 keys"), "a joiner sees the cluster's keys:\n{}", n.banner);
    }
    let list = nodes[0].nodes();
    assert_eq!(voters(&list).len(), 3, "{list:#}");
    for n in list["nodes"].as_array().unwrap() {
        assert_eq!(n["reachable"], true, "{n}");
        assert!(n["stats"]["capacity_bytes"].as_u64().unwrap() > 0, "{n}");
    }
    assert_eq!(voters(&nodes[2].nodes()).len(), 3);

    // Files through node 2, read through nodes 3 and 1.
    let files: Vec<(String, Vec<u8>)> = [(1u64, 10usize), (2, (1 << 20) + 1), (3, 9 << 20)]
        .iter()
        .map(|(s, n)| (format!("f{s}"), pattern(*s, *n)))
        .collect();
    let out = nodes[1].aws(&key, &["s3", "mb", "s3://data"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (name, bytes) in &files {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        nodes[1].put(&key, &p, &format!("s3://data/{name}"));
    }
    for n in [&nodes[2], &nodes[0]] {
        for (name, bytes) in &files {
            let got = n.get(&key, &format!("s3://data/{name}"), &dir.path().join(format!("{name}.{}", n.ip)));
            assert!(got == *bytes, "{name} through {} differs ({} bytes, want {})", n.ip, got.len(), bytes.len());
        }
    }

    // NFS too: nfs-cp into node 3, read back through S3 on node 1 and nfs-cp on node 2.
    let nfs_url = |n: &Node, path: &str| format!("nfs://{}/{path}?nfsport=11111&mountport=11111", n.ip);
    let nfs_bytes = pattern(7, (4 << 20) + 3);
    let p = dir.path().join("nfs.bin");
    std::fs::write(&p, &nfs_bytes).unwrap();
    ok({
        let mut c = Command::new("nfs-cp");
        c.arg(&p).arg(nfs_url(&nodes[2], "/data/nfs.bin"));
        c
    });
    let got = nodes[0].get(&key, "s3://data/nfs.bin", &dir.path().join("nfs.bin.s3"));
    assert!(got == nfs_bytes, "nfs.bin written through NFS on node 3 differs through S3 on node 1");
    let back = dir.path().join("nfs.bin.nfs");
    ok({
        let mut c = Command::new("nfs-cp");
        c.arg(nfs_url(&nodes[1], "/data/nfs.bin")).arg(&back);
        c
    });
    assert!(std::fs::read(&back).unwrap() == nfs_bytes, "nfs.bin differs through NFS on node 2");

    // SIGKILL the leader; the two others elect a new one.
    let leader_id = list["leader_id"].as_u64().unwrap();
    let ids: Vec<u64> = nodes.iter().map(|n| n.nodes()["node_id"].as_u64().unwrap()).collect();
    let li = ids.iter().position(|id| *id == leader_id).expect("the leader is one of the three");
    nodes[li].sigkill();
    let rest: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let killed = Instant::now();
    let new_leader = loop {
        let l = nodes[rest[0]].nodes()["leader_id"].as_u64().unwrap();
        if l != 0 && l != leader_id {
            break l;
        }
        assert!(killed.elapsed() < Duration::from_secs(15), "no new leader 15 s after killing {leader_id}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("new leader {new_leader} {:?} after the kill", killed.elapsed());
    assert!(rest.iter().any(|i| ids[*i] == new_leader));

    // Writes through each survivor, read back through the other.
    let mut more = Vec::new();
    for (k, &i) in rest.iter().enumerate() {
        let name = format!("after-{k}");
        let bytes = pattern(100 + k as u64, (5 << 20) + 17 * k);
        let p = dir.path().join(&name);
        std::fs::write(&p, &bytes).unwrap();
        nodes[i].put(&key, &p, &format!("s3://data/{name}"));
        let other = rest[1 - k];
        let got = nodes[other].get(&key, &format!("s3://data/{name}"), &dir.path().join(format!("{name}.x")));
        assert!(got == bytes, "{name} written on {} differs on {}", nodes[i].ip, nodes[other].ip);
        more.push((name, bytes));
    }

    // The killed node comes back (no --join: it is a member), catches up and serves all files.
    nodes[li].up(&[]);
    let back = nodes[li].nodes();
    assert_eq!(voters(&back).len(), 3, "{back:#}");
    for (name, bytes) in files.iter().chain(&more) {
        let got = nodes[li].get(&key, &format!("s3://data/{name}"), &dir.path().join(format!("{name}.back")));
        assert!(got == *bytes, "{name} through the restarted node differs");
    }
    // A joined node restarts with neither --join nor --token: its folder keeps the token.
    let joiner = (1..3).find(|i| *i != li).unwrap();
    nodes[joiner].stop();
    nodes[joiner].up(&[]);
    let again = nodes[joiner].nodes();
    assert!(again["nodes"].as_array().unwrap().iter().all(|n| n["reachable"] == true), "{again:#}");
    let (name, bytes) = &more[0];
    let got = nodes[joiner].get(&key, &format!("s3://data/{name}"), &dir.path().join("again"));
    assert!(got == *bytes, "{name} through the restarted joiner differs");

    // `status` shows the cluster; leader-only work on a follower names the leader.
    // (Restarting the joiner may have moved the leadership: wait for a leader.)
    let since = Instant::now();
    let leader_id = loop {
        match nodes[li].nodes()["leader_id"].as_u64().unwrap() {
            0 if since.elapsed() < Duration::from_secs(15) => std::thread::sleep(Duration::from_millis(100)),
            0 => panic!("no leader 15 s after restarting a joiner"),
            l => break l,
        }
    };
    let lead = ids.iter().position(|id| *id == leader_id).unwrap();
    let follower = (0..3).find(|i| *i != lead).unwrap();
    let other = (0..3).find(|i| *i != lead && *i != follower).unwrap();
    let status = ok({
        let mut c = nodes[follower].cmd();
        c.arg("status");
        c
    });
    for id in &ids {
        assert!(status.contains(&id.to_string()), "status lists node {id}:\n{status}");
    }
    let cli = |i: usize, args: &[&str]| {
        let mut c = nodes[i].cmd();
        c.args(args);
        run(c)
    };
    let out = cli(follower, &["tier", "flush"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("runs on the leader") && err.contains(&nodes[lead].http()), "{err}");
    let out = cli(follower, &["node", "remove", &leader_id.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is the leader"), "{err}");

    // Removing a follower (asked on the other follower: the CLI follows the leader): its dirty
    // blocks go to the bucket first, and every file still reads through the two that remain.
    let out = cli(follower, &["node", "remove", &ids[other].to_string()]);
    assert!(out.status.success(), "node remove: {}", String::from_utf8_lossy(&out.stderr));
    let left = nodes[lead].nodes();
    assert_eq!(voters(&left).len(), 2, "{left:#}");
    assert!(!voters(&left).contains(&ids[other]));
    nodes[other].stop();
    for i in [lead, follower] {
        for (name, bytes) in files.iter().chain(&more) {
            let got = nodes[i].get(&key, &format!("s3://data/{name}"), &dir.path().join(format!("{name}.{i}.left")));
            assert!(got == *bytes, "{name} through {} after the removal differs", nodes[i].ip);
        }
    }
    for i in [lead, follower] {
        nodes[i].stop();
    }
}

/// Issue 7, item 6: a 3-node cluster spins down (the leader makes every node read-only first:
/// a write through a follower is refused), and a 2-node cluster comes up from the same bucket
/// (`up --from` on its first node, the second joins) and serves every file through both.
#[test]
fn three_nodes_spin_down_and_two_come_up_from_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (rand::random::<u8>() % 200 + 20, rand::random::<u8>() % 250 + 1);
    let ip = |i: u8| format!("127.{a}.{b}.{i}");
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::new(dir.path(), ip(i), &format!("node{i}"))).collect();
    nodes[0].up(&[]);
    let key = banner_key(&nodes[0].banner);
    let token = std::fs::read_to_string(nodes[0].data.join("cluster.token")).unwrap().trim().to_string();
    let seed = format!("{}:7100", nodes[0].ip);
    for n in &mut nodes[1..] {
        n.up(&["--join", &seed, "--token", &token]);
    }
    let out = nodes[1].aws(&key, &["s3", "mb", "s3://data"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<(String, Vec<u8>)> =
        (0..4u64).map(|i| (format!("f{i}"), pattern(40 + i, (3 << 20) + 1000 * i as usize))).collect();
    for (k, (name, bytes)) in files.iter().enumerate() {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        nodes[k % 3].put(&key, &p, &format!("s3://data/{name}"));
    }
    let leader_id = nodes[0].nodes()["leader_id"].as_u64().unwrap();
    let ids: Vec<u64> = nodes.iter().map(|n| n.nodes()["node_id"].as_u64().unwrap()).collect();
    let lead = ids.iter().position(|id| *id == leader_id).unwrap();
    let down = ok({
        let mut c = nodes[lead].cmd();
        c.arg("spin-down");
        c
    });
    assert!(down.contains("LATEST now points at it"), "{down}");
    let late = dir.path().join("late");
    std::fs::write(&late, b"too late").unwrap();
    let follower = (lead + 1) % 3;
    let out = nodes[follower].aws(&key, &["s3", "cp", late.to_str().unwrap(), "s3://data/late"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("AccessDenied"), "a follower refuses writes after spin-down: {err}");
    for n in &mut nodes {
        n.stop();
    }

    // Two new nodes on other addresses, the same bucket.
    let url = format!("file://{}", dir.path().join("bucket").display());
    let mut new: Vec<Node> =
        (5..=6).map(|i| Node::with_bucket(dir.path(), ip(i), &format!("new{i}"), "bucket")).collect();
    let env = [("TIDEPOOL_S3_ACCESS_KEY_ID", key.0.as_str()), ("TIDEPOOL_S3_SECRET_ACCESS_KEY", key.1.as_str())];
    new[0].up_with(&["--from", &url, "--rehydrate", "lazy"], &env);
    let token = std::fs::read_to_string(new[0].data.join("cluster.token")).unwrap().trim().to_string();
    let seed = format!("{}:7100", new[0].ip);
    new[1].up(&["--join", &seed, "--token", &token]);
    assert_eq!(voters(&new[1].nodes()).len(), 2);
    for n in &new {
        for (name, bytes) in &files {
            let got = n.get(&key, &format!("s3://data/{name}"), &dir.path().join(format!("{name}.{}", n.ip)));
            assert!(got == *bytes, "{name} through {} of the new cluster differs", n.ip);
        }
    }
    let p = dir.path().join("after");
    std::fs::write(&p, pattern(99, 12345)).unwrap();
    new[1].put(&key, &p, "s3://data/after");
    for n in &mut new {
        n.stop();
    }
}
