//! The real NFS client tools (libnfs's `nfs-cp`, `nfs-ls`, `nfs-cat`; Debian `libnfs-utils`)
//! against a real `tidepool up`, and the aws CLI on the same node's S3 endpoint: bytes copied
//! in and out, a directory of 300 entries listed whole, NFS -> S3 and S3 -> NFS, sizes as
//! `nfs-ls` shows them, data served again after a restart, and a finished NFS write kept
//! across a SIGKILL of the server. ./test.sh installs the tools;
//! a missing tool fails the test. (Debian 12's libnfs-utils 4.0 ships no `nfs-stat`: sizes are
//! checked with `nfs-ls`. File handles across a restart are tested at the trait level in
//! `frontends/nfs/tests/vfs.rs`: each libnfs tool mounts afresh, so it cannot keep one.)
//!
//! libnfs URLs: `nfs://127.0.0.1/EXPORT/FILE?nfsport=P&mountport=P`, where the export is the
//! path up to the last `/`; a file at the root of the namespace is `nfs://127.0.0.1//FILE`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tidepool_e2e::{free_port, ok, pattern, read_banner, run, tidepool_bin};

const KEY: &str = "TPE2ENFSACCESSKEY0001";
const SECRET: &str = "e2e-nfs-secret-key-abcdefghijkl";

struct Up {
    child: Child,
    s3: String,
    nfs_port: u16,
    http_port: u16,
    data: PathBuf,
    work: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path, work: &Path) -> Up {
    let (http_port, s3_port, nfs_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new(tidepool_bin())
        .arg("--data-dir")
        .arg(data)
        .arg("up")
        .env("TIDEPOOL_DEVICE_SIZE", "256MiB")
        .env("TIDEPOOL_SEGMENT_SIZE", "16MiB")
        .env("TIDEPOOL_HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
        .env("TIDEPOOL_S3_LISTEN", format!("127.0.0.1:{s3_port}"))
        .env("TIDEPOOL_NFS_LISTEN", format!("127.0.0.1:{nfs_port}"))
        .env("TIDEPOOL_S3_ACCESS_KEY_ID", KEY)
        .env("TIDEPOOL_S3_SECRET_ACCESS_KEY", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tidepool up");
    let banner = read_banner(&mut child);
    assert!(banner.contains(&format!("NFS           nfs://127.0.0.1:{nfs_port}/")), "{banner}");
    assert!(banner.contains(&format!("nfs-ls 'nfs://127.0.0.1/?nfsport={nfs_port}&mountport={nfs_port}'")), "{banner}");
    std::fs::create_dir_all(work).unwrap();
    Up {
        child,
        s3: format!("http://127.0.0.1:{s3_port}"),
        nfs_port,
        http_port,
        data: data.to_path_buf(),
        work: work.to_path_buf(),
    }
}

impl Up {
    /// `path` is `EXPORT/FILE` as libnfs splits it (see the module doc).
    fn url(&self, path: &str) -> String {
        format!("nfs://127.0.0.1/{path}?nfsport={p}&mountport={p}", p = self.nfs_port)
    }

    fn kill(mut self) -> (PathBuf, PathBuf) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.data.clone(), self.work.clone())
    }

    fn stop(mut self) -> (PathBuf, PathBuf) {
        interrupt(self.child.id());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tidepool up did not stop cleanly: {status}");
        (self.data.clone(), self.work.clone())
    }
}

/// SIGINT by pid (the child we started), through the `kill` tool: no libc in this crate.
fn interrupt(pid: u32) {
    let ok = Command::new("kill").arg("-INT").arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -INT {pid}");
}

/// Run a tool; one that is not installed fails the test with what to do.
fn tool(name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(name);
    c.args(args);
    c
}

fn aws(up: &Up, args: &[&str]) -> Command {
    let mut c = Command::new("aws");
    c.arg("--endpoint-url").arg(&up.s3).args(args);
    c.env("AWS_ACCESS_KEY_ID", KEY).env("AWS_SECRET_ACCESS_KEY", SECRET).env("AWS_DEFAULT_REGION", "us-east-1");
    c.env("AWS_CONFIG_FILE", "/dev/null").env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
    c
}

/// `nfs-ls` of a directory: name -> size.
fn ls(up: &Up, dir: &str) -> Vec<(String, u64)> {
    ok(tool("nfs-ls", &[&up.url(dir)]))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "unexpected nfs-ls line: {l}");
            (f[5..].join(" "), f[4].parse().unwrap_or_else(|_| panic!("size in {l}")))
        })
        .collect()
}

