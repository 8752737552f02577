use std::collections::HashSet;
use std::future::Future;
use std::io::{Cursor, Read, Write};
use std::pin::Pin;

use anyhow::anyhow;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{debug, error, trace, warn};

use crate::context::RPCContext;
use crate::rpc::*;
use crate::xdr::*;
use crate::{mount, mount_handlers, nfs, nfs_handlers, portmap, portmap_handlers};

// Information from RFC 5531
// https://datatracker.ietf.org/doc/html/rfc5531

const NFS_ACL_PROGRAM: u32 = 100227;
const NFS_ID_MAP_PROGRAM: u32 = 100270;
const NFS_METADATA_PROGRAM: u32 = 200024;

async fn handle_rpc(
    input: &mut impl Read,
    output: &mut impl Write,
    mut context: RPCContext,
) -> Result<bool, anyhow::Error> {
    let mut recv = rpc_msg::default();
    recv.deserialize(input)?;
    let xid = recv.xid;
    if let rpc_body::CALL(call) = recv.body {
        if let auth_flavor::AUTH_UNIX = call.cred.flavor {
            let mut auth = auth_unix::default();
            auth.deserialize(&mut Cursor::new(&call.cred.body))?;
            context.auth = auth;
        }
        if call.rpcvers != 2 {
            warn!("Invalid RPC version {} != 2", call.rpcvers);
            rpc_vers_mismatch(xid).serialize(output)?;
            return Ok(true);
        }

        // tidepool fork: retransmissions of a running call are dropped by the connection
        // (`serve_connection`), before this.

        // tidepool fork: who calls, for the filesystem's checks (crate::vfs::caller).
        let caller = crate::vfs::Caller {
            peer: context.peer,
            auth: match call.cred.flavor {
                auth_flavor::AUTH_UNIX => Some(crate::vfs::AuthSys {
                    uid: context.auth.uid,
                    gid: context.auth.gid,
                    gids: context.auth.gids.clone(),
                }),
                _ => None,
            },
        };
        let res = crate::vfs::with_caller(caller, async {
            if call.prog == nfs::PROGRAM {
                nfs_handlers::handle_nfs(xid, call, input, output, &context).await
            } else if call.prog == portmap::PROGRAM {
                portmap_handlers::handle_portmap(xid, call, input, output, &context)
            } else if call.prog == mount::PROGRAM {
                mount_handlers::handle_mount(xid, call, input, output, &context).await
            } else if call.prog == NFS_ACL_PROGRAM
                || call.prog == NFS_ID_MAP_PROGRAM
                || call.prog == NFS_METADATA_PROGRAM
            {
                trace!("ignoring NFS_ACL packet");
                prog_unavail_reply_message(xid).serialize(output)?;
                Ok(())
            } else {
                warn!("Unknown RPC Program number {} != {}", call.prog, nfs::PROGRAM);
                prog_unavail_reply_message(xid).serialize(output)?;
                Ok(())
            }
        })
        .await
        .map(|_| true);
        res
    } else {
        error!("Unexpectedly received a Reply instead of a Call");
        Err(anyhow!("Bad RPC Call format"))
    }
}

// RFC 1057 Section 10
// When RPC messages are passed on top of a byte stream transport
// protocol (like TCP), it is necessary to delimit one message from
// another in order to detect and possibly recover from protocol errors.
// This is called record marking (RM).  Sun uses this RM/TCP/IP
// transport for passing RPC messages on TCP streams.  One RPC message
// fits into one RM record.
//
// A record is composed of one or more record fragments.  A record
// fragment is a four-byte header followed by 0 to (2**31) - 1 bytes of
// fragment data.  The bytes encode an unsigned binary number; as with
// XDR integers, the byte order is from highest to lowest.  The number
// encodes two values -- a boolean which indicates whether the fragment
// is the last fragment of the record (bit value 1 implies the fragment
// is the last fragment) and a 31-bit unsigned binary value which is the
// length in bytes of the fragment's data.  The boolean value is the
// highest-order bit of the header; the length is the 31 low-order bits.
// (Note that this record specification is NOT in XDR standard form!)
//
// tidepool fork: the connection below replaces upstream's `SocketMessageHandler`. Upstream
// ran three tasks per connection and one more per call: the socket task copied the bytes
// into a duplex pipe, a second task parsed records out of it (a zeroed `Vec` per record) and
// spawned a task per call, which sent its reply back through a channel to the socket task:
// three task hand-offs per call, often across threads, a write syscall per reply. Here one
// task owns the socket: it parses the records from its receive buffer (no copy), runs the
// calls as futures of its own (`FuturesUnordered`: calls of one connection still overlap;
// one answered from memory is done on its first poll) and writes every reply ready at that
// moment in one write. A call with a large payload (a WRITE or READ past
// `SPAWN_PAYLOAD_BYTES`) runs on a task of its own, so copies and checksums of large
// transfers use every core.

