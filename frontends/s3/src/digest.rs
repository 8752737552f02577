//! The digests of an uploaded body: MD5 (the ETag) and the additional checksum if one was
//! asked for (`x-amz-checksum-*`). A small body is hashed in the receive loop; once a body
//! passes [`OFFLOAD_AFTER`] bytes the hashing moves to a blocking-pool thread fed the body's
//! chunks (`Bytes`: shared, not copied), so on a multi-core machine MD5, the slowest step of
//! a large PUT (~45 % of the server's CPU on a 64 MiB PUT), runs beside the receive, s3s's
//! SHA-256 of a signed payload and the block writes instead of after them.

use hyper::body::Bytes;
use md5::{Digest, Md5};
use tokio::sync::mpsc;

use crate::checksum::{Alg, Hasher};

/// Bytes hashed in the receive loop before the hashing moves to its own thread: a 4 KiB PUT
/// never pays for a thread hand-off.
pub(crate) const OFFLOAD_AFTER: u64 = 1 << 20;

/// Chunks queued for the hashing thread at most; the receive loop waits beyond that, so a
/// body is never buffered whole.
const QUEUED_CHUNKS: usize = 64;

/// MD5 and the additional checksum of one body.
pub(crate) struct Digests {
    md5: Md5,
    extra: Option<Hasher>,
}

impl Digests {
    fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        if let Some(h) = &mut self.extra {
            h.update(data);
        }
    }

    /// The MD5 as 32 hex digits and the additional checksum's digest.
    pub(crate) fn finish(self) -> (String, Option<Vec<u8>>) {
        (crate::object::hex(&self.md5.finalize()), self.extra.map(Hasher::finalize))
    }
}

/// Where a body's digests are being computed.
pub(crate) enum Digester {
    Inline(Box<Digests>),
    Thread {
        tx: mpsc::Sender<Bytes>,
        done: tokio::task::JoinHandle<Box<Digests>>,
    },
    /// Only while moving from `Inline` to `Thread`, or after a failed hand-over.
    Gone,
}

impl Digester {
    pub(crate) fn new(alg: Option<Alg>) -> Self {
        Digester::Inline(Box::new(Digests { md5: Md5::new(), extra: alg.map(Alg::hasher) }))
    }

    /// Hash `chunk`; `received` is the body's size so far, this chunk included.
    pub(crate) async fn update(&mut self, chunk: &Bytes, received: u64) -> Result<(), DigestError> {
        if let Digester::Inline(d) = self {
            if received <= OFFLOAD_AFTER {
                d.update(chunk);
                return Ok(());
            }
            let Digester::Inline(mut d) = std::mem::replace(self, Digester::Gone) else { unreachable!() };
            let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
            let done = tokio::task::spawn_blocking(move || {
                while let Some(c) = rx.blocking_recv() {
                    d.update(&c);
                }
                d
            });
            *self = Digester::Thread { tx, done };
        }
        match self {
            Digester::Thread { tx, .. } => tx.send(chunk.clone()).await.map_err(|_| DigestError),
            _ => Err(DigestError),
        }
    }

    /// The digests of everything passed to `update`.
    pub(crate) async fn finish(self) -> Result<Digests, DigestError> {
        match self {
            Digester::Inline(d) => Ok(*d),
            Digester::Thread { tx, done } => {
                drop(tx);
                done.await.map(|d| *d).map_err(|_| DigestError)
            }
            Digester::Gone => Err(DigestError),
        }
    }
}

/// The hashing thread ended before the body did (it panicked or was cancelled at shutdown).
#[derive(Debug)]
pub(crate) struct DigestError;

#[cfg(test)]
mod tests {
    use super::*;

    /// Past `OFFLOAD_AFTER` the digests come from the thread, and equal those of one pass.
    #[tokio::test]
    async fn digests_equal_one_pass_across_the_hand_over() {
        let body: Vec<u8> = (0..3 * OFFLOAD_AFTER + 123).map(|i| (i * 7 + i / 4096) as u8).collect();
        for chunk in [1000usize, 65536, 1 << 20] {
            let mut d = Digester::new(Some(Alg::Crc32c));
            let mut received = 0;
            for c in body.chunks(chunk) {
                received += c.len() as u64;
                d.update(&Bytes::copy_from_slice(c), received).await.unwrap();
            }
            assert!(matches!(d, Digester::Thread { .. }), "hashing moved to its thread");
            let (md5, extra) = d.finish().await.unwrap().finish();
            assert_eq!(md5, crate::object::hex(&Md5::digest(&body)), "chunk {chunk}");
            assert_eq!(extra, Some(Alg::Crc32c.digest(&body)), "chunk {chunk}");
        }
        let mut small = Digester::new(None);
        small.update(&Bytes::from_static(b"abc"), 3).await.unwrap();
        assert!(matches!(small, Digester::Inline(_)));
        assert_eq!(small.finish().await.unwrap().finish(), (crate::object::hex(&Md5::digest(b"abc")), None));
    }
}
