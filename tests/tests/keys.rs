//! S3 access keys end to end with the real binary and the aws CLI: the first start prints a
//! working key, `tidepool keys create|list|revoke` manage keys on the running node (revocation
//! takes effect at the next request), keys survive a restart, a key from the environment works
//! unattended, a legacy `s3-credentials` file is imported and removed, the admin routes refuse
//! a missing or wrong token, and no secret is ever in the clear in the data folder.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tidepool_e2e::{free_port, read_banner, tidepool_bin};

struct Node {
    child: Option<Child>,
    data: PathBuf,
    http_port: u16,
    s3_port: u16,
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

fn tidepool(data: &Path, http_port: u16, s3_port: u16) -> Command {
    let mut c = Command::new(tidepool_bin());
    c.arg("--data-dir").arg(data);
    c.env("TIDEPOOL_DEVICE_SIZE", "128MiB").env("TIDEPOOL_SEGMENT_SIZE", "16MiB");
    c.env("TIDEPOOL_HTTP_LISTEN", format!("127.0.0.1:{http_port}"));
    c.env("TIDEPOOL_S3_LISTEN", format!("127.0.0.1:{s3_port}"));
    c.env("TIDEPOOL_NFS_LISTEN", format!("127.0.0.1:{}", free_port()));
    c.env_remove("TIDEPOOL_S3_ACCESS_KEY_ID").env_remove("TIDEPOOL_S3_SECRET_ACCESS_KEY");
    c
}

impl Node {
    fn new(data: &Path) -> Node {
        Node {
            child: None,
            data: data.to_path_buf(),
            http_port: free_port(),
            s3_port: free_port(),
            banner: String::new(),
        }
    }

    fn cmd(&self) -> Command {
        tidepool(&self.data, self.http_port, self.s3_port)
    }

