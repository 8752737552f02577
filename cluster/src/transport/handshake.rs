//! The mutual challenge-response handshake (HMAC-SHA256 keyed by the cluster secret) that opens
//! every connection. See the module doc of [`super`] for the byte layout.

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{MAGIC, PROTOCOL_VERSION, TransportError};

/// Largest handshake message: anything bigger is not a tidepool peer.
const MAX_HANDSHAKE_BYTES: usize = 4096;

/// What a connection carries: Raft messages only, or requests and answers.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Control,
    Data,
}

/// The handshake messages. The variant order is part of the wire format and must stay stable
/// across versions (a node of another version must still be able to read `Refused`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Handshake {
    Hello { cluster_id: String, node_id: u64, nonce: [u8; 32], channel: Channel },
    Challenge { node_id: u64, nonce: [u8; 32], mac: [u8; 32] },
    Proof { mac: [u8; 32] },
    Accepted,
    Refused { reason: String },
}

/// A handshake that failed: either side's reason, said to the peer before closing.
#[derive(Debug)]
pub enum HandshakeError {
    /// This side refused the peer (or the peer refused us and said why).
    Refused(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl HandshakeError {
    pub fn into_transport(self, addr: &str) -> TransportError {
        match self {
            HandshakeError::Refused(reason) => TransportError::Refused { addr: addr.to_string(), reason },
            HandshakeError::Io(e) => TransportError::Connect { addr: addr.to_string(), source: e },
        }
    }
}

/// The secret material of one side.
pub struct Keys<'a> {
    pub secret: &'a [u8],
    pub cluster_id: &'a str,
    pub node_id: u64,
}

fn mac(secret: &[u8], label: &[u8], nonce_c: &[u8; 32], nonce_s: &[u8; 32], cluster_id: &str, id: u64) -> Hmac<Sha256> {
    // Invariant: HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("hmac accepts any key length");
    m.update(label);
    m.update(nonce_c);
    m.update(nonce_s);
    m.update(&(cluster_id.len() as u32).to_le_bytes());
    m.update(cluster_id.as_bytes());
    m.update(&id.to_le_bytes());
    m
}

fn tag(m: Hmac<Sha256>) -> [u8; 32] {
    m.finalize().into_bytes().into()
}

fn nonce() -> [u8; 32] {
    // Nonces come from the OS-seeded CSPRNG on purpose: a predictable (injected, seeded) nonce
    // would let a recorded handshake be replayed.
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

async fn write_msg(s: &mut TcpStream, msg: &Handshake) -> std::io::Result<()> {
    let body = postcard::to_allocvec(msg).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf).await
}

async fn read_msg(s: &mut TcpStream) -> Result<Handshake, HandshakeError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HANDSHAKE_BYTES {
        return Err(HandshakeError::Refused(format!("handshake message too large len={len}")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    postcard::from_bytes(&buf).map_err(|e| HandshakeError::Refused(format!("bad handshake message: {e}")))
}

/// Says why, best effort, then gives the reason back as the error.
async fn refuse(s: &mut TcpStream, reason: String) -> HandshakeError {
    let _ = write_msg(s, &Handshake::Refused { reason: reason.clone() }).await;
    let _ = s.shutdown().await;
    HandshakeError::Refused(reason)
}

/// The connecting side. `expect` is the node id the address book has for this address, if any.
/// Returns the server's node id.
pub async fn client(
    s: &mut TcpStream,
    keys: &Keys<'_>,
    channel: Channel,
    expect: Option<u64>,
) -> Result<u64, HandshakeError> {
    let mut opening = Vec::with_capacity(6);
    opening.extend_from_slice(MAGIC);
    opening.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    s.write_all(&opening).await?;
    let nonce_c = nonce();
    write_msg(
        s,
        &Handshake::Hello { cluster_id: keys.cluster_id.to_string(), node_id: keys.node_id, nonce: nonce_c, channel },
    )
    .await?;
    let (server_id, nonce_s, mac_s) = match read_msg(s).await? {
        Handshake::Challenge { node_id, nonce, mac } => (node_id, nonce, mac),
        Handshake::Refused { reason } => return Err(HandshakeError::Refused(reason)),
        other => return Err(refuse(s, format!("unexpected handshake message {other:?}")).await),
    };
    let check = mac(keys.secret, b"tidepool server", &nonce_c, &nonce_s, keys.cluster_id, server_id);
    if check.verify_slice(&mac_s).is_err() {
        return Err(refuse(s, "wrong cluster secret".to_string()).await);
    }
    if let Some(want) = expect
        && want != server_id
    {
        return Err(refuse(s, format!("unexpected node id: expected={want} got={server_id}")).await);
    }
    let mac_c = tag(mac(keys.secret, b"tidepool client", &nonce_c, &nonce_s, keys.cluster_id, keys.node_id));
    write_msg(s, &Handshake::Proof { mac: mac_c }).await?;
    match read_msg(s).await? {
        Handshake::Accepted => Ok(server_id),
        Handshake::Refused { reason } => Err(HandshakeError::Refused(reason)),
        other => Err(refuse(s, format!("unexpected handshake message {other:?}")).await),
    }
}

/// The accepting side. Returns the authenticated client's node id and channel.
pub async fn server(s: &mut TcpStream, keys: &Keys<'_>) -> Result<(u64, Channel), HandshakeError> {
    let mut opening = [0u8; 6];
    s.read_exact(&mut opening).await?;
    if &opening[0..4] != MAGIC {
        // Not a tidepool peer: it would not understand a Refused message either.
        let _ = s.shutdown().await;
        return Err(HandshakeError::Refused("bad magic (not a tidepool peer)".to_string()));
    }
    let version = u16::from_le_bytes([opening[4], opening[5]]);
    if version != PROTOCOL_VERSION {
        return Err(refuse(s, format!("unsupported version: peer={version} ours={PROTOCOL_VERSION}")).await);
    }
    let (cluster_id, client_id, nonce_c, channel) = match read_msg(s).await? {
        Handshake::Hello { cluster_id, node_id, nonce, channel } => (cluster_id, node_id, nonce, channel),
        other => return Err(refuse(s, format!("expected hello, got {other:?}")).await),
    };
    if cluster_id != keys.cluster_id {
        return Err(refuse(s, format!("other cluster id: peer={cluster_id:?} ours={:?}", keys.cluster_id)).await);
    }
    let nonce_s = nonce();
    let mac_s = tag(mac(keys.secret, b"tidepool server", &nonce_c, &nonce_s, keys.cluster_id, keys.node_id));
    write_msg(s, &Handshake::Challenge { node_id: keys.node_id, nonce: nonce_s, mac: mac_s }).await?;
    let mac_c = match read_msg(s).await? {
        Handshake::Proof { mac } => mac,
        // The client found our proof wrong (or us unexpected) and said why.
        Handshake::Refused { reason } => return Err(HandshakeError::Refused(format!("client refused us: {reason}"))),
        other => return Err(refuse(s, format!("expected proof, got {other:?}")).await),
    };
    // `verify_slice` compares in constant time.
    let check = mac(keys.secret, b"tidepool client", &nonce_c, &nonce_s, keys.cluster_id, client_id);
    if check.verify_slice(&mac_c).is_err() {
        return Err(refuse(s, "wrong cluster secret".to_string()).await);
    }
    write_msg(s, &Handshake::Accepted).await?;
    Ok((client_id, channel))
}
