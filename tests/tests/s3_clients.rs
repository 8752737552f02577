//! The real S3 clients against a real `tidepool up`: the aws CLI (`s3` and `s3api`), boto3
//! (`tests/clients/boto3_e2e.py`), rclone, and curl (a presigned URL; anonymous and wrongly
//! signed requests), multipart upload (aws CLI, rclone) and RenameObject (curl). ./test.sh
//! installs the clients; a missing client fails the test.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tidepool_e2e::{free_port, ok, read_banner, run, tidepool_bin};

const KEY: &str = "TPE2EACCESSKEY0000001";
const SECRET: &str = "e2e-secret-key-abcdefghijklmnop";

struct Up {
    child: Child,
    endpoint: String,
    http_port: u16,
    _dir: tempfile::TempDir,
    work: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Up {
    let dir = tempfile::tempdir().unwrap();
    let (http_port, s3_port) = (free_port(), free_port());
    let mut child = Command::new(tidepool_bin())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("up")
        .env("TIDEPOOL_DEVICE_SIZE", "256MiB")
        .env("TIDEPOOL_SEGMENT_SIZE", "16MiB")
        .env("TIDEPOOL_HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
        .env("TIDEPOOL_S3_LISTEN", format!("127.0.0.1:{s3_port}"))
        .env("TIDEPOOL_NFS_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("TIDEPOOL_S3_ACCESS_KEY_ID", KEY)
        .env("TIDEPOOL_S3_SECRET_ACCESS_KEY", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tidepool up");
    let banner = read_banner(&mut child);
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    assert!(banner.contains(&format!("S3            {endpoint}")), "{banner}");
    assert!(banner.contains(KEY) && banner.contains(SECRET) && banner.contains("aws --endpoint-url"), "{banner}");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    Up { child, endpoint, http_port, _dir: dir, work }
}

/// Run a client; a client that is not installed fails the test with what to do.
fn aws(up: &Up, args: &[&str]) -> Command {
    let mut c = Command::new("aws");
    c.arg("--endpoint-url").arg(&up.endpoint).args(args);
    c.env("AWS_ACCESS_KEY_ID", KEY).env("AWS_SECRET_ACCESS_KEY", SECRET).env("AWS_DEFAULT_REGION", "us-east-1");
    c.env("AWS_CONFIG_FILE", "/dev/null").env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null").env_remove("AWS_PROFILE");
    c
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

#[test]
fn aws_cli_s3_and_s3api() {
    let up = start();
    let w = &up.work;
    ok(aws(&up, &["s3", "mb", "s3://cli"]));
    // 5 MB: below the CLI's multipart threshold (multipart: `multipart_and_rename_with_real_clients`).
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
    write(&w.join("big.bin"), &big);
    ok(aws(&up, &["s3", "cp", w.join("big.bin").to_str().unwrap(), "s3://cli/data/big.bin"]));
    ok(aws(&up, &["s3", "cp", "s3://cli/data/big.bin", w.join("back.bin").to_str().unwrap()]));
    assert!(std::fs::read(w.join("back.bin")).unwrap() == big, "round trip through aws s3 cp");

    for (p, d) in [("tree/a.txt", "a"), ("tree/sub/b.txt", "b"), ("tree/sub/deeper/c.txt", "c"), ("tree/a-b.txt", "ab")]
    {
        write(&w.join(p), d.as_bytes());
    }
    ok(aws(&up, &["s3", "sync", w.join("tree").to_str().unwrap(), "s3://cli/sync"]));
    let ls = ok(aws(&up, &["s3", "ls", "--recursive", "s3://cli/sync/"]));
    let keys: Vec<&str> = ls.lines().filter_map(|l| l.split_whitespace().last()).collect();
    assert_eq!(keys, ["sync/a-b.txt", "sync/a.txt", "sync/sub/b.txt", "sync/sub/deeper/c.txt"], "{ls}");
    let ls = ok(aws(&up, &["s3", "ls", "s3://cli/sync/"]));
    assert!(ls.contains("PRE sub/") && ls.contains("a.txt"), "{ls}");
    // A second sync uploads nothing.
    let again = ok(aws(&up, &["s3", "sync", w.join("tree").to_str().unwrap(), "s3://cli/sync"]));
    assert!(again.trim().is_empty(), "{again}");

    let put = json(&ok(aws(
        &up,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "cli",
            "--key",
            "m/obj",
            "--body",
            w.join("tree/a.txt").to_str().unwrap(),
            "--metadata",
            "color=blue",
            "--content-type",
            "text/x-test",
        ],
    )));
    let etag = put["ETag"].as_str().unwrap().to_owned();
    let head = json(&ok(aws(&up, &["s3api", "head-object", "--bucket", "cli", "--key", "m/obj", "--if-match", &etag])));
    assert_eq!((head["Metadata"]["color"].as_str(), head["ContentType"].as_str()), (Some("blue"), Some("text/x-test")));
    let out = run(aws(&up, &["s3api", "head-object", "--bucket", "cli", "--key", "m/obj", "--if-match", "\"nope\""]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("412"), "{out:?}");
    let get = json(&ok(aws(
        &up,
        &[
            "s3api",
            "get-object",
            "--bucket",
            "cli",
            "--key",
            "data/big.bin",
            "--range",
            "bytes=1000-1999",
            w.join("range.bin").to_str().unwrap(),
        ],
    )));
    assert_eq!(get["ContentRange"].as_str(), Some("bytes 1000-1999/5000000"));
    assert!(std::fs::read(w.join("range.bin")).unwrap() == big[1000..2000]);

    let list = json(&ok(aws(
        &up,
        &["s3api", "list-objects-v2", "--bucket", "cli", "--prefix", "sync/", "--delimiter", "/", "--max-keys", "2"],
    )));
    let keys: Vec<&str> = list["Contents"].as_array().unwrap().iter().map(|o| o["Key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["sync/a-b.txt", "sync/a.txt"], "{list}");
    assert_eq!(list["IsTruncated"], true);

    ok(aws(
        &up,
        &[
            "s3api",
            "copy-object",
            "--bucket",
            "cli",
            "--key",
            "m/copy",
            "--copy-source",
            "cli/m/obj",
            "--metadata-directive",
            "REPLACE",
            "--metadata",
            "color=red",
        ],
    ));
    let head = json(&ok(aws(&up, &["s3api", "head-object", "--bucket", "cli", "--key", "m/copy"])));
    assert_eq!(head["Metadata"]["color"].as_str(), Some("red"));
    let del = json(&ok(aws(
        &up,
        &[
            "s3api",
            "delete-objects",
            "--bucket",
            "cli",
            "--delete",
            r#"{"Objects":[{"Key":"m/obj"},{"Key":"m/copy"}]}"#,
        ],
    )));
    assert_eq!(del["Deleted"].as_array().map(Vec::len), Some(2), "{del}");

    ok(aws(&up, &["s3", "rm", "--recursive", "s3://cli/"]));
    let ls = ok(aws(&up, &["s3", "ls", "--recursive", "s3://cli/"]));
    assert!(ls.trim().is_empty(), "{ls}");
    ok(aws(&up, &["s3", "rb", "s3://cli"]));

    // The requests were counted.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", up.http_port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut m = String::new();
    s.read_to_string(&mut m).unwrap();
    assert!(m.contains("tidepool_s3_requests_total{op=\"PutObject\",status=\"200\"}"), "{m}");
    assert!(m.contains("tidepool_s3_bytes_total{dir=\"in\"}"), "{m}");
}

#[test]
fn boto3_rclone_and_curl() {
    let up = start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/boto3_e2e.py");
    let out = ok({
        let mut c = Command::new("python3");
        c.args([script, &up.endpoint, KEY, SECRET]);
        c
    });
    assert!(out.contains("boto3 ok"), "{out}");
    let url = out.lines().find_map(|l| l.strip_prefix("presigned ")).unwrap().to_owned();

    // curl: the presigned URL works; no signature, or a wrong one, is refused.
    let body = ok({
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail", &url]);
        c
    });
    assert_eq!(body, "tidepool via boto3\n".repeat(1000));
    let anon = ok({
        let mut c = Command::new("curl");
        c.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", &format!("{}/boto/deep/path/to/obj.txt", up.endpoint)]);
        c
    });
    assert_eq!(anon, "403");
    let wrong = ok({
        let mut c = Command::new("curl");
        c.args(["-sS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{KEY}:not-the-secret")]);
        c.args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
        c.arg(format!("{}/boto/deep/path/to/obj.txt", up.endpoint));
        c
    });
    assert!(wrong.contains("SignatureDoesNotMatch"), "{wrong}");
    let tampered = url.replace("obj.txt?", "obj.txT?");
    let code = ok({
        let mut c = Command::new("curl");
        c.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", &tampered]);
        c
    });
    assert_eq!(code, "403");

    // rclone with an on-the-fly remote (Debian's rclone refuses to start with AWS_CA_BUNDLE set).
    let rclone = |args: &[&str]| {
        let mut c = Command::new("rclone");
        c.args(args).env_remove("AWS_CA_BUNDLE");
        c.env("RCLONE_CONFIG", "/dev/null");
        c.env("RCLONE_CONFIG_TP_TYPE", "s3")
            .env("RCLONE_CONFIG_TP_PROVIDER", "Other")
            .env("RCLONE_CONFIG_TP_ACCESS_KEY_ID", KEY)
            .env("RCLONE_CONFIG_TP_SECRET_ACCESS_KEY", SECRET)
            .env("RCLONE_CONFIG_TP_ENDPOINT", &up.endpoint)
            .env("RCLONE_CONFIG_TP_REGION", "us-east-1");
        c
    };
    let src = up.work.join("rc");
    for (p, d) in [("x.txt", "x"), ("d/y.txt", "yy"), ("d/e/z.txt", "zzz")] {
        write(&src.join(p), d.as_bytes());
    }
    ok(rclone(&["mkdir", "tp:rcl"]));
    ok(rclone(&["copy", src.to_str().unwrap(), "tp:rcl/in"]));
    let lsf = ok(rclone(&["lsf", "-R", "--files-only", "tp:rcl"]));
    let mut files: Vec<&str> = lsf.lines().collect();
    files.sort();
    assert_eq!(files, ["in/d/e/z.txt", "in/d/y.txt", "in/x.txt"], "{lsf}");
    assert_eq!(ok(rclone(&["cat", "tp:rcl/in/d/e/z.txt"])), "zzz");
    // rclone checks what it uploaded against the MD5 ETags.
    ok(rclone(&["check", src.to_str().unwrap(), "tp:rcl/in"]));
    // boto3's object is visible to rclone: one namespace.
    assert_eq!(ok(rclone(&["cat", "tp:boto/deep/path/to/obj.txt"])).len(), 19_000);
}

/// curl with a SigV4 signature from the test key.
fn curl_sigv4(args: &[&str]) -> Command {
    curl_sigv4_in("us-east-1", args)
}

/// curl with a SigV4 signature from the test key for `region`.
fn curl_sigv4_in(region: &str, args: &[&str]) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--aws-sigv4", &format!("aws:amz:{region}:s3"), "--user", &format!("{KEY}:{SECRET}")]);
    c.args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]).args(args);
    c
}

/// The region a signature names must be the endpoint's (`s3_region`, us-east-1 here); bucket
/// creation dates stay put; additional checksums through the aws CLI and curl.
#[test]
fn region_creation_date_and_checksums_with_real_clients() {
    let up = start();
    let w = &up.work;
    let path = |p: &str| w.join(p).to_str().unwrap().to_owned();
    ok(aws(&up, &["s3", "mb", "s3://integ"]));

    // Another region: refused as S3 does, for the CLI (header auth) and for curl.
    let out = run({
        let mut c = aws(&up, &["s3api", "list-buckets"]);
        c.env("AWS_DEFAULT_REGION", "eu-west-1");
        c
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("AuthorizationHeaderMalformed"), "{err}");
    let body = ok(curl_sigv4_in("eu-west-1", &[&format!("{}/integ", up.endpoint)]));
    assert!(
        body.contains("AuthorizationHeaderMalformed")
            && body.contains("the region &apos;eu-west-1&apos; is wrong; expecting &apos;us-east-1&apos;"),
        "{body}"
    );
    let body = ok(curl_sigv4(&[&format!("{}/integ", up.endpoint)]));
    assert!(body.contains("ListBucketResult"), "the right region works: {body}");

    // CreationDate does not move when objects come and go.
    let created = || {
        let l = json(&ok(aws(&up, &["s3api", "list-buckets"])));
        l["Buckets"][0]["CreationDate"].as_str().unwrap().to_owned()
    };
    let before = created();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&w.join("f.txt"), b"some bytes");
    ok(aws(&up, &["s3", "cp", &path("f.txt"), "s3://integ/a/b/f.txt"]));
    ok(aws(&up, &["s3", "rm", "s3://integ/a/b/f.txt"]));
    assert_eq!(created(), before);

    // A checksum asked of the CLI is checked, kept and answered.
    let put = json(&ok(aws(
        &up,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "integ",
            "--key",
            "ck",
            "--body",
            &path("f.txt"),
            "--checksum-algorithm",
            "SHA256",
        ],
    )));
    let sha = put["ChecksumSHA256"].as_str().expect("the PUT answers its checksum").to_owned();
    let got = json(&ok(aws(
        &up,
        &["s3api", "get-object", "--bucket", "integ", "--key", "ck", "--checksum-mode", "ENABLED", &path("ck.out")],
    )));
    assert_eq!(got["ChecksumSHA256"].as_str(), Some(sha.as_str()), "{got}");
    // A wrong one is refused and nothing is stored.
    let out = run(aws(
        &up,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "integ",
            "--key",
            "bad",
            "--body",
            &path("f.txt"),
            "--checksum-sha256",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ],
    ));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("BadDigest"), "{out:?}");
    let code = ok(curl_sigv4(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "-H",
        "x-amz-checksum-crc32: AAAAAA==",
        "--data-binary",
        "not empty",
        &format!("{}/integ/bad", up.endpoint),
    ]));
    assert_eq!(code, "400", "curl with a wrong x-amz-checksum-crc32");
    let out = run(aws(&up, &["s3api", "head-object", "--bucket", "integ", "--key", "bad"]));
    assert!(!out.status.success(), "nothing stored: {out:?}");
    // The right value through curl: stored, and answered by the PUT.
    let headers = ok(curl_sigv4(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "PUT",
        "-H",
        "x-amz-checksum-crc32: AAAAAA==",
        "--data-binary",
        "",
        &format!("{}/integ/empty", up.endpoint),
    ]));
    assert!(
        headers.starts_with("HTTP/1.1 200") && headers.to_lowercase().contains("x-amz-checksum-crc32: aaaaaa=="),
        "{headers}"
    );
}

