//! The NFS export's rules from settings, against a real `tidepool up` with libnfs's tools
//! (Debian `libnfs-utils`; ./test.sh installs them): a client address outside
//! `nfs_allowed_clients` is refused at MOUNT; root squash maps the tools' uid 0 to nobody, who
//! may neither create in the root-owned top folder nor read a root-owned 0660 file;
//! a read-only export answers ROFS to a copy in and still serves reads.
//!
//! libnfs's tools cannot pick their source address, so the refusal runs the other way round:
//! the node listens on 127.0.0.1 and allows only 127.0.0.2/32, and the tools connect from
//! 127.0.0.1. (A refusal of every NFS call made with a handle got earlier, from a client
//! library that binds its source address, is in `frontends/nfs/tests/rpc.rs`.)

use std::path::Path;
use std::process::{Child, Command, Stdio};

use tidepool_e2e::{free_port, ok, pattern, read_banner, run, tidepool_bin};

struct Up {
    child: Child,
    nfs_port: u16,
    http_port: u16,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path, nfs_env: &[(&str, &str)]) -> (Up, String) {
    let (http_port, s3_port, nfs_port) = (free_port(), free_port(), free_port());
    let mut c = Command::new(tidepool_bin());
    c.arg("--data-dir").arg(data).arg("up");
    c.env("TIDEPOOL_DEVICE_SIZE", "256MiB").env("TIDEPOOL_SEGMENT_SIZE", "16MiB");
    c.env("TIDEPOOL_HTTP_LISTEN", format!("127.0.0.1:{http_port}"));
    c.env("TIDEPOOL_S3_LISTEN", format!("127.0.0.1:{s3_port}"));
    c.env("TIDEPOOL_NFS_LISTEN", format!("127.0.0.1:{nfs_port}"));
    c.env("TIDEPOOL_S3_ACCESS_KEY_ID", "TPE2ENFSEXPORTKEY0001")
        .env("TIDEPOOL_S3_SECRET_ACCESS_KEY", "e2e-nfs-exports-secret-0123456");
    for (k, v) in nfs_env {
        c.env(k, v);
    }
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start tidepool up");
    let banner = read_banner(&mut child);
    (Up { child, nfs_port, http_port }, banner)
}

impl Up {
    fn url(&self, path: &str, extra: &str) -> String {
        format!("nfs://127.0.0.1/{path}?nfsport={p}&mountport={p}{extra}", p = self.nfs_port)
    }

    fn metric(&self, needle: &str) -> u64 {
        let out = ok(tool("curl", &["-s", &format!("http://127.0.0.1:{}/metrics", self.http_port)]));
        out.lines().filter(|l| l.starts_with(needle)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
    }
}

fn tool(name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(name);
    c.args(args);
    c
}

/// Run a tool that must fail; returns what it printed.
fn fails(c: Command) -> String {
    let out = run(c);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "expected a failure, got: {text}");
    text
}

#[test]
fn allowed_clients_root_squash_and_read_only_from_settings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let src = dir.path().join("src.bin");
    let body = pattern(11, 300_000);
    std::fs::write(&src, &body).unwrap();
    let src = src.to_str().unwrap();

    // Only 127.0.0.2 may mount: the tools, from 127.0.0.1, are refused at MOUNT.
    let (up, banner) = start(&data, &[("TIDEPOOL_NFS_ALLOWED_CLIENTS", "127.0.0.2/32")]);
    assert!(banner.contains("NFS export    / to 127.0.0.2/32 (read-write)"), "{banner}");
    let out = fails(tool("nfs-ls", &[&up.url("", "")]));
    assert!(out.to_lowercase().contains("mount"), "{out}");
    let out = fails(tool("nfs-cp", &[src, &up.url("/refused.bin", "")]));
    assert!(out.to_lowercase().contains("mount") || out.contains("ACCES"), "{out}");
    assert!(up.metric("tidepool_nfs_ops_total{op=\"refused\"") >= 2);
    assert_eq!(up.metric("tidepool_nfs_ops_total{op=\"create\""), 0, "nothing reached the fs");
    drop(up);

    // The default export (loopback, no squash): root copies a file in; it is root's.
    let (up, _) = start(&data, &[]);
    ok(tool("nfs-cp", &[src, &up.url("/root.bin", "")]));
    let ls = ok(tool("nfs-ls", &[&up.url("", "")]));
    let line = ls.lines().find(|l| l.ends_with(" root.bin")).unwrap_or_else(|| panic!("{ls}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((f[2], f[3]), ("0", "0"), "{line}");
    let mode = f[0];
    assert!(!mode.ends_with('r') && !mode.ends_with("r-") && !mode.ends_with("rw"), "other may not read: {line}");
    drop(up);

    // Root squash: the tools' uid 0 is nobody, who may not create in / (root's, 0755) nor read
    // root.bin (not readable by others); an unsquashed node served both just above.
    let (up, banner) = start(&data, &[("TIDEPOOL_NFS_ROOT_SQUASH", "true")]);
    assert!(banner.contains("(read-write, root squashed)"), "{banner}");
    let out = fails(tool("nfs-cp", &[src, &up.url("/squashed.bin", "")]));
    assert!(out.contains("NFS3ERR_ACCES"), "{out}");
    let out = fails(tool("nfs-cat", &[&up.url("/root.bin", "")]));
    assert!(out.contains("ACCES"), "{out}");
    // A real user id is not squashed, and is refused by the mode bits alike.
    let out = fails(tool("nfs-cp", &[src, &up.url("/user.bin", "&uid=1000&gid=1000")]));
    assert!(out.contains("NFS3ERR_ACCES"), "{out}");
    drop(up);

    // Read-only export: a copy in answers ROFS; reads work.
    let (up, banner) = start(&data, &[("TIDEPOOL_NFS_READ_ONLY", "true")]);
    assert!(banner.contains("(read-only)"), "{banner}");
    let out = fails(tool("nfs-cp", &[src, &up.url("/ro.bin", "")]));
    assert!(out.contains("NFS3ERR_ROFS"), "{out}");
    let back = dir.path().join("back.bin");
    ok(tool("nfs-cp", &[&up.url("/root.bin", ""), back.to_str().unwrap()]));
    assert!(std::fs::read(&back).unwrap() == body);
}
