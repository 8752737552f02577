//! The messages and the frame codec: `[u32 LE header_len][u32 LE body_len][header][body]`.
//!
//! The header is a postcard [`Frame`]; the body is raw bytes (a protobuf Raft message, block
//! data) and is never copied more than once (socket -> one `BytesMut` -> `Bytes`).

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TransportError;

/// Largest postcard header a peer may send: larger closes the connection.
pub const MAX_HEADER_BYTES: usize = 1 << 20;
/// Largest raw body a peer may send (a block, a Raft message): larger closes the connection.
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Bytes of the length prefix in front of every frame.
pub const PREFIX_BYTES: usize = 8;

/// A request from one node to another. The variant order is part of the wire format (postcard
/// encodes the variant index): add new variants at the end only, and bump
/// [`super::PROTOCOL_VERSION`] for anything else.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Request {
    /// Answered by the transport itself with [`Response::Pong`]; the handler never sees it.
    Ping,
    /// Store a block; body = the block bytes.
    PutBlock {
        id: u64,
    },
    /// Read `len` bytes of a block from `offset`; the answer's body holds them.
    GetBlock {
        id: u64,
        offset: u32,
        len: u32,
    },
    DeleteBlocks {
        ids: Vec<u64>,
    },
    HasBlocks {
        ids: Vec<u64>,
    },
    /// Ask to join the cluster.
    Join {
        node_id: u64,
        addr: String,
    },
    Stats,
    /// Escape hatch for messages added later.
    Other {
        kind: String,
        data: Vec<u8>,
    },
}

impl Request {
    /// A short name for logs and spans.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::PutBlock { .. } => "put_block",
            Request::GetBlock { .. } => "get_block",
            Request::DeleteBlocks { .. } => "delete_blocks",
            Request::HasBlocks { .. } => "has_blocks",
            Request::Join { .. } => "join",
            Request::Stats => "stats",
            Request::Other { .. } => "other",
        }
    }
}

/// The answer to a [`Request`]. Same rule for the variant order as there.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Response {
    Ok,
    Pong {
        node_id: u64,
    },
    /// body = the bytes.
    Block,
    Has {
        present: Vec<bool>,
    },
    /// body = what the joiner needs beyond the membership, opaque here (the binary sends the
    /// cluster's node key, sealed under a key derived from the cluster secret).
    Joined {
        leader_id: u64,
        peers: Vec<(u64, String)>,
    },
    Stats {
        data: Vec<u8>,
    },
    Err {
        kind: ErrKind,
        message: String,
    },
    Other {
        data: Vec<u8>,
    },
}

/// What went wrong on the answering node, in kinds the caller can act on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ErrKind {
    NotFound,
    NoSpace,
    /// Retry on `leader_id` (0 = unknown yet).
    NotLeader {
        leader_id: u64,
    },
    Invalid,
    /// Retry later.
    Unavailable,
    Io,
}

/// The postcard header of every frame after the handshake.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Frame {
    /// One `raft::eraftpb::Message`, protobuf-encoded in the body.
    Raft,
    Request {
        id: u64,
        req: Request,
    },
    Response {
        id: u64,
        resp: Response,
    },
}

/// One frame ready to write: prefix and header encoded, body shared.
pub struct Outgoing {
    pub head: Vec<u8>,
    pub body: Bytes,
}

impl Outgoing {
    pub fn new(frame: &Frame, body: Bytes) -> Result<Outgoing, TransportError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(TransportError::TooLarge { what: "body", len: body.len(), max: MAX_BODY_BYTES });
        }
        let mut head = vec![0u8; PREFIX_BYTES];
        head = postcard::to_extend(frame, head).map_err(|e| TransportError::Decode(format!("encode frame: {e}")))?;
        let header_len = head.len() - PREFIX_BYTES;
        if header_len > MAX_HEADER_BYTES {
            return Err(TransportError::TooLarge { what: "header", len: header_len, max: MAX_HEADER_BYTES });
        }
        head[0..4].copy_from_slice(&(header_len as u32).to_le_bytes());
        head[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Ok(Outgoing { head, body })
    }

    /// Bytes this frame puts on the wire.
    pub fn wire_len(&self) -> u64 {
        (self.head.len() + self.body.len()) as u64
    }

    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.head).await?;
        if !self.body.is_empty() {
            w.write_all(&self.body).await?;
        }
        Ok(())
    }
}

/// Reads frames from one connection, reusing its header buffer.
pub struct FrameReader<R> {
    inner: R,
    header: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, header: Vec::with_capacity(256) }
    }

    /// The next frame and its body, `Ok(None)` at a clean end of stream (between frames), and
    /// the wire size of the frame. Bounds are checked before anything is allocated.
    pub async fn next(&mut self) -> Result<Option<(Frame, Bytes, u64)>, TransportError> {
        let mut prefix = [0u8; PREFIX_BYTES];
        match self.inner.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(TransportError::Io(e)),
        }
        let header_len = u32::from_le_bytes(prefix[0..4].try_into().expect("4 bytes")) as usize;
        let body_len = u32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes")) as usize;
        if header_len > MAX_HEADER_BYTES {
            return Err(TransportError::TooLarge { what: "header", len: header_len, max: MAX_HEADER_BYTES });
        }
        if body_len > MAX_BODY_BYTES {
            return Err(TransportError::TooLarge { what: "body", len: body_len, max: MAX_BODY_BYTES });
        }
        self.header.resize(header_len, 0);
        self.inner.read_exact(&mut self.header).await?;
        let frame: Frame =
            postcard::from_bytes(&self.header).map_err(|e| TransportError::Decode(format!("frame header: {e}")))?;
        let body = if body_len == 0 {
            Bytes::new()
        } else {
            let mut buf = BytesMut::with_capacity(body_len);
            while buf.len() < body_len {
                let want = (body_len - buf.len()) as u64;
                let n = (&mut self.inner).take(want).read_buf(&mut buf).await?;
                if n == 0 {
                    return Err(TransportError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
            buf.freeze()
        };
        // A header buffer grown by one huge header is not kept.
        if self.header.capacity() > 64 << 10 {
            self.header = Vec::with_capacity(256);
        }
        Ok(Some((frame, body, (PREFIX_BYTES + header_len + body_len) as u64)))
    }
}
