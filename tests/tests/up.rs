//! `tidepool up` as a user runs it: it prints its endpoints, serves /status and /metrics,
//! `tidepool status` reads them, SIGTERM and SIGINT stop it cleanly, and bad settings or a
//! foreign / corrupt / newer data folder are refused with a clear error and left untouched.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_e2e::{free_port, tidepool_bin};

fn cmd(data: &Path, port: u16) -> Command {
    let mut c = Command::new(tidepool_bin());
    c.arg("--data-dir").arg(data);
    c.env("TIDEPOOL_DEVICE_SIZE", "128MiB").env("TIDEPOOL_SEGMENT_SIZE", "16MiB");
    c.env("TIDEPOOL_HTTP_LISTEN", format!("127.0.0.1:{port}"));
    c.env("TIDEPOOL_S3_LISTEN", format!("127.0.0.1:{}", free_port()));
    c.env("TIDEPOOL_NFS_LISTEN", format!("127.0.0.1:{}", free_port()));
    c
}

/// Start `up` and wait for its banner; returns the child and the banner lines.
fn start(data: &Path, port: u16) -> (Child, Vec<String>) {
    let mut child =
        cmd(data, port).arg("up").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start tidepool up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        let done = l.starts_with("Ctrl-C");
        banner.push(l);
        if done {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, banner)
}

fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the status endpoint");
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

fn stop(mut child: Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc_kill(child.id() as i32, signal) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "tidepool up exited with {st} after signal {signal}");
            return;
        }
        assert!(Instant::now() < deadline, "tidepool up did not stop within 30 s of signal {signal}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

#[test]
fn up_serves_status_and_metrics_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let (child, banner) = start(&data, port);
    let text = banner.join("\n");
    assert!(text.contains("is up (new data folder)"), "{text}");
    assert!(text.contains(&format!("http://127.0.0.1:{port}/metrics")), "{text}");
    assert!(text.contains("io_uring"), "a file on ext4 gets the io_uring engine: {text}");

    let (head, body) = http_get(port, "/status");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "serving");
    assert_eq!(v["meta"]["leader_id"], 1);
    assert_eq!(v["block_store"]["capacity_bytes"].as_u64().map(|c| c > 64 << 20), Some(true), "{body}");

    let (head, body) = http_get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/plain"), "{head}");
    for name in [
        "tidepool_nvme_capacity_bytes",
        "tidepool_raft_commit_index",
        "tidepool_fs_ops_total{op=\"write\"}",
        "tidepool_dirty_bytes",
    ] {
        assert!(body.contains(name), "metric {name} missing:\n{body}");
    }
    assert!(body.lines().all(|l| l.starts_with('#') || l.split(' ').count() == 2), "Prometheus text format:\n{body}");
    assert!(http_get(port, "/nope").0.starts_with("HTTP/1.1 404"));

    let out = cmd(&data, port).arg("status").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && s.contains("state          serving") && s.contains("meta group     leader 1"),
        "{s}"
    );

    // A second node on the same folder is refused while the first runs.
    let out = cmd(&data, free_port()).arg("up").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another tidepool process"));

    stop(child, SIGTERM);
    let out = cmd(&data, port).arg("status").output().unwrap();
    assert!(!out.status.success(), "nothing answers after shutdown");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tidepool node answers"));

    // Restart on the same folder; SIGINT stops it too.
    let (child, banner) = start(&data, port);
    assert!(banner.join("\n").contains("existing data folder"));
    stop(child, SIGINT);
}

#[test]
fn files_survive_a_restart_of_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let local = dir.path().join("in.bin");
    let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &payload).unwrap();
    let port = free_port();
    let out = cmd(&data, port).args(["fs", "put"]).arg(&local).arg("/m/w.bin").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (child, _) = start(&data, port);
    let (_, body) = http_get(port, "/status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["fs"]["files"], 1);
    assert_eq!(v["fs"]["file_bytes"], payload.len());
    stop(child, SIGTERM);
    let out = cmd(&data, port).args(["fs", "cat", "/m/w.bin"]).output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout == payload, "bytes read back differ");
}

#[test]
fn bad_settings_are_refused_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    for (var, value, needle) in [
        ("TIDEPOOL_DEVICE_SIZE", "lots", "not a size"),
        ("TIDEPOOL_QUEUE_DEPTH", "0", "queue_depth"),
        ("TIDEPOOL_BLOCK_SIZE", "3KiB", "block_size"),
        ("TIDEPOOL_DEVICE_ENGINE", "floppy", "floppy"),
        ("TIDEPOOL_HTTP_LISTEN", "nowhere", "http_listen"),
        ("TIDEPOOL_S3_LISTEN", "nowhere", "s3_listen"),
        ("TIDEPOOL_NFS_LISTEN", "nowhere", "nfs_listen"),
        ("TIDEPOOL_FROBNICATE", "1", "frobnicate"),
    ] {
        let out = cmd(&data, port).env(var, value).arg("up").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{var}={value}: {err}");
    }
    assert!(!data.exists(), "a refused start creates nothing");
    let cfg = dir.path().join("tidepool.toml");
    std::fs::write(&cfg, "queue_depth = 100000\n").unwrap();
    let out = cmd(&data, port).arg("--config").arg(&cfg).arg("up").output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("queue_depth"));
}

#[test]
fn foreign_corrupt_and_newer_data_folders_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Foreign: a non-empty folder that is not ours.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), b"precious").unwrap();
    let out = cmd(&foreign, port).arg("up").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a tidepool data folder"));
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
    assert_eq!(std::fs::read(foreign.join("thesis.tex")).unwrap(), b"precious");

    // A real data folder, then corrupt its superblock, then make it a newer version.
    let data = dir.path().join("data");
    let out = cmd(&data, port).args(["fs", "mkdir", "/x"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sb = data.join("tidepool.super");
    let good = std::fs::read_to_string(&sb).unwrap();
    let mut bytes = good.clone().into_bytes();
    bytes[20] ^= 0x01;
    std::fs::write(&sb, &bytes).unwrap();
    let out = cmd(&data, port).arg("up").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("corrupt superblock"), "{err}");
    assert_eq!(std::fs::read(&sb).unwrap(), bytes, "never overwritten");

    let body = good.lines().nth(1).unwrap().replace("\"format_version\":1", "\"format_version\":2");
    let newer = format!("TIDEPOOL-DATA\n{body}\ncrc32c={:08x}\n", crc32c::crc32c(body.as_bytes()));
    std::fs::write(&sb, &newer).unwrap();
    let out = cmd(&data, port).arg("up").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("format version 2 is not supported"), "{err}");
    assert_eq!(std::fs::read_to_string(&sb).unwrap(), newer, "never overwritten");

    // The block store superblock on the device is checked too.
    std::fs::write(&sb, &good).unwrap();
    let dev = data.join("nvme.img");
    let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(8)).unwrap();
    f.write_all(&[0xAB; 16]).unwrap();
    drop(f);
    let out = cmd(&data, port).arg("up").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.to_lowercase().contains("superblock"), "{err}");
}

#[test]
fn an_nfs_port_in_use_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let t = Instant::now();
    let out = cmd(&data, free_port()).env("TIDEPOOL_NFS_LISTEN", addr.to_string()).arg("up").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot listen on nfs_listen"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(4), "the node was not stopped promptly: {:?}", t.elapsed());
    // The data folder was closed cleanly: the next start opens it.
    drop(taken);
    let (child, banner) = start(&data, free_port());
    assert!(banner.iter().any(|l| l.starts_with("  NFS           nfs://127.0.0.1:")), "{banner:?}");
    stop(child, 2);
}
