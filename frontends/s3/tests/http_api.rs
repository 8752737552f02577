//! The S3 service in-process on a loopback port over a real `Fs`, driven by boto3 (the real
//! client, `boto3_api.py`) and by raw HTTP for what a client library would not send; then the
//! filesystem is checked directly (staging folder empty, metadata in the xattr map).

mod common;

use std::io::{Read, Write};

use tidepool_fs::ROOT_INO;

fn raw(port: u16, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_drives_every_supported_operation() {
    let srv = common::start().await;
    common::run_boto3_script("boto3_api.py", srv.endpoint()).await;

    let fs = &srv.env.fs;
    let staging = fs.resolve(b"/.tidepool/tmp").unwrap();
    assert!(fs.readdir(staging.ino, None, 10).unwrap().0.is_empty(), "no upload left in the staging folder");
    let uploads = fs.resolve(tidepool_s3::UPLOADS_DIR).unwrap();
    assert!(fs.readdir(uploads.ino, None, 10).unwrap().0.is_empty(), "no multipart upload left behind");
    let src = fs.resolve(b"/data/src").unwrap();
    let x = fs.get_xattrs(src.ino).unwrap();
    assert_eq!(x.get("x").map(String::as_str), Some("y"), "user metadata is the xattr map: {x:?}");
    assert!(x.contains_key(":etag") && !x.contains_key("x-amz-meta-x"), "{x:?}");
    assert!(fs.resolve(b"/data/dir").is_err(), "empty parents were pruned");

    let reqs = srv.metrics.requests();
    assert!(reqs.get(&("PutObject".to_string(), 200)).is_some_and(|n| *n > 20), "{reqs:?}");
    assert!(reqs.contains_key(&("GetObject".to_string(), 304)), "{reqs:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_and_malformed_requests_are_refused_without_harm() {
    let srv = common::start().await;
    let port = srv.port;
    let resp = tokio::task::spawn_blocking(move || {
        let a = raw(port, "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let b = raw(port, "PUT /data/k HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc");
        let c = raw(
            port,
            "GET /data/k HTTP/1.1\r\nhost: x\r\nauthorization: AWS4-HMAC-SHA256 Credential=garbage\r\nconnection: close\r\n\r\n",
        );
        let d = raw(port, "GET /%FF%FE/x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        (a, b, c, d)
    })
    .await
    .unwrap();
    assert!(resp.0.starts_with("HTTP/1.1 403") && resp.0.contains("AccessDenied"), "{}", resp.0);
    assert!(resp.1.starts_with("HTTP/1.1 403") && resp.1.contains("AccessDenied"), "{}", resp.1);
    assert!(resp.2.starts_with("HTTP/1.1 4"), "{}", resp.2);
    assert!(resp.3.starts_with("HTTP/1.1 4"), "{}", resp.3);
    let (entries, _) = srv.env.fs.readdir(ROOT_INO, None, 10).unwrap();
    let names: Vec<String> = entries.iter().map(|e| String::from_utf8_lossy(&e.name).into_owned()).collect();
    assert_eq!(names, vec![".tidepool"], "nothing was created");
    srv.stop().await;
}

/// A PutObject (and an UploadPart) over an existing key costs one metadata commit: no
/// temporary file, no separate metadata or rename commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_is_one_metadata_commit() {
    let srv = common::start().await;
    let endpoint = srv.endpoint();
    let put = move |key: &'static str, body: &'static str| {
        let endpoint = endpoint.clone();
        let script = format!(
            "import boto3,sys\nc=boto3.client('s3',endpoint_url=sys.argv[1],aws_access_key_id=sys.argv[2],\
             aws_secret_access_key=sys.argv[3],region_name='us-east-1')\n\
             if '{body}'=='first': c.create_bucket(Bucket='one')\n\
             c.put_object(Bucket='one',Key='{key}',Body=b'{body}',Metadata={{'m':'{body}'}})\n"
        );
        async move {
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new(common::python())
                    .args(["-c", &script, &endpoint, common::ACCESS_KEY, common::SECRET_KEY])
                    .env_remove("AWS_PROFILE")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    };
    let fs = srv.env.fs.clone();
    put("a/b", "first").await;
    let old = fs.resolve(b"/one/a/b").unwrap();
    let before = fs.meta().status().commit_index;
    put("a/b", "second").await;
    assert_eq!(fs.meta().status().commit_index, before + 1, "one commit for a PUT over a key");
    let new = fs.resolve(b"/one/a/b").unwrap();
    assert_ne!(new.ino, old.ino, "replaced as by a rename over it");
    assert_eq!(fs.read(new.ino, 0, 100).await.unwrap(), b"second");
    let x = fs.get_xattrs(new.ino).unwrap();
    assert_eq!(x.get("m").map(String::as_str), Some("second"), "{x:?}");
    assert_eq!(x.get(":etag-mtime"), Some(&new.mtime.to_string()), "ETag bound to the published mtime");
    let staging = fs.resolve(b"/.tidepool/tmp").unwrap();
    assert!(fs.readdir(staging.ino, None, 10).unwrap().0.is_empty());
    srv.stop().await;
}
