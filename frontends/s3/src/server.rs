//! Serving the S3 service over HTTP/1.1 and HTTP/2 (hyper-util's auto connection builder), one
//! task per connection, a `tracing` span and a metrics count per request, and a graceful stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use s3s::service::S3Service;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::S3Metrics;
use crate::auth::OpSlot;

/// How long a stop waits for requests in flight before dropping their connections.
const DRAIN_SECS: u64 = 10;

/// Accept connections on `listener` until `shutdown` completes, then let requests in flight
/// finish (up to 10 s) and return.
pub async fn serve(
    listener: TcpListener,
    service: S3Service,
    metrics: Arc<S3Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = ConnBuilder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "s3: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = sock.set_nodelay(true);
        let (svc, metrics) = (service.clone(), metrics.clone());
        let handler = hyper::service::service_fn(move |req| handle(svc.clone(), metrics.clone(), req));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(sock), handler).into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "s3: connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(DRAIN_SECS)) => {
            tracing::warn!("s3: requests still in flight after {DRAIN_SECS} s; dropping them");
        }
    }
}

async fn handle(
    svc: S3Service,
    metrics: Arc<S3Metrics>,
    mut req: hyper::Request<Incoming>,
) -> Result<s3s::HttpResponse, s3s::HttpError> {
    let slot = OpSlot::default();
    req.extensions_mut().insert(slot.clone());
    let span = tracing::info_span!(
        "s3",
        method = %req.method(),
        path = %req.uri().path(),
        op = tracing::field::Empty,
        status = tracing::field::Empty
    );
    let mut res = svc.call(req.map(s3s::Body::from)).instrument(span.clone()).await;
    // s3s answers HeadObject 200 always; S3 answers a HEAD of a range or part 206, as a GET.
    if let Ok(r) = &mut res
        && r.status() == hyper::StatusCode::OK
        && r.headers().contains_key(hyper::header::CONTENT_RANGE)
        && slot.0.lock().ok().is_some_and(|g| g.as_deref() == Some("HeadObject"))
    {
        *r.status_mut() = hyper::StatusCode::PARTIAL_CONTENT;
    }
    let status = match &res {
        Ok(r) => r.status().as_u16(),
        Err(_) => 500,
    };
    // Requests refused before an operation is resolved (bad signature, bad path) have none.
    let op = slot.0.lock().ok().and_then(|g| g.clone()).unwrap_or_else(|| "none".into());
    span.record("op", op.as_str());
    span.record("status", status);
    tracing::debug!(parent: &span, "s3 request done");
    metrics.request(&op, status);
    res
}