/// Multipart upload through the aws CLI (`s3 cp` above its 8 MiB threshold, and every `s3api`
/// call), rclone above its upload cutoff, and RenameObject through a raw SigV4 request (curl).
#[test]
fn multipart_and_rename_with_real_clients() {
    let up = start();
    let w = &up.work;
    let path = |p: &str| w.join(p).to_str().unwrap().to_owned();
    ok(aws(&up, &["s3", "mb", "s3://mpu"]));

    // aws s3 cp: 40 MiB goes up in 8 MiB parts and comes back whole.
    let big: Vec<u8> = (0..40u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    write(&w.join("big.bin"), &big);
    ok(aws(&up, &["s3", "cp", &path("big.bin"), "s3://mpu/cli/big.bin"]));
    let head = json(&ok(aws(&up, &["s3api", "head-object", "--bucket", "mpu", "--key", "cli/big.bin"])));
    assert_eq!(head["ContentLength"].as_u64(), Some(40 << 20), "{head}");
    assert!(head["ETag"].as_str().unwrap().ends_with("-5\""), "a multipart ETag: {head}");
    ok(aws(&up, &["s3", "cp", "s3://mpu/cli/big.bin", &path("back.bin")]));
    assert!(std::fs::read(w.join("back.bin")).unwrap() == big, "round trip of a multipart upload");
    // Part 2 by number: the range it was uploaded as, with the part count.
    let part = json(&ok(aws(
        &up,
        &["s3api", "get-object", "--bucket", "mpu", "--key", "cli/big.bin", "--part-number", "2", &path("part2.bin")],
    )));
    assert_eq!(part["ContentLength"].as_u64(), Some(8 << 20), "{part}");
    assert_eq!(part["PartsCount"].as_u64(), Some(5), "{part}");
    assert_eq!(part["ContentRange"].as_str(), Some("bytes 8388608-16777215/41943040"), "{part}");
    assert!(std::fs::read(w.join("part2.bin")).unwrap() == big[8 << 20..16 << 20], "part 2's bytes");
    let out = run(aws(&up, &["s3api", "head-object", "--bucket", "mpu", "--key", "cli/big.bin", "--part-number", "6"]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("416"), "{out:?}");
    // The CLI uploads with CRC32 checksums: the object's is COMPOSITE over its 5 parts.
    let head = json(&ok(aws(
        &up,
        &["s3api", "head-object", "--bucket", "mpu", "--key", "cli/big.bin", "--checksum-mode", "ENABLED"],
    )));
    assert!(head["ChecksumCRC32"].as_str().is_some_and(|c| c.ends_with("-5")), "{head}");
    assert_eq!(head["ChecksumType"].as_str(), Some("COMPOSITE"), "{head}");

    // s3api, call by call.
    let created = json(&ok(aws(
        &up,
        &["s3api", "create-multipart-upload", "--bucket", "mpu", "--key", "api/obj", "--content-type", "text/x-mp"],
    )));
    let id = created["UploadId"].as_str().unwrap().to_owned();
    let listed = json(&ok(aws(&up, &["s3api", "list-multipart-uploads", "--bucket", "mpu"])));
    assert_eq!(listed["Uploads"][0]["UploadId"].as_str(), Some(id.as_str()), "{listed}");
    write(&w.join("p1"), &big[..5 << 20]);
    write(&w.join("p2"), b"the last part");
    let mut parts = Vec::new();
    for (n, f) in [(1, "p1"), (2, "p2")] {
        let r = json(&ok(aws(
            &up,
            &[
                "s3api",
                "upload-part",
                "--bucket",
                "mpu",
                "--key",
                "api/obj",
                "--upload-id",
                &id,
                "--part-number",
                &n.to_string(),
                "--body",
                &path(f),
            ],
        )));
        parts.push(serde_json::json!({"PartNumber": n, "ETag": r["ETag"]}));
    }
    let lp = json(&ok(aws(&up, &["s3api", "list-parts", "--bucket", "mpu", "--key", "api/obj", "--upload-id", &id])));
    let sizes: Vec<u64> = lp["Parts"].as_array().unwrap().iter().map(|p| p["Size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [5 << 20, 13], "{lp}");
    let ls = ok(aws(&up, &["s3api", "list-objects-v2", "--bucket", "mpu", "--prefix", "api/"]));
    assert!(!ls.contains("\"Key\""), "parts are invisible before Complete: {ls}");
    let doc = serde_json::json!({ "Parts": parts }).to_string();
    let done = json(&ok(aws(
        &up,
        &[
            "s3api",
            "complete-multipart-upload",
            "--bucket",
            "mpu",
            "--key",
            "api/obj",
            "--upload-id",
            &id,
            "--multipart-upload",
            &doc,
        ],
    )));
    assert!(done["ETag"].as_str().unwrap().ends_with("-2\""), "{done}");
    ok(aws(&up, &["s3api", "get-object", "--bucket", "mpu", "--key", "api/obj", &path("api.out")]));
    assert!(std::fs::read(w.join("api.out")).unwrap() == [&big[..5 << 20], b"the last part"].concat());
    let head = json(&ok(aws(&up, &["s3api", "head-object", "--bucket", "mpu", "--key", "api/obj"])));
    assert_eq!(head["ContentType"].as_str(), Some("text/x-mp"), "{head}");

    // Aborted: nothing visible, no upload left.
    let created = json(&ok(aws(&up, &["s3api", "create-multipart-upload", "--bucket", "mpu", "--key", "api/gone"])));
    let id = created["UploadId"].as_str().unwrap().to_owned();
    ok(aws(
        &up,
        &[
            "s3api",
            "upload-part",
            "--bucket",
            "mpu",
            "--key",
            "api/gone",
            "--upload-id",
            &id,
            "--part-number",
            "1",
            "--body",
            &path("p2"),
        ],
    ));
    ok(aws(&up, &["s3api", "abort-multipart-upload", "--bucket", "mpu", "--key", "api/gone", "--upload-id", &id]));
    let listed = ok(aws(&up, &["s3api", "list-multipart-uploads", "--bucket", "mpu"]));
    assert!(!listed.contains("UploadId"), "{listed}");
    let ls = ok(aws(&up, &["s3", "ls", "--recursive", "s3://mpu/"]));
    assert!(!ls.contains("api/gone"), "{ls}");
    let out = run(aws(&up, &["s3api", "list-parts", "--bucket", "mpu", "--key", "api/gone", "--upload-id", &id]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NoSuchUpload"), "{out:?}");

    // rclone above its upload cutoff uploads in parts.
    write(&w.join("rc/r.bin"), &big[..12 << 20]);
    let rclone = |args: &[&str]| {
        let mut c = Command::new("rclone");
        c.args(args).env_remove("AWS_CA_BUNDLE").env("RCLONE_CONFIG", "/dev/null");
        c.env("RCLONE_CONFIG_TP_TYPE", "s3")
            .env("RCLONE_CONFIG_TP_PROVIDER", "Other")
            .env("RCLONE_CONFIG_TP_ACCESS_KEY_ID", KEY)
            .env("RCLONE_CONFIG_TP_SECRET_ACCESS_KEY", SECRET)
            .env("RCLONE_CONFIG_TP_ENDPOINT", &up.endpoint)
            .env("RCLONE_CONFIG_TP_REGION", "us-east-1");
        c
    };
    ok(rclone(&["copy", "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M", &path("rc"), "tp:mpu/rc"]));
    let head = json(&ok(aws(&up, &["s3api", "head-object", "--bucket", "mpu", "--key", "rc/r.bin"])));
    assert!(head["ETag"].as_str().unwrap().ends_with("-3\""), "rclone used multipart: {head}");
    ok(rclone(&["copy", "tp:mpu/rc", &path("rc-back")]));
    assert!(std::fs::read(w.join("rc-back/r.bin")).unwrap() == big[..12 << 20]);

    // RenameObject through a raw SigV4 request: same bucket, parents made and pruned.
    // `?renameObject=`: curl 7.88 signs a valueless `?renameObject` without the `=` that SigV4
    // canonical queries (and s3s) put there.
    let url = |k: &str| format!("{}/mpu/{k}?renameObject=", up.endpoint);
    let code = ok(curl_sigv4(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "-H",
        "x-amz-rename-source: /mpu/api/obj",
        &url("moved/here/obj"),
    ]));
    assert_eq!(code, "200");
    ok(aws(&up, &["s3api", "get-object", "--bucket", "mpu", "--key", "moved/here/obj", &path("moved.out")]));
    assert!(std::fs::read(w.join("moved.out")).unwrap() == std::fs::read(w.join("api.out")).unwrap());
    let ls = ok(aws(&up, &["s3", "ls", "s3://mpu/"]));
    assert!(ls.contains("PRE moved/") && !ls.contains("PRE api/"), "source folder pruned: {ls}");
    // Destination exists and If-None-Match: * -> 412; nothing moved.
    let code = ok(curl_sigv4(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "-H",
        "x-amz-rename-source: /mpu/cli/big.bin",
        "-H",
        "If-None-Match: *",
        &url("moved/here/obj"),
    ]));
    assert_eq!(code, "412");
    // Unsigned: refused.
    let code = ok({
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            "x-amz-rename-source: /mpu/cli/big.bin",
        ]);
        c.arg(url("stolen"));
        c
    });
    assert_eq!(code, "403");
    let ls = ok(aws(&up, &["s3", "ls", "--recursive", "s3://mpu/"]));
    assert!(ls.contains("cli/big.bin") && !ls.contains("stolen"), "{ls}");
}
