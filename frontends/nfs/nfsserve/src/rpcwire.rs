use std::io::{Cursor, Read, Write};

use anyhow::anyhow;
use tokio::io::AsyncWriteExt;
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

        if context.transaction_tracker.is_retransmission(xid, &context.client_addr) {
            // This is a retransmission
            // Drop the message and return
            debug!("Retransmission detected, xid: {}, client_addr: {}, call: {:?}", xid, context.client_addr, call);
            return Ok(false);
        }

        // tidepool fork: who calls, for the filesystem's checks (crate::vfs::caller).
        let caller = crate::vfs::Caller {
            peer: context
                .client_addr
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
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
        context.transaction_tracker.mark_processed(xid, &context.client_addr);
        res
    } else {
        error!("Unexpectedly received a Reply instead of a Call");
        Err(anyhow!("Bad RPC Call format"))
    }
}

pub async fn write_fragment<W: tokio::io::AsyncWrite + Unpin>(socket: &mut W, buf: &[u8]) -> Result<(), anyhow::Error> {
    // TODO: split into many fragments
    assert!(buf.len() < (1 << 31));
    // set the last flag
    let fragment_header = buf.len() as u32 + (1 << 31);
    let header_buf = u32::to_be_bytes(fragment_header);
    trace!("Writing fragment length:{}", buf.len());
    // tidepool fork: a small reply goes out in one write (one segment), not header then body.
    if buf.len() <= 64 << 10 {
        let mut one = Vec::with_capacity(4 + buf.len());
        one.extend_from_slice(&header_buf);
        one.extend_from_slice(buf);
        socket.write_all(&one).await?;
    } else {
        socket.write_all(&header_buf).await?;
        socket.write_all(buf).await?;
    }
    Ok(())
}

/// tidepool fork: the (last flag, length) of the record fragment at the start of `buf`, if
/// its header and all of its data are there. Record marking (RFC 5531 section 11): a record
/// is one or more fragments, each a 4-byte big-endian header (the top bit set on the last
/// fragment, the low 31 bits the data's length) and its data.
pub fn fragment_at(buf: &[u8]) -> Option<(bool, usize)> {
    let header = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?);
    let len = (header & ((1 << 31) - 1)) as usize;
    (buf.len() - 4 >= len).then_some((header & (1 << 31) != 0, len))
}

/// tidepool fork: runs one call (a whole record) in its own task, which writes the reply
/// itself; a call that fails to decode wakes `broken` (the connection closes).
pub fn spawn_call(
    record: Vec<u8>,
    context: RPCContext,
    wr: std::sync::Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    broken: std::sync::Arc<tokio::sync::Notify>,
) {
    tokio::spawn(async move {
        let mut reply: Vec<u8> = Vec::new();
        match handle_rpc(&mut Cursor::new(record), &mut Cursor::new(&mut reply), context).await {
            Err(e) => {
                error!("RPC Error: {:?}", e);
                broken.notify_one();
            },
            Ok(true) => {
                let mut w = wr.lock().await;
                if let Err(e) = write_fragment(&mut *w, &reply).await {
                    error!("Write error {:?}", e);
                }
            },
            Ok(false) => {
                // do not reply
            },
        }
    });
}