/// A call whose record or READ count is larger than this runs on its own task.
const SPAWN_PAYLOAD_BYTES: usize = 64 << 10;
/// Receive buffer room asked for before each socket read.
const RECV_BYTES: usize = 64 << 10;
/// Largest record accepted (a 1 MiB WRITE and its header fit many times over).
const MAX_RECORD_BYTES: usize = 64 << 20;

/// The outcome of one call: its xid, and its reply (record mark room included) or none.
type CallOutcome = (u32, Result<Option<Vec<u8>>, anyhow::Error>);

/// Run one call: the reply is built after 4 bytes left for its record mark, in a buffer
/// sized for a READ's data.
async fn run_call(record: Bytes, context: RPCContext) -> Result<Option<Vec<u8>>, anyhow::Error> {
    let data = read_count(&record).unwrap_or(0).min(MAX_RECORD_BYTES);
    let mut reply = Vec::with_capacity(256 + data);
    reply.extend_from_slice(&[0u8; 4]);
    if handle_rpc(&mut Cursor::new(record), &mut reply, context).await? {
        let len = reply.len() - 4;
        assert!(len < (1 << 31));
        reply[..4].copy_from_slice(&(len as u32 | (1 << 31)).to_be_bytes());
        Ok(Some(reply))
    } else {
        Ok(None)
    }
}

/// The count an NFSv3 READ call record asks for (`None`: another call, or too short).
fn read_count(record: &[u8]) -> Option<usize> {
    let word = |at: usize| record.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let pad = |n: usize| n.checked_add(3).map(|n| n & !3);
    // xid, CALL, rpcvers, prog, vers, proc, then the credential and the verifier.
    if word(12)? != nfs::PROGRAM as usize || word(20)? != 6
    /* NFSPROC3_READ */
    {
        return None;
    }
    let verf_at = 32usize.checked_add(pad(word(28)?)?)?;
    let fh_at = verf_at.checked_add(8)?.checked_add(pad(word(verf_at + 4)?)?)?;
    // READ3args: the handle, offset (8 bytes), count.
    word(fh_at.checked_add(4)?.checked_add(pad(word(fh_at)?)?)?.checked_add(8)?)
}

/// Whether a call record carries (WRITE) or asks for (READ) more than `SPAWN_PAYLOAD_BYTES`.
fn large_call(record: &[u8]) -> bool {
    record.len() > SPAWN_PAYLOAD_BYTES || read_count(record).is_some_and(|n| n > SPAWN_PAYLOAD_BYTES)
}

/// Takes the next whole record out of `buf` (fragments of an unfinished record gather in
/// `partial`). `Ok(None)`: more bytes are needed; `need` says how many at least.
fn next_record(buf: &mut BytesMut, partial: &mut Vec<u8>, need: &mut usize) -> Result<Option<Bytes>, anyhow::Error> {
    loop {
        if buf.len() < 4 {
            *need = 4 - buf.len();
            return Ok(None);
        }
        let header = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let is_last = header & (1 << 31) != 0;
        let length = (header & ((1 << 31) - 1)) as usize;
        if partial.len() + length > MAX_RECORD_BYTES {
            return Err(anyhow!("RPC record of over {} bytes", MAX_RECORD_BYTES));
        }
        if buf.len() < 4 + length {
            *need = 4 + length - buf.len();
            return Ok(None);
        }
        trace!("Reading fragment length:{}, last:{}", length, is_last);
        buf.advance(4);
        let fragment = buf.split_to(length);
        if !is_last {
            partial.extend_from_slice(&fragment);
            continue;
        }
        *need = 0;
        if partial.is_empty() {
            return Ok(Some(fragment.freeze()));
        }
        partial.extend_from_slice(&fragment);
        return Ok(Some(Bytes::from(std::mem::take(partial))));
    }
}

