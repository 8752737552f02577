//! The digests of an uploaded body: MD5 (the ETag) and the additional checksum if one was
//! asked for (`x-amz-checksum-*`). A small body is hashed in the receive loop; once a body
//! passes [`OFFLOAD_AFTER`] bytes the hashing moves off it, so that MD5, the slowest step of
//! a large PUT (~45 % of the server's CPU on a 64 MiB PUT), runs beside the receive, s3s's
//! SHA-256 of a signed payload and the block writes instead of after them:
//! - MD5 goes to the process's MD5 lanes ([`crate::md5x`]): one thread hashing the blocks of
//!   up to 16 bodies at once in the lanes of a vector register, ~8x the aggregate rate of
//!   scalar MD5 per core, so 32 concurrent PUTs no longer spend most of a core on ETags. Where the
//!   CPU has no vector kernel (no AVX2, or not x86_64), MD5 goes to the body's own thread as
//!   below instead.
//! - The additional checksum, when asked for, goes to a blocking-pool thread per body fed the
//!   body's chunks (`Bytes`: shared, not copied).
//!
//! Both take the chunks through bounded queues, so the receive loop waits rather than a body
//! being buffered whole.

use std::sync::OnceLock;

use hyper::body::Bytes;
use tokio::sync::mpsc;

use crate::checksum::{Alg, Hasher};
use crate::md5x::{Kernel, Md5Lanes, Md5State, Md5Stream};

/// Bytes hashed in the receive loop before the hashing moves off it: a 4 KiB PUT never pays
/// for a hand-off.
pub(crate) const OFFLOAD_AFTER: u64 = 1 << 20;

/// Chunks queued for a body's hashing thread at most; the receive loop waits beyond that, so
/// a body is never buffered whole.
const QUEUED_CHUNKS: usize = 64;

/// The process's MD5 lanes, started at the first large body; `None` where the CPU has no
/// vector kernel (or the thread could not start).
///
/// A process-wide service, against "no globals", on purpose: it holds no configuration and no
/// data that outlives a call (results depend only on the bytes passed in), like the blocking
/// pool it replaces, and sharing it is the point (more bodies in the lanes at once). Two
/// nodes in one test process share it harmlessly. Tests of the service start their own.
fn process_lanes() -> Option<&'static Md5Lanes> {
    static LANES: OnceLock<Option<Md5Lanes>> = OnceLock::new();
    LANES
        .get_or_init(|| match Kernel::detect() {
            Kernel::Scalar => None,
            k => Md5Lanes::start(k)
                .inspect_err(|e| tracing::warn!("md5 lanes did not start, hashing scalar per body: {e}"))
                .ok(),
        })
        .as_ref()
}

/// What one pass over a body computes: MD5 (unless the lanes do it) and the additional
/// checksum if asked for.
pub(crate) struct Hashing {
    md5: Option<Md5State>,
    extra: Option<Hasher>,
}

impl Hashing {
    fn update(&mut self, data: &[u8]) {
        if let Some(h) = &mut self.md5 {
            h.update(data);
        }
        if let Some(h) = &mut self.extra {
            h.update(data);
        }
    }
}

/// The finished digests of one body.
pub(crate) struct Digests {
    md5: [u8; 16],
    extra: Option<Vec<u8>>,
}

impl Digests {
    /// The MD5 as 32 hex digits and the additional checksum's digest.
    pub(crate) fn finish(self) -> (String, Option<Vec<u8>>) {
        (crate::object::hex(&self.md5), self.extra)
    }
}

/// A body's hashing thread: fed chunks, gives back its [`Hashing`] at the end.
pub(crate) struct Thread {
    tx: mpsc::Sender<Bytes>,
    done: tokio::task::JoinHandle<Box<Hashing>>,
}

impl Thread {
    fn spawn(mut h: Box<Hashing>) -> Thread {
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
        let done = tokio::task::spawn_blocking(move || {
            while let Some(c) = rx.blocking_recv() {
                h.update(&c);
            }
            h
        });
        Thread { tx, done }
    }
}

/// Where a body's digests are being computed.
pub(crate) enum Digester {
    Inline(Box<Hashing>),
    /// Past [`OFFLOAD_AFTER`]: MD5 in the lanes (`lanes`) or, without them, on `thread`; the
    /// additional checksum on `thread`. At least one of the two is there.
    Offloaded {
        lanes: Option<Md5Stream>,
        thread: Option<Thread>,
    },
    /// Only while moving from `Inline` to `Offloaded`, or after a failed hand-over.
    Gone,
}

impl Digester {
    pub(crate) fn new(alg: Option<Alg>) -> Self {
        Digester::Inline(Box::new(Hashing { md5: Some(Md5State::new()), extra: alg.map(Alg::hasher) }))
    }