fn metric(up: &Up, needle: &str) -> u64 {
    let out = ok(tool("curl", &["-s", &format!("http://127.0.0.1:{}/metrics", up.http_port)]));
    out.lines().filter(|l| l.starts_with(needle)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

#[test]
fn libnfs_tools_copy_list_and_share_the_namespace_with_s3() {
    let dir = tempfile::tempdir().unwrap();
    let up = start(&dir.path().join("data"), &dir.path().join("work"));
    let w = up.work.clone();

    // 3 MiB in and out at the root of the namespace, byte for byte; nfs-ls shows its size.
    let big = pattern(6, 3 << 20);
    std::fs::write(w.join("big.bin"), &big).unwrap();
    ok(tool("nfs-cp", &[w.join("big.bin").to_str().unwrap(), &up.url("/big.bin")]));
    ok(tool("nfs-cp", &[&up.url("/big.bin"), w.join("back.bin").to_str().unwrap()]));
    assert!(std::fs::read(w.join("back.bin")).unwrap() == big, "nfs-cp round trip changed the bytes");
    let root = ls(&up, "");
    assert!(root.contains(&("big.bin".to_string(), 3 << 20)), "{root:?}");

    // 300 entries written through S3 (one aws s3 sync), listed whole through NFS.
    ok(aws(&up, &["s3", "mb", "s3://many"]));
    let src = w.join("many");
    std::fs::create_dir_all(&src).unwrap();
    let names: Vec<String> = (0..300).map(|i| format!("entry-{i:04}-with-a-longer-name.txt")).collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(src.join(n), format!("file {i}\n").repeat(i % 7 + 1)).unwrap();
    }
    ok(aws(&up, &["s3", "sync", "--only-show-errors", src.to_str().unwrap(), "s3://many/dir"]));
    let readdirs_before = metric(&up, "tidepool_nfs_ops_total{op=\"readdir\"");
    let listed = ls(&up, "many/dir");
    let mut got: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    got.sort();
    let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want, "every name listed exactly once");
    for (i, n) in names.iter().enumerate() {
        let size = listed.iter().find(|(m, _)| m == n).unwrap().1;
        assert_eq!(size, (format!("file {i}\n").len() * (i % 7 + 1)) as u64, "{n}");
    }
    let pages = metric(&up, "tidepool_nfs_ops_total{op=\"readdir\"") - readdirs_before;
    assert!(pages >= 2, "300 entries should take several READDIRPLUS pages (got {pages})");

    // NFS -> S3: a file written with nfs-cp is read with aws s3 cp.
    let a = pattern(7, 1_234_567);
    std::fs::write(w.join("a.bin"), &a).unwrap();
    ok(tool("nfs-cp", &[w.join("a.bin").to_str().unwrap(), &up.url("many/from-nfs.bin")]));
    ok(aws(&up, &["s3", "cp", "--only-show-errors", "s3://many/from-nfs.bin", w.join("a.s3").to_str().unwrap()]));
    assert!(std::fs::read(w.join("a.s3")).unwrap() == a, "NFS -> S3 changed the bytes");

    // S3 -> NFS: an object PUT with the aws CLI is read with nfs-cat and nfs-cp.
    let b = pattern(8, 777_777);
    std::fs::write(w.join("b.bin"), &b).unwrap();
    ok(aws(
        &up,
        &["s3", "cp", "--only-show-errors", w.join("b.bin").to_str().unwrap(), "s3://many/deep/er/from-s3.bin"],
    ));
    ok(tool("nfs-cp", &[&up.url("many/deep/er/from-s3.bin"), w.join("b.nfs").to_str().unwrap()]));
    assert!(std::fs::read(w.join("b.nfs")).unwrap() == b, "S3 -> NFS changed the bytes");
    let out = run(tool("nfs-cat", &[&up.url("many/deep/er/from-s3.bin")]));
    assert!(out.status.success() && out.stdout == b, "nfs-cat: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ls(&up, "many/deep/er").contains(&("from-s3.bin".to_string(), b.len() as u64)));

    // Errors reach the client: a missing file.
    let out = run(tool("nfs-cat", &[&up.url("many/no-such-file")]));
    assert!(!out.status.success(), "nfs-cat of a missing file succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOENT"), "{}", String::from_utf8_lossy(&out.stderr));

    // After a restart the same files are served again.
    let (data, work) = up.stop();
    let up = start(&data, &work);
    ok(tool("nfs-cp", &[&up.url("/big.bin"), w.join("again.bin").to_str().unwrap()]));
    assert!(std::fs::read(w.join("again.bin")).unwrap() == big, "after a restart");
    assert_eq!(ls(&up, "many/dir").len(), 300);

    // nfs-cp writes UNSTABLE and sends COMMIT when it closes the file: once it has finished,
    // the file survives a SIGKILL of the server right after.
    let c = pattern(9, 2_500_000);
    std::fs::write(w.join("c.bin"), &c).unwrap();
    ok(tool("nfs-cp", &[w.join("c.bin").to_str().unwrap(), &up.url("many/durable.bin")]));
    assert!(metric(&up, "tidepool_nfs_ops_total{op=\"write_unstable\",status=\"ok\"}") >= 2);
    assert!(metric(&up, "tidepool_nfs_ops_total{op=\"commit\",status=\"ok\"}") >= 1);
    let (data, work) = up.kill();
    let up = start(&data, &work);
    ok(tool("nfs-cp", &[&up.url("many/durable.bin"), w.join("c.back").to_str().unwrap()]));
    assert!(std::fs::read(w.join("c.back")).unwrap() == c, "a finished NFS write lost by a SIGKILL");
}
