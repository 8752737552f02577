//! nfs-bench-client: drives one NFSv3 server with the `nfs3_client` library.
//!
//!   nfs-bench-client small    HOST PORT MOUNTPORT EXPORT DIR FILES SIZE CONNS
//!   nfs-bench-client randread HOST PORT MOUNTPORT EXPORT FILE SECS BLOCK CONNS
//!   nfs-bench-client rm       HOST PORT MOUNTPORT EXPORT FILE
//!
//! `small` makes folder DIR at the export's top, then FILES files of SIZE bytes in it, each
//! CREATE (GUARDED, 0644) + one WRITE FILE_SYNC (what a Linux client sends for a small file at
//! close), spread over CONNS connections. `randread` reads BLOCK bytes at random aligned
//! offsets of FILE (a path below the export) for SECS seconds on CONNS connections. Each prints
//! one line of `key=value` (rate, and latency percentiles in ms).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nfs3_client::nfs3_types::mount::dirpath;
use nfs3_client::nfs3_types::nfs3::*;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioIo;
use nfs3_client::{MountClient, Nfs3Client};
use tokio::net::TcpStream;

type Client = Nfs3Client<TokioIo<TcpStream>>;

fn cred() -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix { stamp: 1, machinename: Opaque::owned(b"bench".to_vec()), uid: 0, gid: 0, gids: vec![0] })
}

async fn tcp(addr: SocketAddr) -> TokioIo<TcpStream> {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    TokioIo::new(s)
}

async fn mount(host: &str, mport: u16, export: &str) -> nfs_fh3 {
    let addr: SocketAddr = format!("{host}:{mport}").parse().unwrap();
    let mut m = MountClient::new_with_auth(tcp(addr).await, cred(), opaque_auth::default());
    let ok = m.mnt(dirpath(Opaque::owned(export.as_bytes().to_vec()))).await.expect("MOUNT");
    nfs_fh3 { data: Opaque::owned(ok.fhandle.0.to_vec()) }
}

async fn client(host: &str, port: u16) -> Client {
    let addr: SocketAddr = format!("{host}:{port}").parse().unwrap();
    Nfs3Client::new_with_auth(tcp(addr).await, cred(), opaque_auth::default())
}

fn name(s: &str) -> filename3<'static> {
    filename3(Opaque::owned(s.as_bytes().to_vec()))
}

async fn lookup_path(c: &mut Client, mut fh: nfs_fh3, path: &str) -> nfs_fh3 {
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let args = LOOKUP3args { what: diropargs3 { dir: fh.clone(), name: name(part) } };
        fh = c.lookup(&args).await.expect("LOOKUP rpc").unwrap().object;
    }
    fh
}

