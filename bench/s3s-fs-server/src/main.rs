//! s3s-fs-server HOST:PORT ROOT ACCESS_KEY SECRET_KEY
//!
//! s3s-fs 0.14.1's own `main.rs` (path-style, one key, HTTP/1.1 and HTTP/2 on one port,
//! graceful stop on SIGINT/SIGTERM) with one change: `set_nodelay(true)` on each accepted
//! socket, as tidepool's S3 server does, so both are measured without Nagle's delay.
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, root, ak, sk] = args.as_slice() else {
        return Err("usage: s3s-fs-server HOST:PORT ROOT ACCESS_KEY SECRET_KEY".into());
    };
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("{root}: {e:?}"))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ak.as_str(), sk.as_str()));
        b.build()
    };
    let listener = TcpListener::bind(addr.as_str()).await?;
    println!("s3s-fs-server on http://{} serving {root}", listener.local_addr()?);
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
        let conn = http.serve_connection(TokioIo::new(sock), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {}
    }
    Ok(())
}
