//! Every kernel and the service against the `md-5` crate. Randomness is seeded (SplitMix64),
//! so a failure repeats.

use std::sync::Arc;

use futures_util::FutureExt;
use hyper::body::Bytes;
use md5::{Digest, Md5};

use super::service::QUEUED_BYTES;
use super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Lengths around the block and padding edges, and a few large ones.
const LENGTHS: &[usize] =
    &[0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4095, 4096, 65_537, 1 << 20, (3 << 20) + 7];

/// `data` cut at random places (runs of 0..2*mean bytes, some of them empty).
fn chunks(data: &[u8], mean: usize, rng: &mut Rng) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = rng.below(2 * mean + 1).min(data.len() - at);
        out.push(Bytes::copy_from_slice(&data[at..at + n]));
        at += n;
    }
    out
}

fn kernels() -> Vec<Kernel> {
    [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512].into_iter().filter(|k| k.available()).collect()
}

#[test]
fn state_equals_md5_for_every_length_and_chunking() {
    let mut rng = Rng(1);
    for &len in LENGTHS {
        let data = rng.bytes(len);
        let want: [u8; 16] = Md5::digest(&data).into();
        for mean in [1, 7, 64, 100, 4096] {
            let mut s = Md5State::new();
            for c in chunks(&data, mean.min(len.max(1)), &mut rng) {
                s.update(&c);
            }
            assert_eq!(s.finalize(), want, "len {len} mean chunk {mean}");
        }
    }
}

/// Each kernel against the scalar block function, lane by lane, for random masks: lanes in
/// the mask advance, the others keep their state.
#[test]
fn kernels_equal_scalar_and_keep_masked_lanes() {
    let mut rng = Rng(2);
    for kernel in kernels() {
        for round in 0..40 {
            let n = kernel.lanes();
            let blocks = 1 + rng.below(5);
            let mask = (rng.next() as u16) & (((1u32 << n) - 1) as u16);
            let data: Vec<Vec<u8>> = (0..MAX_LANES).map(|_| rng.bytes(blocks * 64)).collect();
            let mut cv = LaneState::default();
            for w in cv.w.iter_mut() {
                for v in w.iter_mut() {
                    *v = rng.next() as u32;
                }
            }
            let mut want = cv.clone();
            for lane in (0..n).filter(|i| mask & (1 << i) != 0) {
                let mut h = want.get(lane);
                md5::block_api::compress(&mut h, data[lane].as_chunks::<64>().0);
                want.set(lane, h);
            }
            let ptrs: [*const u8; MAX_LANES] = std::array::from_fn(|i| data[i].as_ptr());
            // SAFETY: every lane has blocks * 64 bytes; the kernel is available; mask < 1 << n.
            unsafe { kernel.compress(&mut cv, &ptrs, mask, blocks) };
            assert_eq!(cv.w, want.w, "{kernel:?} round {round} mask {mask:#x} blocks {blocks}");
        }
    }
}

/// One stream's chunks, submitted with random yields in between (so streams start, pause
/// and end at different times), and its expected digest.
async fn submit(lanes: Arc<Md5Lanes>, inline: usize, data: Vec<u8>, mean: usize, seed: u64) {
    let mut rng = Rng(seed);
    let want: [u8; 16] = Md5::digest(&data).into();
    for _ in 0..rng.below(20) {
        tokio::task::yield_now().await;
    }
    // Some bytes hashed before the hand-over, as `digest.rs` does.
    let mut state = Md5State::new();
    state.update(&data[..inline.min(data.len())]);
    let mut s = lanes.stream(state).unwrap();
    for c in chunks(&data[inline.min(data.len())..], mean, &mut rng) {
        s.update(c).await.unwrap();
        if rng.below(4) == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(s.finish().await.unwrap(), want, "len {} seed {seed}", data.len());
}

/// More streams than lanes, of every length, chunked at random, on a multi-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_streams_equal_md5() {
    for kernel in kernels() {
        let lanes = Arc::new(Md5Lanes::start(kernel).unwrap());
        let mut rng = Rng(3);
        let mut tasks = Vec::new();
        for (i, &len) in LENGTHS.iter().chain(LENGTHS).chain(&[200_000, 333_333, 2 << 20]).enumerate() {
            let data = rng.bytes(len);
            let mean = [1, 63, 100, 4096, 65_536][i % 5];
            let inline = [0, 1, 64, 1000][i % 4];
            tasks.push(tokio::spawn(submit(lanes.clone(), inline, data, mean, i as u64)));
        }
        assert!(tasks.len() > MAX_LANES);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(lanes.open_streams(), 0, "{kernel:?}: every stream freed");
    }
}

/// Streams dropped part-way (the client hung up), some of them waiting on a full queue, do
/// not disturb the others, and leave no record and no lane behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_do_not_disturb_others_or_leak() {
    for kernel in kernels() {
        let lanes = Arc::new(Md5Lanes::start(kernel).unwrap());
        let mut rng = Rng(4);
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let len = 1 + rng.below(3 << 20);
            let data = rng.bytes(len);
            if i % 3 == 0 {
                let lanes = lanes.clone();
                let stop_after = rng.below(len);
                tasks.push(tokio::spawn(async move {
                    let mut s = lanes.stream(Md5State::new()).unwrap();
                    for c in chunks(&data[..stop_after], 50_000, &mut Rng(i)) {
                        s.update(c).await.unwrap();
                    }
                    // Hang up: dropped with data queued or in a lane.
                }));
            } else {
                tasks.push(tokio::spawn(submit(lanes.clone(), 0, data, 30_000, i)));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Abandoned streams are freed at the service's next turn.
        for _ in 0..1000 {
            if lanes.open_streams() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(lanes.open_streams(), 0, "{kernel:?}: abandoned streams freed");
        // And the lanes still work.
        submit(lanes.clone(), 0, rng.bytes(100_000), 1000, 99).await;
    }
}

/// A stream's queue is bounded: with the service held, `update` waits once `QUEUED_BYTES`
/// are queued, and goes on when the service takes the queue.
#[tokio::test]
async fn update_waits_when_the_queue_is_full() {
    let lanes = Md5Lanes::start(Kernel::detect()).unwrap();
    lanes.hold(true);
    let data = Rng(5).bytes(3 * QUEUED_BYTES);
    let mut s = lanes.stream(Md5State::new()).unwrap();
    let half = QUEUED_BYTES / 2;
    let mut parts = data.chunks(half).map(Bytes::copy_from_slice);
    for _ in 0..2 {
        s.update(parts.next().unwrap()).now_or_never().expect("room in the queue").unwrap();
    }
    let next = parts.next().unwrap();
    assert!(s.update(next.clone()).now_or_never().is_none(), "a full queue makes update wait");
    lanes.hold(false);
    s.update(next).await.unwrap();
    for p in parts {
        s.update(p).await.unwrap();
    }
    assert_eq!(s.finish().await.unwrap(), <[u8; 16]>::from(Md5::digest(&data)));
}

/// Stopping the service fails unfinished streams instead of leaving them waiting.
#[tokio::test]
async fn stopping_fails_open_streams() {
    let lanes = Md5Lanes::start(Kernel::detect()).unwrap();
    lanes.hold(true);
    let mut s = lanes.stream(Md5State::new()).unwrap();
    s.update(Bytes::from(vec![1u8; 1000])).await.unwrap();
    let finishing = tokio::spawn(s.finish());
    tokio::task::yield_now().await;
    drop(lanes);
    assert_eq!(finishing.await.unwrap(), Err(Stopped));
}
