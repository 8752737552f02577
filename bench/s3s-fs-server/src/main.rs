//! s3s-fs-server HOST:PORT ROOT ACCESS_KEY SECRET_KEY [COUNTERS_HOST:PORT]
//!
//! s3s-fs 0.14.1's own `main.rs` (path-style, one key, HTTP/1.1 and HTTP/2 on one port,
//! graceful stop on SIGINT/SIGTERM) with two changes:
//!
//! - `set_nodelay(true)` on each accepted socket, as tidepool's S3 server does, so both are
//!   measured without Nagle's delay (bench/s3.sh);
//! - every request is counted by S3 operation (told from method, query and headers, before
//!   s3s sees it) with its answer's status and its body bytes (bench/tier.sh counts PUTs this
//!   way), and requests with a body by how they sign it (`~payload ...`: a SHA-256 the server
//!   checks, or unsigned). With COUNTERS_HOST:PORT the counts are served there as JSON: `GET /counts`, and
//!   `GET /reset` (answers the counts, then zeroes them). They are printed on stop too.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// Per operation: requests, requests answered 2xx, request body bytes (decoded length).
#[derive(Default, Clone, Copy)]
struct Count {
    n: u64,
    ok: u64,
    bytes: u64,
}

type Counts = Arc<Mutex<BTreeMap<&'static str, Count>>>;

fn counts_json(c: &BTreeMap<&'static str, Count>) -> String {
    let items: Vec<String> = c
        .iter()
        .map(|(op, v)| format!("\"{op}\": {{\"n\": {}, \"ok\": {}, \"bytes\": {}}}", v.n, v.ok, v.bytes))
        .collect();
    format!("{{{}}}\n", items.join(", "))
}

/// The S3 operation of a path-style request.
fn op_of<B>(req: &http::Request<B>) -> &'static str {
    let path = req.uri().path().trim_start_matches('/');
    let has_key = path.split_once('/').is_some_and(|(_, k)| !k.is_empty());
    let q = req.uri().query().unwrap_or("");
    let has = |name: &str| q.split('&').any(|kv| kv.split('=').next() == Some(name));
    let copy = req.headers().contains_key("x-amz-copy-source");
    match (req.method().as_str(), path.is_empty(), has_key) {
        ("GET", true, _) => "ListBuckets",
        ("PUT", _, true) if has("partNumber") && has("uploadId") => {
            if copy { "UploadPartCopy" } else { "UploadPart" }
        }
        ("PUT", _, true) if copy => "CopyObject",
        ("PUT", _, true) => "PutObject",
        ("PUT", _, false) => "CreateBucket",
        ("POST", _, true) if has("uploads") => "CreateMultipartUpload",
        ("POST", _, true) if has("uploadId") => "CompleteMultipartUpload",
        ("POST", _, false) if has("delete") => "DeleteObjects",
        ("DELETE", _, true) if has("uploadId") => "AbortMultipartUpload",
        ("DELETE", _, true) => "DeleteObject",
        ("DELETE", _, false) => "DeleteBucket",
        ("GET", _, true) if has("uploadId") => "ListParts",
        ("GET", _, true) => "GetObject",
        ("GET", _, false) if has("uploads") => "ListMultipartUploads",
        ("GET", _, false) if has("location") => "GetBucketLocation",
        ("GET", _, false) if q.contains("list-type=2") => "ListObjectsV2",
        ("GET", _, false) => "ListObjects",
        ("HEAD", _, true) => "HeadObject",
        ("HEAD", _, false) => "HeadBucket",
        _ => "Other",
    }
}

/// How a request with a body (PUT, POST) signs it: `~payload <kind>` (`x-amz-content-sha256`:
/// a hash the server checks with its own SHA-256 pass, `UNSIGNED-PAYLOAD`, or streaming chunks).
fn payload_of<B>(req: &http::Request<B>) -> Option<&'static str> {
    if !matches!(req.method().as_str(), "PUT" | "POST") {
        return None;
    }
    let v = req.headers().get("x-amz-content-sha256").and_then(|v| v.to_str().ok()).unwrap_or("");
    Some(match v {
        "" => "~payload none",
        "UNSIGNED-PAYLOAD" => "~payload UNSIGNED-PAYLOAD",
        v if v.starts_with("STREAMING-UNSIGNED") => "~payload STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        v if v.starts_with("STREAMING-") => "~payload STREAMING-signed",
        _ => "~payload sha256 (checked by the server)",
    })
}

fn body_len<B>(req: &http::Request<B>) -> u64 {
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    h("x-amz-decoded-content-length").or_else(|| h("content-length")).unwrap_or(0)
}

/// `GET /counts` and `GET /reset` on the side port (one request per connection).
async fn serve_counts(listener: TcpListener, counts: Counts) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            while got < buf.len() && !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
            let line = String::from_utf8_lossy(&buf[..got]);
            let target = line.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = {
                let mut c = counts.lock().unwrap();
                match target {
                    "/counts" => ("200 OK", counts_json(&c)),
                    "/reset" => {
                        let s = counts_json(&c);
                        c.clear();
                        ("200 OK", s)
                    }
                    _ => ("404 Not Found", "{}\n".to_string()),
                }
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (addr, root, ak, sk, counters) = match args.as_slice() {
        [_, addr, root, ak, sk] => (addr, root, ak, sk, None),
        [_, addr, root, ak, sk, c] => (addr, root, ak, sk, Some(c)),
        _ => return Err("usage: s3s-fs-server HOST:PORT ROOT ACCESS_KEY SECRET_KEY [COUNTERS_HOST:PORT]".into()),
    };
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("{root}: {e:?}"))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ak.as_str(), sk.as_str()));
        b.build()
    };
    let counts: Counts = Arc::default();
    let listener = TcpListener::bind(addr.as_str()).await?;
    println!("s3s-fs-server on http://{} serving {root}", listener.local_addr()?);
    if let Some(c) = counters {
        let l = TcpListener::bind(c.as_str()).await?;
        println!("request counts on http://{}/counts (and /reset)", l.local_addr()?);
        tokio::spawn(serve_counts(l, counts.clone()));
    }
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { eprintln!("accept: {e}"); continue; }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let _ = sock.set_nodelay(true);
        let (service, counts) = (service.clone(), counts.clone());
        let counted = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (service, counts) = (service.clone(), counts.clone());
            let (op, bytes, payload) = (op_of(&req), body_len(&req), payload_of(&req));
            async move {
                let res = hyper::service::Service::call(&service, req).await;
                let ok = matches!(&res, Ok(r) if r.status().is_success());
                let mut c = counts.lock().unwrap();
                let e = c.entry(op).or_default();
                e.n += 1;
                e.ok += u64::from(ok);
                e.bytes += bytes;
                if let Some(p) = payload {
                    let e = c.entry(p).or_default();
                    e.n += 1;
                    e.ok += u64::from(ok);
                    e.bytes += bytes;
                }
                res
            }
        });
        let conn = http.serve_connection(TokioIo::new(sock), counted);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {}
    }
    print!("request counts: {}", counts_json(&counts.lock().unwrap()));
    Ok(())
}