/// Serves one connection until the peer closes it (see the fork's note above). Calls still
/// running when it closes run to the end (their replies dropped), as upstream's spawned
/// tasks did: a call is never cut off half done.
pub async fn serve_connection(mut socket: TcpStream, context: RPCContext) -> Result<(), anyhow::Error> {
    let (mut rd, wr) = socket.split();
    let mut inbuf = BytesMut::with_capacity(RECV_BYTES);
    let mut partial = Vec::new();
    let mut need = 0usize;
    // Replies ready, with their record marks, not yet written.
    let mut out: Vec<u8> = Vec::new();
    let mut calls: FuturesUnordered<Pin<Box<dyn Future<Output = CallOutcome> + Send>>> = FuturesUnordered::new();
    // tidepool fork: the retransmission check (a call whose xid is still running is dropped: the
    // first will answer) per connection. Upstream's tracker was keyed by (xid, "ip:port"), so
    // it never matched across connections either; per connection it needs no shared lock.
    let mut running: HashSet<u32> = HashSet::new();
    let mut closed = false;
    let mut failure: Option<anyhow::Error> = None;
    loop {
        if !closed {
            loop {
                let record = match next_record(&mut inbuf, &mut partial, &mut need) {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        closed = true;
                        failure = Some(e);
                        break;
                    },
                };
                let xid = match record.get(..4) {
                    Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    None => 0,
                };
                if record.len() >= 4 && !running.insert(xid) {
                    debug!("Retransmission detected, xid: {}, client_addr: {}", xid, context.client_addr);
                    continue;
                }
                let ctx = context.clone();
                if large_call(&record) {
                    let task = tokio::spawn(run_call(record, ctx));
                    calls.push(Box::pin(async move {
                        (xid, task.await.unwrap_or_else(|e| Err(anyhow!("RPC call task failed: {e}"))))
                    }));
                } else {
                    calls.push(Box::pin(async move { (xid, run_call(record, ctx).await) }));
                }
            }
        }
        if closed && calls.is_empty() {
            return failure.map_or(Ok(()), Err);
        }
        if !closed && !out.is_empty() {
            match wr.try_write(&out) {
                Ok(n) => {
                    out.drain(..n);
                },
                Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock => {},
                Err(e) => {
                    debug!("Write error {:?}", e);
                    closed = true;
                },
            }
        }
        let room = need.max(RECV_BYTES / 4);
        if !closed && inbuf.capacity() - inbuf.len() < room {
            inbuf.reserve(need.max(RECV_BYTES));
        }
        tokio::select! {
            biased;
            Some(done) = calls.next(), if !calls.is_empty() => {
                let mut done = Some(done);
                while let Some((xid, reply)) = done.take() {
                    running.remove(&xid);
                    match reply {
                        Ok(Some(reply)) if !closed => {
                            if out.is_empty() {
                                out = reply;
                            } else {
                                out.extend_from_slice(&reply);
                            }
                        },
                        Ok(_) => {},
                        Err(e) => {
                            error!("RPC Error: {:?}", e);
                            closed = true;
                            failure.get_or_insert(e);
                        },
                    }
                    // Every other reply ready now goes out in the same write.
                    done = calls.next().now_or_never().flatten();
                }
            },
            r = rd.read_buf(&mut inbuf), if !closed => match r {
                Ok(0) => closed = true,
                Ok(_) => {},
                Err(e) => {
                    debug!("Message handling closed : {:?}", e);
                    closed = true;
                },
            },
            r = wr.writable(), if !closed && !out.is_empty() => {
                if let Err(e) = r {
                    debug!("Write error {:?}", e);
                    closed = true;
                }
            },
        }
    }
}