    /// Hash `chunk`; `received` is the body's size so far, this chunk included.
    pub(crate) async fn update(&mut self, chunk: &Bytes, received: u64) -> Result<(), DigestError> {
        self.update_with(chunk, received, process_lanes()).await
    }

    /// [`Self::update`] with the given lanes (`None`: MD5 on the body's thread).
    async fn update_with(&mut self, chunk: &Bytes, received: u64, lanes: Option<&Md5Lanes>) -> Result<(), DigestError> {
        if let Digester::Inline(h) = self {
            if received <= OFFLOAD_AFTER {
                h.update(chunk);
                return Ok(());
            }
            let Digester::Inline(mut h) = std::mem::replace(self, Digester::Gone) else { unreachable!() };
            let stream = match lanes {
                Some(l) => {
                    let md5 = h.md5.take().expect("inline hashing always has MD5");
                    Some(l.stream(md5).map_err(|_| DigestError)?)
                }
                None => None,
            };
            let thread = (h.md5.is_some() || h.extra.is_some()).then(|| Thread::spawn(h));
            *self = Digester::Offloaded { lanes: stream, thread };
        }
        let Digester::Offloaded { lanes, thread } = self else { return Err(DigestError) };
        if let Some(s) = lanes {
            s.update(chunk.clone()).await.map_err(|_| DigestError)?;
        }
        if let Some(t) = thread {
            t.tx.send(chunk.clone()).await.map_err(|_| DigestError)?;
        }
        Ok(())
    }

    /// The digests of everything passed to `update`.
    pub(crate) async fn finish(self) -> Result<Digests, DigestError> {
        match self {
            Digester::Inline(h) => {
                let Hashing { md5, extra } = *h;
                let md5 = md5.expect("inline hashing always has MD5").finalize();
                Ok(Digests { md5, extra: extra.map(Hasher::finalize) })
            }
            Digester::Offloaded { lanes, thread } => {
                let hashed = match thread {
                    Some(Thread { tx, done }) => {
                        drop(tx);
                        Some(done.await.map_err(|_| DigestError)?)
                    }
                    None => None,
                };
                let (md5_state, extra) = match hashed {
                    Some(h) => (h.md5, h.extra),
                    None => (None, None),
                };
                let md5 = match (lanes, md5_state) {
                    (Some(s), _) => s.finish().await.map_err(|_| DigestError)?,
                    (None, Some(m)) => m.finalize(),
                    (None, None) => return Err(DigestError),
                };
                Ok(Digests { md5, extra: extra.map(Hasher::finalize) })
            }
            Digester::Gone => Err(DigestError),
        }
    }
}

/// The hashing thread or the lanes ended before the body did (a panic, or shutdown).
#[derive(Debug)]
pub(crate) struct DigestError;

#[cfg(test)]
mod tests {
    use md5::{Digest, Md5};

    use super::*;

    async fn digests(body: &[u8], chunk: usize, alg: Option<Alg>, lanes: Option<&Md5Lanes>) -> Digester {
        let mut d = Digester::new(alg);
        let mut received = 0;
        for c in body.chunks(chunk) {
            received += c.len() as u64;
            d.update_with(&Bytes::copy_from_slice(c), received, lanes).await.unwrap();
        }
        d
    }

    /// Past `OFFLOAD_AFTER` the digests come from the lanes or the thread, and equal those
    /// of one pass; with and without lanes, with and without an additional checksum.
    #[tokio::test]
    async fn digests_equal_one_pass_across_the_hand_over() {
        let body: Vec<u8> = (0..3 * OFFLOAD_AFTER + 123).map(|i| (i * 7 + i / 4096) as u8).collect();
        let lanes = Md5Lanes::start(Kernel::detect()).unwrap();
        for with_lanes in [Some(&lanes), None] {
            for alg in [Some(Alg::Crc32c), None] {
                for chunk in [1000usize, 65536, 1 << 20] {
                    let d = digests(&body, chunk, alg, with_lanes).await;
                    let Digester::Offloaded { lanes: l, thread: t } = &d else { panic!("hashing moved off the loop") };
                    assert_eq!(l.is_some(), with_lanes.is_some());
                    assert_eq!(t.is_some(), with_lanes.is_none() || alg.is_some());
                    let (md5, extra) = d.finish().await.unwrap().finish();
                    let what = format!("chunk {chunk} lanes {} alg {alg:?}", with_lanes.is_some());
                    assert_eq!(md5, crate::object::hex(&Md5::digest(&body)), "{what}");
                    assert_eq!(extra, alg.map(|a| a.digest(&body)), "{what}");
                }
            }
        }
        let mut small = Digester::new(None);
        small.update(&Bytes::from_static(b"abc"), 3).await.unwrap();
        assert!(matches!(small, Digester::Inline(_)));
        assert_eq!(small.finish().await.unwrap().finish(), (crate::object::hex(&Md5::digest(b"abc")), None));
        assert_eq!(lanes.open_streams(), 0, "finished streams leave the lanes");
    }
}
