//! tidepool-e2e: end-to-end tests that start the real `tidepool` binary (see `tests/`).
//! This library holds what those tests share: finding the binary, free ports, and the
//! workload's byte pattern.

use std::path::PathBuf;

/// The `tidepool` binary under test: `$TIDEPOOL_BIN`, else `target/debug/tidepool` of this
/// workspace (the test command builds it first).
pub fn tidepool_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TIDEPOOL_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/tidepool");
    assert!(p.exists(), "{} not found: build it first with `cargo build -p tidepool` (./test.sh does)", p.display());
    p
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests on loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// Same generator as `tidepool workload` (cli/src/workload.rs); kept in step by the crash test.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15 | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Read a starting `tidepool up`'s stdout up to its "Ctrl-C to stop." line and return that
/// banner; the rest of stdout is drained by a thread so the child never blocks on a full pipe.
/// The child must have been spawned with `stdout(Stdio::piped())`.
pub fn read_banner(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
    let mut banner = String::new();
    for l in lines.by_ref() {
        let Ok(l) = l else { break };
        banner.push_str(&l);
        banner.push('\n');
        if l.starts_with("Ctrl-C") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    banner
}

/// Run a client tool (aws, curl, rclone, nfs-cp, ...) and collect its output. A tool that is
/// missing fails the test: `./test.sh` installs every client the tests use.
pub fn run(mut c: std::process::Command) -> std::process::Output {
    let name = c.get_program().to_string_lossy().into_owned();
    c.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {name}: {e}. The client tests need the aws CLI, boto3, rclone, curl and libnfs's tools (libnfs-utils): ./test.sh installs them"
        )
    })
}

/// [`run`], asserting success; returns stdout.
pub fn ok(c: std::process::Command) -> String {
    let desc = format!("{c:?}");
    let out = run(c);
    assert!(
        out.status.success(),
        "{desc} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
