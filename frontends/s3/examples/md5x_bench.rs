//! Aggregate MD5 throughput: scalar `md-5` (a thread per stream, as the S3 front end hashed
//! bodies before, and all streams on one thread) against the MD5 lanes (the service fed by
//! tokio tasks in 64 KiB chunks, and the bare kernel), at 1..32 concurrent streams.
//!
//!   cargo run --release -p tidepool-s3 --example md5x_bench [MiB per stream, default 64] [avx2]
//!
//! (`avx2`: the 8-lane kernel instead of the widest this CPU has.)
//!
//! "cpu" is the process's CPU seconds per GB hashed (/proc/self/stat): what a server pays.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Bytes;
use md5::{Digest, Md5};
use tidepool_s3::md5x::{Kernel, LaneState, MAX_LANES, Md5Lanes, Md5State};

const CHUNK: usize = 64 << 10;

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    if f.len() < 13 { 0.0 } else { (f[11] + f[12]) / 100.0 }
}

/// (GB/s, CPU seconds per GB) of `f` hashing `bytes` in all.
fn measure(bytes: usize, f: impl FnOnce()) -> (f64, f64) {
    let (t, c) = (Instant::now(), cpu_secs());
    f();
    let gb = bytes as f64 / 1e9;
    (gb / t.elapsed().as_secs_f64(), (cpu_secs() - c) / gb)
}

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let size = mib << 20;
    // One buffer per lane, so that lanes read different memory, as bodies do in a server.
    let bufs: Vec<Bytes> = (0..MAX_LANES)
        .map(|b| Bytes::from((0..size).map(|i| (i * 31 + i / 977 + b) as u8).collect::<Vec<u8>>()))
        .collect();
    let wants: Vec<[u8; 16]> = bufs.iter().map(|d| Md5::digest(d).into()).collect();
    let (data, want) = (&bufs[0], wants[0]);
    let kernel = match std::env::args().nth(2).as_deref() {
        Some("avx2") => Kernel::Avx2,
        _ => Kernel::detect(),
    };
    assert!(kernel.available(), "{kernel:?} is not available on this CPU");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let lanes = Arc::new(Md5Lanes::start(kernel).expect("lanes"));
    println!(
        "{} MiB per stream, kernel {kernel:?}, {} cores",
        mib,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>7} | {:>22} | {:>22} | {:>22} | {:>10}",
        "streams", "md-5, thread each", "md-5, one thread", "lanes service", "bare kernel"
    );
    println!(
        "{:>7} | {:>22} | {:>22} | {:>22} | {:>10}",
        "", "GB/s  cpu s/GB", "GB/s  cpu s/GB", "GB/s  cpu s/GB", "GB/s"
    );
    for n in [1usize, 2, 4, 8, 16, 32] {
        let total = n * size;
        let threads = measure(total, || {
            std::thread::scope(|s| {
                for _ in 0..n {
                    s.spawn(|| assert_eq!(<[u8; 16]>::from(Md5::digest(data)), want));
                }
            })
        });
        let one = measure(total, || {
            for _ in 0..n {
                assert_eq!(<[u8; 16]>::from(Md5::digest(data)), want);
            }
        });
        let service = measure(total, || {
            rt.block_on(async {
                let tasks: Vec<_> = (0..n)
                    .map(|j| {
                        let (lanes, data, want) = (lanes.clone(), bufs[j % MAX_LANES].clone(), wants[j % MAX_LANES]);
                        tokio::spawn(async move {
                            let mut s = lanes.stream(Md5State::new()).expect("stream");
                            for at in (0..data.len()).step_by(CHUNK) {
                                s.update(data.slice(at..(at + CHUNK).min(data.len()))).await.expect("update");
                            }
                            assert_eq!(s.finish().await.expect("finish"), want);
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
            })
        });
        // The kernel alone over min(n, lanes) streams at a time, for the ceiling.
        let bare = measure(total, || {
            let mut left = n;
            while left > 0 {
                let k = left.min(kernel.lanes());
                let mut cv = LaneState::default();
                let ptrs: [*const u8; MAX_LANES] = std::array::from_fn(|i| bufs[i].as_ptr());
                let mask = ((1u32 << k) - 1) as u16;
                // SAFETY: every lane reads its own `size` bytes (whole blocks); the kernel is
                // the detected one.
                unsafe { kernel.compress(&mut cv, &ptrs, mask, size / 64) };
                std::hint::black_box(&cv);
                left -= k;
            }
        });
        println!(
            "{n:>7} | {:>8.2}  {:>10.2}   | {:>8.2}  {:>10.2}   | {:>8.2}  {:>10.2}   | {:>8.2}",
            threads.0, threads.1, one.0, one.1, service.0, service.1, bare.0
        );
    }
}
