//! `tidepool workload`: a deterministic stream of filesystem mutations through the fs API,
//! printing `begin <n> <op>` before and `ack <n>` after each (or `fail <n> <errno>`), so a
//! crash test can kill the process anywhere and know exactly which writes were acknowledged.
//!
//! Ops: `create P`, `write P OFF LEN SEED`, `truncate P SIZE`, `unlink P`, `rename P Q`.
//! Each is one fs call, i.e. one metadata commit, so it is applied whole or not at all.
//! Written bytes are `pattern(SEED, LEN)` (xorshift64*), which the checker regenerates.

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tidepool_fs::{Fs, SetAttr};

use crate::datadir::anyhow_free::Result;
use crate::node::Node;
use crate::settings::Settings;

#[derive(clap::Args)]
pub struct Args {
    /// Seed of the op stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many ops.
    #[arg(long, default_value_t = 1000)]
    ops: u64,
    /// Size of the path set the ops pick from.
    #[arg(long, default_value_t = 24)]
    files: u64,
}

/// The bytes a `write ... LEN SEED` op writes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15 | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

const MAX_FILE: u64 = 6 << 20;

pub async fn run(settings: Settings, args: Args) -> Result<()> {
    let node = Node::open(settings).await?;
    let fs = node.fs.clone();
    let dirs: Vec<u64> = make_dirs(&fs).await?;
    // ino and size of the paths that exist now.
    let mut live: HashMap<u64, (u64, u64)> = HashMap::new();
    for i in 0..args.files {
        if let Ok(a) = fs.lookup(dirs[(i % 4) as usize], name(i).as_bytes()) {
            live.insert(i, (a.ino, a.size));
        }
    }
    println!("ready");
    let mut rng = SmallRng::seed_from_u64(args.seed);
    for n in 0..args.ops {
        let i = rng.gen_range(0..args.files);
        let (dir, nm) = (dirs[(i % 4) as usize], name(i));
        let Some(&(ino, size)) = live.get(&i) else {
            println!("begin {n} create {}", path(i));
            match fs.create(dir, nm.as_bytes(), 0o644, 0, 0).await {
                Ok(a) => ack(n, || {
                    live.insert(i, (a.ino, 0));
                }),
                Err(e) => println!("fail {n} {}", e.errno()),
            }
            continue;
        };
        match rng.gen_range(0..100) {
            0..=64 => {
                let off = rng.gen_range(0..=size.min(4 << 20));
                let len = match rng.gen_range(0..100) {
                    0..=69 => rng.gen_range(1..=64 << 10),
                    70..=94 => rng.gen_range(1..=1 << 20),
                    _ => rng.gen_range(1..=MAX_FILE - off),
                }
                .min(MAX_FILE - off);
                let seed: u64 = rng.r#gen();
                println!("begin {n} write {} {off} {len} {seed}", path(i));
                match fs.write(ino, off, &pattern(seed, len as usize)).await {
                    Ok(a) => ack(n, || {
                        live.insert(i, (ino, a.size));
                    }),
                    Err(e) => println!("fail {n} {}", e.errno()),
                }
            }
            65..=76 => {
                let to = rng.gen_range(0..=size + (64 << 10)).min(MAX_FILE);
                println!("begin {n} truncate {} {to}", path(i));
                match fs.setattr(ino, SetAttr { size: Some(to), ..Default::default() }).await {
                    Ok(_) => ack(n, || {
                        live.insert(i, (ino, to));
                    }),
                    Err(e) => println!("fail {n} {}", e.errno()),
                }
            }
            77..=86 => {
                println!("begin {n} unlink {}", path(i));
                match fs.unlink(dir, nm.as_bytes()).await {
                    Ok(()) => ack(n, || {
                        live.remove(&i);
                    }),
                    Err(e) => println!("fail {n} {}", e.errno()),
                }
            }
            _ => {
                let j = rng.gen_range(0..args.files);
                if j == i {
                    continue;
                }
                println!("begin {n} rename {} {}", path(i), path(j));
                match fs.rename(dir, nm.as_bytes(), dirs[(j % 4) as usize], name(j).as_bytes()).await {
                    Ok(()) => ack(n, || {
                        live.remove(&i);
                        live.insert(j, (ino, size));
                    }),
                    Err(e) => println!("fail {n} {}", e.errno()),
                }
            }
        }
    }
    println!("done");
    node.shutdown().await
}

fn ack(n: u64, then: impl FnOnce()) {
    then();
    println!("ack {n}");
}

fn name(i: u64) -> String {
    format!("f{i}")
}

fn path(i: u64) -> String {
    format!("/w/d{}/f{i}", i % 4)
}

async fn make_dirs(fs: &Fs) -> Result<Vec<u64>> {
    let mut v = Vec::new();
    for d in 0..4 {
        v.push(fs.mkdir_all(format!("/w/d{d}").as_bytes(), 0o755).await?.ino);
    }
    Ok(v)
}