    /// Start `up` (with `env` added) and wait for its banner.
    fn up(&mut self, env: &[(&str, &str)]) {
        let mut c = self.cmd();
        c.arg("up").envs(env.iter().copied()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = c.spawn().expect("start tidepool up");
        let banner = read_banner(&mut child);
        assert!(banner.contains("Ctrl-C"), "tidepool up did not start:\n{banner}");
        self.banner = banner;
        self.child = Some(child);
    }

    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { kill(child.id() as i32, 15) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "tidepool up did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keys(&self, args: &[&str]) -> Output {
        self.cmd().arg("keys").args(args).output().unwrap()
    }

    fn keys_ok(&self, args: &[&str]) -> String {
        let out = self.keys(args);
        assert!(out.status.success(), "keys {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `aws s3 ls` signed with `id` / `secret`.
    fn aws_ls(&self, id: &str, secret: &str) -> Output {
        let mut c = Command::new("aws");
        c.arg("--endpoint-url").arg(format!("http://127.0.0.1:{}", self.s3_port)).args(["s3", "ls"]);
        c.env("AWS_ACCESS_KEY_ID", id).env("AWS_SECRET_ACCESS_KEY", secret).env("AWS_DEFAULT_REGION", "us-east-1");
        c.env("AWS_CONFIG_FILE", "/dev/null").env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
        c.env("AWS_MAX_ATTEMPTS", "1");
        c.output().unwrap_or_else(|e| panic!("cannot run the aws CLI: {e}; ./test.sh installs it"))
    }

    fn assert_works(&self, id: &str, secret: &str) {
        let out = self.aws_ls(id, secret);
        assert!(out.status.success(), "aws s3 ls with {id}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn assert_refused(&self, id: &str, secret: &str) {
        let out = self.aws_ls(id, secret);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("InvalidAccessKeyId"),
            "aws s3 ls with {id} must be refused: {err}"
        );
    }

    /// A raw request to the admin routes: (status line, body).
    fn admin(&self, method: &str, path: &str, auth: Option<&str>) -> (String, String) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).unwrap();
        let auth = auth.map(|a| format!("authorization: {a}\r\n")).unwrap_or_default();
        write!(s, "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-length: 0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// `(id, secret)` from a banner's `S3 key` line or `keys create`'s output.
fn banner_key(text: &str) -> (String, String) {
    let line = text.lines().find(|l| l.contains("access key id") && l.contains("secret")).expect("key line");
    let w: Vec<&str> = line.split_whitespace().collect();
    let at = |k: &str| w[w.iter().position(|x| *x == k).expect(k) + 1].to_string();
    (at("id"), at("secret"))
}

fn created_key(out: &str) -> (String, String) {
    let get = |p: &str| out.lines().find_map(|l| l.strip_prefix(p)).map(|v| v.trim().to_string()).expect(p);
    (get("access key id"), get("secret access key"))
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if std::fs::read(&p).unwrap().windows(needle.len()).any(|w| w == needle) {
            hits.push(p);
        }
    }
    hits
}

#[test]
fn first_key_create_list_revoke_restart_and_nothing_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut n = Node::new(&data);

    let out = n.keys(&["list"]);
    assert!(!out.status.success(), "no data folder yet");
    n.up(&[]);
    assert!(n.banner.contains("new data folder"), "{}", n.banner);
    let (id1, secret1) = banner_key(&n.banner);
    assert!(id1.starts_with("TP") && id1.len() == 20 && secret1.len() == 40, "{}", n.banner);
    assert!(n.banner.contains(&format!("AWS_ACCESS_KEY_ID={id1} AWS_SECRET_ACCESS_KEY={secret1} aws")));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(data.join("node.key")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    n.assert_works(&id1, &secret1);
    n.assert_refused("TPNOSUCHKEY000000000", &secret1);

    let created = n.keys_ok(&["create", "--name", "ci-runner"]);
    let (id2, secret2) = created_key(&created);
    assert!(id2.starts_with("TP") && id2 != id1 && secret2.len() == 40, "{created}");
    n.assert_works(&id2, &secret2);

    let list = n.keys_ok(&["list"]);
    assert!(list.contains(&id1) && list.contains(&id2) && list.contains("ci-runner"), "{list}");
    assert!(!list.contains(&secret1) && !list.contains(&secret2), "no secrets in the list: {list}");
    let json: serde_json::Value = serde_json::from_str(&n.keys_ok(&["list", "--json"])).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");
    assert!(!json.to_string().contains(&secret1) && !json.to_string().contains(&secret2));

    // The admin routes refuse a missing or wrong token.
    for auth in [None, Some("Bearer nope"), Some(&*format!("Bearer {}", "0".repeat(64))), Some("Basic eDp5")] {
        for (m, p) in [("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", &*format!("/admin/keys/{id2}"))] {
            let (status, body) = n.admin(m, p, auth);
            assert!(status.starts_with("HTTP/1.1 401"), "{m} {p} with {auth:?}: {status} {body}");
        }
    }
    n.assert_works(&id2, &secret2);

    // Revocation takes effect at the next request; the other key keeps working.
    let out = n.keys_ok(&["revoke", &id1]);
    assert!(out.contains("revoked"), "{out}");
    n.assert_refused(&id1, &secret1);
    n.assert_works(&id2, &secret2);
    let out = n.keys(&["revoke", &id1]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("404"), "revoked twice");

    // Keys survive a restart; the secrets are not printed again.
    n.stop();
    let out = n.keys(&["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no tidepool node answers at"), "{err}");
    n.up(&[]);
    assert!(n.banner.contains("existing data folder") && n.banner.contains(&id2), "{}", n.banner);
    assert!(!n.banner.contains(&secret2) && !n.banner.contains(&id1), "{}", n.banner);
    n.assert_works(&id2, &secret2);
    n.assert_refused(&id1, &secret1);
    n.stop();

    // Sealed at rest: no secret anywhere in the data folder, in any file.
    for s in [&secret1, &secret2] {
        assert_eq!(files_containing(&data, s.as_bytes()), Vec::<PathBuf>::new(), "secret in the clear");
    }
    assert!(!files_containing(&data, id2.as_bytes()).is_empty(), "the id itself is stored (sanity check of the grep)");
}

#[test]
fn env_key_works_unattended_and_legacy_file_is_imported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut n = Node::new(&data);
    // A folder made by an older tidepool: the key pair in <data_dir>/s3-credentials.
    let out = n.cmd().args(["fs", "mkdir", "/bucket"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (legacy_id, legacy_secret) = ("TPLEGACYKEY000000001", "legacy-secret-0123456789abcdefghijklmno");
    std::fs::write(
        data.join("s3-credentials"),
        format!("access_key_id={legacy_id}\nsecret_access_key={legacy_secret}\n"),
    )
    .unwrap();
    n.up(&[]);
    assert!(!data.join("s3-credentials").exists(), "imported, then removed");
    assert!(n.banner.contains(legacy_id) && !n.banner.contains(legacy_secret), "{}", n.banner);
    n.assert_works(legacy_id, legacy_secret);
    n.stop();

    // Scripts and containers: the key from the environment, added, works at once.
    let (env_id, env_secret) = ("TPENVKEY0000000000001", "env-secret/with+symbols=0123456789abcdef");
    let env = [("TIDEPOOL_S3_ACCESS_KEY_ID", env_id), ("TIDEPOOL_S3_SECRET_ACCESS_KEY", env_secret)];
    n.up(&env);
    let (id, secret) = banner_key(&n.banner);
    assert_eq!((id.as_str(), secret.as_str()), (env_id, env_secret), "{}", n.banner);
    n.assert_works(env_id, env_secret);
    n.assert_works(legacy_id, legacy_secret);
    n.stop();

    // The same id with another secret replaces it.
    let new_secret = "rotated-secret-0123456789abcdefghijklmn";
    n.up(&[env[0], ("TIDEPOOL_S3_SECRET_ACCESS_KEY", new_secret)]);
    n.assert_works(env_id, new_secret);
    let out = n.aws_ls(env_id, env_secret);
    assert!(!out.status.success(), "the old secret no longer signs");
    n.stop();

    // Half a pair, or an id that is not AWS-like, is refused with the variable named.
    let out = n.cmd().arg("up").env("TIDEPOOL_S3_ACCESS_KEY_ID", env_id).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("set both"));
    let out = n.cmd().arg("up").envs([("TIDEPOOL_S3_ACCESS_KEY_ID", "short"), env[1]]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("TIDEPOOL_S3_ACCESS_KEY_ID") && err.contains("16 to 128"), "{err}");
    for s in [legacy_secret, env_secret, new_secret] {
        assert_eq!(files_containing(&data, s.as_bytes()), Vec::<PathBuf>::new(), "secret in the clear");
    }
}