fn pct(lat: &mut [f64], p: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat[((lat.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: small HOST PORT MOUNTPORT EXPORT DIR FILES SIZE CONNS | randread HOST PORT MOUNTPORT EXPORT FILE SECS BLOCK CONNS | rm HOST PORT MOUNTPORT EXPORT FILE";
    if a.len() != 10 && !(a.len() == 7 && a[1] == "rm") {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let (host, port, mport, export) = (a[2].clone(), a[3].parse::<u16>().unwrap(), a[4].parse::<u16>().unwrap(), a[5].clone());
    if a[1] == "rm" {
        let root = mount(&host, mport, &export).await;
        let mut c = client(&host, port).await;
        let (dir, file) = a[6].rsplit_once('/').unwrap_or(("", &a[6]));
        let dir_fh = lookup_path(&mut c, root, dir).await;
        let r = c.remove(&REMOVE3args { object: diropargs3 { dir: dir_fh, name: name(file) } }).await.expect("REMOVE rpc");
        if let Nfs3Result::Err((st, _)) = r {
            panic!("REMOVE {}: {st:?}", a[6]);
        }
        return;
    }
    let n: [u64; 3] = [a[7].parse().unwrap(), a[8].parse().unwrap(), a[9].parse().unwrap()];
    let root = mount(&host, mport, &export).await;
    match a[1].as_str() {
        "small" => small(&host, port, root, &a[6], n[0], n[1] as usize, n[2] as usize).await,
        "randread" => randread(&host, port, root, &a[6], n[0], n[1] as u32, n[2] as usize).await,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}

async fn small(host: &str, port: u16, root: nfs_fh3, dir: &str, files: u64, size: usize, conns: usize) {
    let mut c = client(host, port).await;
    let args = MKDIR3args { where_: diropargs3 { dir: root.clone(), name: name(dir) }, attributes: sattr3 { mode: Nfs3Option::Some(0o755), ..Default::default() } };
    let dir_fh = match c.mkdir(&args).await.expect("MKDIR rpc") {
        Nfs3Result::Ok(ok) => match ok.obj {
            Nfs3Option::Some(fh) => fh,
            Nfs3Option::None => lookup_path(&mut c, root.clone(), dir).await,
        },
        Nfs3Result::Err((st, _)) => panic!("MKDIR {dir}: {st:?}"),
    };
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conns {
        let (host, dir_fh) = (host.to_string(), dir_fh.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(&host, port).await;
            let body = vec![b'x'; size];
            let mut lat = Vec::new();
            let mut i = w as u64;
            while i < files {
                let t = Instant::now();
                let how = createhow3::GUARDED(sattr3 { mode: Nfs3Option::Some(0o644), ..Default::default() });
                let args = CREATE3args { where_: diropargs3 { dir: dir_fh.clone(), name: name(&format!("f{i:06}")) }, how };
                let fh = match c.create(&args).await.expect("CREATE rpc") {
                    Nfs3Result::Ok(ok) => match ok.obj {
                        Nfs3Option::Some(fh) => fh,
                        Nfs3Option::None => panic!("CREATE gave no handle"),
                    },
                    Nfs3Result::Err((st, _)) => panic!("CREATE f{i}: {st:?}"),
                };
                if size > 0 {
                    let w = WRITE3args { file: fh, offset: 0, count: size as u32, stable: stable_how::FILE_SYNC, data: Opaque::borrowed(&body) };
                    match c.write(&w).await.expect("WRITE rpc") {
                        Nfs3Result::Ok(_) => {}
                        Nfs3Result::Err((st, _)) => panic!("WRITE f{i}: {st:?}"),
                    }
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += conns as u64;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "op=small files={files} size={size} conns={conns} secs={secs:.2} files_per_sec={:.0} p50_ms={:.2} p99_ms={:.2}",
        files as f64 / secs,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
}

async fn randread(host: &str, port: u16, root: nfs_fh3, file: &str, secs: u64, block: u32, conns: usize) {
    let mut c = client(host, port).await;
    let fh = lookup_path(&mut c, root, file).await;
    let size = c.getattr(&GETATTR3args { object: fh.clone() }).await.expect("GETATTR rpc").unwrap().obj_attributes.size;
    let blocks = size / block as u64;
    assert!(blocks > 0, "{file} is smaller than one block");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conns {
        let (host, fh) = (host.to_string(), fh.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(&host, port).await;
            let mut rng = fastrand::Rng::with_seed(w as u64 + 1);
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let off = rng.u64(0..blocks) * block as u64;
                let t = Instant::now();
                let ok = c.read(&READ3args { file: fh.clone(), offset: off, count: block }).await.expect("READ rpc").unwrap();
                assert_eq!(ok.count, block, "short read at {off}");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let n = lat.len() as f64;
    println!(
        "op=randread block={block} conns={conns} reads={} secs={secs:.2} iops={:.0} mib_per_sec={:.1} p50_ms={:.3} p99_ms={:.3}",
        lat.len(),
        n / secs,
        n * block as f64 / secs / (1 << 20) as f64,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
}
