//! Inbound connections: accept, handshake, then read frames — Raft messages straight to the
//! handler, requests each in a task of their own (bounded per connection), answers through the
//! connection's writer task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protobuf::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument as _;

use super::conn::write_loop;
use super::handshake::{self, Channel, HandshakeError};
use super::wire::{ErrKind, Frame, FrameReader, Outgoing};
use super::{OpenGuard, Request, Response, Shared, TaskGuard, TransportError};

/// How long an inbound peer has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers queued per inbound connection's writer.
const ANSWER_QUEUE: usize = 256;
const READ_BUFFER_BYTES: usize = 64 << 10;

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                shared.rt.spawn(inbound(shared.clone(), stream, addr));
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn inbound(shared: Arc<Shared>, mut stream: TcpStream, addr: SocketAddr) {
    let _task = TaskGuard::new(&shared);
    let mut stop = shared.stop.subscribe();
    super::sockopt::tune(&stream, shared.cfg.dead_peer_timeout);
    let keys = shared.keys();
    let hs = tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::server(&mut stream, &keys)) => r,
    };
    let (from, channel) = match hs {
        Ok(Ok(v)) => v,
        Ok(Err(HandshakeError::Refused(reason))) => {
            shared.refused(&addr.to_string(), &reason);
            return;
        }
        Ok(Err(HandshakeError::Io(e))) => {
            tracing::debug!(%addr, error = %e, "inbound handshake failed");
            return;
        }
        Err(_) => {
            shared.refused(&addr.to_string(), "handshake timed out");
            return;
        }
    };
    let span = tracing::debug_span!("transport_conn", node_id = shared.cfg.node_id, from, ?channel, %addr);
    async {
        tracing::debug!("inbound connection");
        let counters = shared.counters(from);
        let _open = OpenGuard::new(counters.clone());
        let (r, w) = stream.into_split();
        let (tx, rx) = mpsc::channel(ANSWER_QUEUE);
        let mut writer = shared.rt.spawn(write_loop(w, rx, counters, shared.cfg.call_timeout));
        let outcome = tokio::select! {
            r = serve(&shared, from, channel, r, tx) => r.err(),
            w = &mut writer => match w {
                Ok(Err(e)) => Some(e),
                _ => None,
            },
            _ = stop.wait_for(|s| *s) => None,
        };
        writer.abort();
        match outcome {
            Some(e @ TransportError::TooLarge { .. }) | Some(e @ TransportError::Decode(_)) => {
                tracing::warn!(error = %e, "closing connection: bad frame from peer");
            }
            Some(e) => tracing::debug!(error = %e, "inbound connection closed"),
            None => tracing::debug!("inbound connection closed"),
        }
    }
    .instrument(span)
    .await
}

/// Reads frames until the peer closes or sends something out of bounds.
async fn serve(
    shared: &Arc<Shared>,
    from: u64,
    channel: Channel,
    r: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::Sender<Outgoing>,
) -> Result<(), TransportError> {
    let counters = shared.counters(from);
    let in_flight = Arc::new(Semaphore::new(shared.cfg.max_in_flight));
    let mut frames = FrameReader::new(tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, r));
    while let Some((frame, body, len)) = frames.next().await? {
        counters.received(len);
        let blocked = shared.is_blocked(from);
        match frame {
            Frame::Raft => {
                if blocked {
                    continue;
                }
                match ::raft::eraftpb::Message::parse_from_bytes(&body) {
                    Ok(msg) => shared.handler.raft(from, msg),
                    Err(e) => return Err(TransportError::Decode(format!("raft message from={from}: {e}"))),
                }
            }
            Frame::Request { id, req } => {
                if channel == Channel::Control {
                    return Err(TransportError::Decode("request on a control connection".to_string()));
                }
                if blocked {
                    continue;
                }
                // Backpressure: at most `max_in_flight` requests per connection; beyond that the
                // connection is not read until one finishes. Invariant: never closed.
                let permit = in_flight.clone().acquire_owned().await.expect("semaphore never closed");
                let shared = shared.clone();
                let tx = tx.clone();
                let span = tracing::debug_span!("transport_request", id, kind = req.kind());
                shared.rt.clone().spawn(
                    async move {
                        let (resp, body) = match req {
                            Request::Ping => (Response::Pong { node_id: shared.cfg.node_id }, Bytes::new()),
                            req => shared.handler.request(from, req, body).await,
                        };
                        drop(permit);
                        if shared.is_blocked(from) {
                            return;
                        }
                        let out = match Outgoing::new(&Frame::Response { id, resp }, body) {
                            Ok(out) => out,
                            Err(e) => {
                                tracing::warn!(error = %e, "answer does not fit in a frame");
                                let resp = Response::Err { kind: ErrKind::Invalid, message: e.to_string() };
                                // Invariant: an error answer without a body always fits.
                                Outgoing::new(&Frame::Response { id, resp }, Bytes::new()).expect("small frame")
                            }
                        };
                        let _ = tx.send(out).await;
                    }
                    .instrument(span),
                );
            }
            Frame::Response { .. } => {
                return Err(TransportError::Decode("answer on an inbound connection".to_string()));
            }
        }
    }
    Ok(())
}
