//! `tidepool bench ...`: measurements, not tests. Nothing here fails on a slow result; it
//! prints the figures and whether each goal was met.
//!
//! `bench device` runs fio (`--ioengine=io_uring --direct=1`) and the block store side by side
//! on one file, at the same queue depth: sequential write and read of 4 MiB blocks, and random
//! 4 KiB reads. Each side gets a freshly allocated file before its write test (so both write
//! into unwritten extents) and reads back what it wrote. With `--rounds N` the two sides
//! alternate N times and the median of each is reported (virtual disks fluctuate).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tidepool_spdk::{
    AlignedBuf, BlockDevice, BlockStore, EngineKind, OpenOptions, StoreError, StoreOptions, open_device,
};
use tokio::task::JoinSet;

use crate::datadir::anyhow_free::Result;
use crate::settings::Settings;

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Block store vs fio on one file: sequential 4 MiB write and read, random 4 KiB reads.
    Device(DeviceArgs),
}

#[derive(clap::Args, Clone)]
pub struct DeviceArgs {
    /// Scratch file (created, overwritten, deleted at the end unless --keep). Use a real disk, not tmpfs.
    #[arg(long)]
    file: PathBuf,
    /// File size, e.g. 4GiB, 512MiB (binary units; rounded down to a multiple of 4 MiB).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    size: u64,
    /// I/Os in flight, the same for fio (--iodepth) and the block store (concurrent puts/gets).
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Duration of each random-read test.
    #[arg(long, default_value_t = 15)]
    runtime_secs: u64,
    /// Alternate fio and the block store this many times; the median of each is reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Threads that drive the block store's side: 1 (the default) runs it on one thread, as
    /// fio's side is one job on one thread; N > 1 on a tokio runtime of N workers, as
    /// `tidepool up` runs (one per core).
    #[arg(long, default_value_t = 1)]
    store_threads: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Keep the file at the end.
    #[arg(long)]
    keep: bool,
    /// Overwrite the file if it already exists.
    #[arg(long)]
    force: bool,
    /// A hugetlbfs mount with free huge pages: fio also runs its sequential tests with its
    /// buffers there (`--mem=mmaphuge`), a second reference beside the plain fio command. The
    /// store's large buffers are on (transparent) huge pages, and on a virtual disk the page
    /// size of a 4 MiB I/O's buffer sets how many requests it becomes.
    #[arg(long)]
    fio_huge: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("fio not found: run bench/device.sh, which installs it")]
    FioNotFound,
    #[error("fio failed test={test} status={status}: {stderr}")]
    FioFailed { test: &'static str, status: String, stderr: String },
    #[error("cannot read fio output test={test}: {reason}")]
    FioOutput { test: &'static str, reason: String },
    #[error("file exists (pass --force to overwrite it) path={0}")]
    Exists(String),
    #[error("not a regular file path={0}")]
    NotRegular(String),
    #[error("invalid bench argument: {0}")]
    Invalid(String),
    #[error("i/o error on bench file path={path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

const BLOCK: usize = 4 << 20;
const PAGE: usize = 4096;
const GOAL: f64 = 0.90;
const MIN_SIZE: u64 = 64 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Test {
    SeqWrite,
    SeqRead,
    RandRead,
}

const TESTS: [Test; 3] = [Test::SeqWrite, Test::SeqRead, Test::RandRead];

impl Test {
    fn key(self) -> &'static str {
        match self {
            Test::SeqWrite => "seq_write_4m",
            Test::SeqRead => "seq_read_4m",
            Test::RandRead => "rand_read_4k",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Test::SeqWrite => "seq write 4 MiB",
            Test::SeqRead => "seq read 4 MiB",
            Test::RandRead => "rand read 4 KiB",
        }
    }
}

/// One run of one test on one side.
#[derive(Clone, Copy, Debug, Default)]
struct Measure {
    bytes_per_sec: f64,
    iops: f64,
    /// CPU time over wall time, in % of one core (fio: usr_cpu + sys_cpu).
    cpu_pct: f64,
}

impl Measure {
    fn json(&self) -> Value {
        json!({ "bytes_per_sec": self.bytes_per_sec.round(), "mib_per_sec": round1(mib(self.bytes_per_sec)),
                "iops": self.iops.round(), "cpu_pct": round1(self.cpu_pct) })
    }
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// What the block store side did in one round.
struct StoreRun {
    results: [Measure; 3],
    /// fio's random reads, interleaved with the store's on the store's own file (see
    /// [`rand_reads_interleaved`]), and its command.
    fio_rand_read: Measure,
    fio_rand_cmd: Vec<String>,
    /// Random 4 KiB reads straight on the `BlockDevice`, to tell engine cost from store cost.
    device_rand_read: Measure,
    blocks: u64,
    segment_bytes: u64,
    engine: EngineKind,
}

pub async fn run(_settings: Settings, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Device(args) => device(args).await,
    }
}

async fn device(args: DeviceArgs) -> Result<()> {
    let size = args.size / BLOCK as u64 * BLOCK as u64;
    if size < MIN_SIZE || args.qd == 0 || args.rounds == 0 || args.runtime_secs == 0 || args.store_threads == 0 {
        return Err(BenchError::Invalid(format!(
            "need size >= 64MiB, qd, rounds, runtime-secs, store-threads >= 1 (size={size} qd={} rounds={} runtime_secs={} store_threads={})",
            args.qd, args.rounds, args.runtime_secs, args.store_threads
        ))
        .into());
    }
    let fio_version = fio_version()?;
    check_file(&args.file, args.force)?;
    let fio_cmds: Vec<Vec<String>> =
        TESTS.iter().map(|&t| fio_args(t, &args.file, size, args.qd, args.runtime_secs)).collect();
    let huge_cmds: Vec<Vec<String>> = match &args.fio_huge {
        Some(dir) => {
            [Test::SeqWrite, Test::SeqRead].iter().map(|&t| fio_huge_args(t, &args.file, size, args.qd, dir)).collect()
        }
        None => Vec::new(),
    };
    let mut fio_runs: Vec<[Measure; 3]> = Vec::new();
    let mut huge_runs: Vec<[Measure; 2]> = Vec::new();
    let mut store_runs: Vec<StoreRun> = Vec::new();
    let result = async {
        for round in 0..args.rounds {
            // Alternate who goes first, so a drift of the disk over time hits both sides alike.
            for side in if round.is_multiple_of(2) { [0, 1] } else { [1, 0] } {
                if side == 0 {
                    fio_runs.push(fio_round(&args.file, size, &fio_cmds, round).await?);
                    if !huge_cmds.is_empty() {
                        huge_runs.push(fio_huge_round(&args.file, size, &huge_cmds, round).await?);
                    }
                } else {
                    store_runs.push(on_store_threads(&args, size, round).await?);
                }
            }
        }
        Ok::<(), crate::datadir::anyhow_free::Error>(())
    }
    .await;
    if !args.keep {
        let _ = std::fs::remove_file(&args.file);
    }
    result?;
    // fio's random reads ran inside each store round, interleaved with the store's.
    for (f, s) in fio_runs.iter_mut().zip(&store_runs) {
        f[2] = s.fio_rand_read;
    }
    let mut fio_cmds = fio_cmds;
    if let Some(s) = store_runs.last() {
        fio_cmds[2] = s.fio_rand_cmd.clone();
    }
    let mut report = report(&args, size, &fio_version, &fio_cmds, &fio_runs, &store_runs);
    if !huge_runs.is_empty() {
        report["fio_huge"] = huge_report(&huge_cmds, &huge_runs, &store_runs);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Parse `4GiB`, `512MiB`, `4G`, `4096` (binary units, as fio reads them).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size too large: {s:?}"))
}

fn check_file(path: &Path, force: bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(BenchError::NotRegular(path.display().to_string()).into()),
        Ok(_) if !force => Err(BenchError::Exists(path.display().to_string()).into()),
        _ => Ok(()),
    }
}

/// A fresh file of `size` bytes with real (unwritten) extents.
fn fresh_file(path: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let io = |source| BenchError::Io { path: path.display().to_string(), source };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e).into()),
        _ => {}
    }
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(io)?;
    let len = libc::off_t::try_from(size).map_err(|_| BenchError::Invalid(format!("size too large size={size}")))?;
    // SAFETY: plain syscall on a valid fd we own; returns an errno value, touches no memory.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(io(std::io::Error::from_raw_os_error(rc)).into());
    }
    f.sync_all().map_err(io)?;
    Ok(())
}

// ---------------------------------------------------------------- fio

fn fio_version() -> Result<String> {
    match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BenchError::FioNotFound.into()),
        _ => Err(BenchError::FioNotFound.into()),
    }
}

fn fio_args(test: Test, file: &Path, size: u64, qd: usize, runtime_secs: u64) -> Vec<String> {
    let mut a = vec![
        "fio".to_string(),
        format!("--name={}", test.key()),
        format!("--filename={}", file.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--iodepth={qd}"),
    ];
    match test {
        Test::SeqWrite => a.extend(["--bs=4m".into(), "--rw=write".into()]),
        Test::SeqRead => a.extend(["--bs=4m".into(), "--rw=read".into()]),
        Test::RandRead => a.extend([
            "--bs=4k".into(),
            "--rw=randread".into(),
            format!("--runtime={runtime_secs}"),
            "--time_based".into(),
        ]),
    }
    a.extend([format!("--size={size}"), "--output-format=json".into()]);
    a
}

/// fio's random reads over the byte range `span` of `file` (the store's data).
fn fio_rand_args(file: &Path, span: std::ops::Range<u64>, qd: usize, runtime_secs: u64) -> Vec<String> {
    let mut a = fio_args(Test::RandRead, file, span.end - span.start, qd, runtime_secs);
    a.insert(a.len() - 2, format!("--offset={}", span.start));
    a
}

/// fio's command for `test` with its buffers in a file of the hugetlbfs mount `dir`.
fn fio_huge_args(test: Test, file: &Path, size: u64, qd: usize, dir: &Path) -> Vec<String> {
    let mut a = fio_args(test, file, size, qd, 1);
    a.insert(a.len() - 1, format!("--mem=mmaphuge:{}", dir.join("tidepool-bench-fio").display()));
    a
}

fn shell_line(argv: &[String]) -> String {
    let safe = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./,:+@%".contains(c));
    argv.iter()
        .map(|a| if safe(a) { a.clone() } else { format!("'{}'", a.replace('\'', "'\\''")) })
        .collect::<Vec<_>>()
        .join(" ")
}

/// fio's sequential tests on a fresh file; its random reads run in [`store_round`].
async fn fio_round(file: &Path, size: u64, cmds: &[Vec<String>], round: usize) -> Result<[Measure; 3]> {
    fresh_file(file, size)?;
    let mut out = [Measure::default(); 3];
    for (i, &test) in [Test::SeqWrite, Test::SeqRead].iter().enumerate() {
        let argv = cmds[i].clone();
        let m = tokio::task::spawn_blocking(move || run_fio(test, &argv)).await??;
        eprintln!("round {}: fio      {:<16} {}", round + 1, test.label(), show(test, &m));
        out[i] = m;
    }
    Ok(out)
}

/// fio's sequential tests again, on a fresh file, with huge-page buffers.
async fn fio_huge_round(file: &Path, size: u64, cmds: &[Vec<String>], round: usize) -> Result<[Measure; 2]> {
    fresh_file(file, size)?;
    let mut out = [Measure::default(); 2];
    for (i, &test) in [Test::SeqWrite, Test::SeqRead].iter().enumerate() {
        let argv = cmds[i].clone();
        let m = tokio::task::spawn_blocking(move || run_fio(test, &argv)).await??;
        eprintln!("round {}: fio huge {:<16} {}", round + 1, test.label(), show(test, &m));
        out[i] = m;
    }
    Ok(out)
}

fn run_fio(test: Test, argv: &[String]) -> Result<Measure> {
    let o = Command::new(&argv[0]).args(&argv[1..]).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BenchError::FioNotFound,
        _ => BenchError::FioFailed { test: test.key(), status: "spawn".into(), stderr: e.to_string() },
    })?;
    if !o.status.success() {
        let stderr = String::from_utf8_lossy(&o.stderr).trim().to_string();
        return Err(BenchError::FioFailed { test: test.key(), status: o.status.to_string(), stderr }.into());
    }
    parse_fio(test, &String::from_utf8_lossy(&o.stdout))
}

/// Bandwidth, IOPS and CPU of the first job in fio's JSON (fio may print notes before it).
fn parse_fio(test: Test, stdout: &str) -> Result<Measure> {
    let bad = |reason: String| BenchError::FioOutput { test: test.key(), reason };
    let start = stdout.find('{').ok_or_else(|| bad("no JSON in output".into()))?;
    let v: Value = serde_json::from_str(&stdout[start..]).map_err(|e| bad(e.to_string()))?;
    let job = &v["jobs"][0];
    let dir = if test == Test::SeqWrite { "write" } else { "read" };
    let num = |x: &Value, what: &str| x.as_f64().ok_or_else(|| bad(format!("missing {what}")));
    Ok(Measure {
        bytes_per_sec: num(&job[dir]["bw_bytes"], "bw_bytes")?,
        iops: num(&job[dir]["iops"], "iops")?,
        cpu_pct: num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?,
    })
}

// ---------------------------------------------------------------- block store

/// Default store options, with segments shrunk on a small file so there are at least 8.
fn store_options(size: u64) -> StoreOptions {
    let mut o = StoreOptions::default();
    while o.segment_bytes > 16 << 20 && size.saturating_sub(1 << 20) / o.segment_bytes < 8 {
        o.segment_bytes /= 2;
    }
    o
}

/// 4 MiB blocks that fit: every segment but the one the store keeps for its cleaner, with a
/// conservative allowance for entry headers, the segment header and its summary.
fn blocks_that_fit(segments_total: u64, segment_bytes: u64) -> u64 {
    let slack = 64 << 10;
    let per_seg = (segment_bytes - slack) / (BLOCK as u64 + slack);
    segments_total.saturating_sub(1) * per_seg
}

/// CPU seconds (user + system) of this process so far.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass; no other memory is touched.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall clock and CPU at the start of a measured phase.
struct Clock(Instant, f64);

impl Clock {
    fn start() -> Self {
        Clock(Instant::now(), cpu_secs())
    }
    fn measure(&self, bytes: u64, ops: u64) -> Measure {
        let secs = self.0.elapsed().as_secs_f64();
        Measure {
            bytes_per_sec: bytes as f64 / secs,
            iops: ops as f64 / secs,
            cpu_pct: (cpu_secs() - self.1) / secs * 100.0,
        }
    }
}

/// [`store_round`] on a runtime of its own with `args.store_threads` threads (one: a
/// current-thread runtime). Everything the store starts (the engine's completion reaper, the
/// cleaner ahead) lives and ends on it.
async fn on_store_threads(args: &DeviceArgs, size: u64, round: usize) -> Result<StoreRun> {
    let threads = args.store_threads;
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .map_err(|source| BenchError::Io { path: args.file.display().to_string(), source })?;
    let args = args.clone();
    tokio::task::spawn_blocking(move || rt.block_on(store_round(&args, size, round))).await?
}

async fn store_round(args: &DeviceArgs, size: u64, round: usize) -> Result<StoreRun> {
    fresh_file(&args.file, size)?;
    let dev =
        open_device(&args.file, &OpenOptions { create_size_bytes: Some(size), queue_depth: args.qd, engine: None })?;
    let engine = dev.info().engine;
    if engine != EngineKind::Uring {
        eprintln!(
            "warning: the block store runs on the {engine} engine here (no O_DIRECT?); fio's io_uring figures are not comparable"
        );
    }
    let opts = store_options(size);
    let segment_bytes = opts.segment_bytes;
    let store = Arc::new(BlockStore::format(dev, opts).await?);
    let want = blocks_that_fit(store.stats().segments_total, segment_bytes);
    let (ids, w) = store_seq_write(&store, want, args.qd).await?;
    eprintln!(
        "round {}: tidepool {:<16} {}  ({} blocks)",
        round + 1,
        Test::SeqWrite.label(),
        show(Test::SeqWrite, &w),
        ids.len()
    );
    let r = store_seq_read(&store, &ids, args.qd).await?;
    eprintln!("round {}: tidepool {:<16} {}", round + 1, Test::SeqRead.label(), show(Test::SeqRead, &r));
    // The store's entries start after its 1 MiB superblock area; the range below holds its data
    // (all written but the few MiB at each segment's tail; unwritten extents read without I/O).
    let span = (1 << 20)..(1 << 20) + ids.len() as u64 * BLOCK as u64;
    let fio_cmd = fio_rand_args(&args.file, span.clone(), args.qd, args.runtime_secs.div_ceil(2));
    let (rr, fio_rr) = rand_reads_interleaved(&store, &ids, args, &fio_cmd, round).await?;
    let dr = device_rand_read(store.device(), span, args.qd, Duration::from_secs(args.runtime_secs)).await?;
    eprintln!(
        "round {}: device   {:<16} {}  (engine only, no store)",
        round + 1,
        Test::RandRead.label(),
        show(Test::RandRead, &dr)
    );
    Ok(StoreRun {
        results: [w, r, rr],
        fio_rand_read: fio_rr,
        fio_rand_cmd: fio_cmd,
        device_rand_read: dr,
        blocks: ids.len() as u64,
        segment_bytes,
        engine,
    })
}

/// Random 4 KiB reads of the store's data, fio and the store in turn on the same file in
/// four runs of `runtime_secs / 2` (fio, store, store, fio): this disk's speed drifts by
/// 10 % and more within a minute, and runs taken at different times compared that drift
/// rather than the two sides. fio reads the byte range the store's blocks were written to,
/// so neither side reads unwritten extents (which cost no I/O). Each side's figure is the
/// mean of its two runs.
async fn rand_reads_interleaved(
    store: &Arc<BlockStore>,
    ids: &[u64],
    args: &DeviceArgs,
    fio_cmd: &[String],
    round: usize,
) -> Result<(Measure, Measure)> {
    let slice = Duration::from_secs(args.runtime_secs.div_ceil(2));
    let (mut fio, mut ours) = (Vec::new(), Vec::new());
    for turn in 0..4 {
        if turn == 0 || turn == 3 {
            let argv = fio_cmd.to_vec();
            let m = tokio::task::spawn_blocking(move || run_fio(Test::RandRead, &argv)).await??;
            eprintln!("round {}: fio      {:<16} {}", round + 1, Test::RandRead.label(), show(Test::RandRead, &m));
            fio.push(m);
        } else {
            let m = store_rand_read(store, ids, args.qd, slice).await?;
            eprintln!("round {}: tidepool {:<16} {}", round + 1, Test::RandRead.label(), show(Test::RandRead, &m));
            ours.push(m);
        }
    }
    Ok((mean(&ours), mean(&fio)))
}

/// The mean of runs of equal length.
fn mean(runs: &[Measure]) -> Measure {
    let n = runs.len().max(1) as f64;
    Measure {
        bytes_per_sec: runs.iter().map(|m| m.bytes_per_sec).sum::<f64>() / n,
        iops: runs.iter().map(|m| m.iops).sum::<f64>() / n,
        cpu_pct: runs.iter().map(|m| m.cpu_pct).sum::<f64>() / n,
    }
}

/// The same 4 MiB of pseudo-random bytes for every block (no layer here deduplicates).
fn block_data() -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(0x0071_6465_706f_6f6c);
    let mut v = vec![0u8; BLOCK];
    rng.fill(&mut v[..]);
    v
}

/// Put `want` blocks with `qd` puts in flight (stopping early at NoSpace), then flush.
async fn store_seq_write(store: &Arc<BlockStore>, want: u64, qd: usize) -> Result<(Vec<u64>, Measure)> {
    let data = Arc::new(block_data());
    let mut set = JoinSet::new();
    let (mut next, mut full, mut ids) = (0u64, false, Vec::with_capacity(want as usize));
    let clock = Clock::start();
    loop {
        while !full && next < want && set.len() < qd {
            let (s, d, id) = (Arc::clone(store), Arc::clone(&data), next);
            set.spawn(async move { s.put(id, &d).await.map(|()| id) });
            next += 1;
        }
        match set.join_next().await {
            None => break,
            Some(r) => match r? {
                Ok(id) => ids.push(id),
                Err(StoreError::NoSpace { .. }) => full = true,
                Err(e) => return Err(e.into()),
            },
        }
    }
    store.flush().await?;
    let m = clock.measure(ids.len() as u64 * BLOCK as u64, ids.len() as u64);
    ids.sort_unstable();
    Ok((ids, m))
}

/// Get every block whole, in order, with `qd` gets in flight.
async fn store_seq_read(store: &Arc<BlockStore>, ids: &[u64], qd: usize) -> Result<Measure> {
    let mut set = JoinSet::new();
    let mut pending = ids.iter().copied();
    let clock = Clock::start();
    loop {
        while set.len() < qd {
            let Some(id) = pending.next() else { break };
            let s = Arc::clone(store);
            set.spawn(async move { s.get_bytes(id, 0, BLOCK as u32).await.map(|v| v.len()) });
        }
        match set.join_next().await {
            None => break,
            Some(r) => {
                let got = r??;
                if got != BLOCK {
                    return Err(BenchError::Invalid(format!("short block read got={got} want={BLOCK}")).into());
                }
            }
        }
    }
    Ok(clock.measure(ids.len() as u64 * BLOCK as u64, ids.len() as u64))
}

/// `qd` tasks, each reading one random 4 KiB page of a random block at a time, for `dur`.
async fn store_rand_read(store: &Arc<BlockStore>, ids: &[u64], qd: usize, dur: Duration) -> Result<Measure> {
    let ids: Arc<[u64]> = Arc::from(ids);
    let pages = (BLOCK / PAGE) as u32;
    let clock = Clock::start();
    let deadline = clock.0 + dur;
    let mut set = JoinSet::new();
    for t in 0..qd {
        let (s, ids) = (Arc::clone(store), Arc::clone(&ids));
        set.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(t as u64 + 1);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let id = ids[rng.gen_range(0..ids.len())];
                let off = rng.gen_range(0..pages) * PAGE as u32;
                s.get_bytes(id, off, PAGE as u32).await?;
                n += 1;
            }
            Ok::<u64, StoreError>(n)
        });
    }
    let mut ops = 0;
    while let Some(r) = set.join_next().await {
        ops += r??;
    }
    Ok(clock.measure(ops * PAGE as u64, ops))
}

/// `qd` tasks reading random 4 KiB pages of the device through its engine, each reusing its buffer.
async fn device_rand_read(
    dev: &Arc<dyn BlockDevice>,
    span: std::ops::Range<u64>,
    qd: usize,
    dur: Duration,
) -> Result<Measure> {
    let pages = (span.start / PAGE as u64)..(span.end.min(dev.info().size_bytes) / PAGE as u64);
    let clock = Clock::start();
    let deadline = clock.0 + dur;
    let mut set = JoinSet::new();
    for t in 0..qd {
        let (dev, pages) = (Arc::clone(dev), pages.clone());
        set.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(t as u64 + 1);
            let (mut n, mut buf) = (0u64, AlignedBuf::zeroed(PAGE));
            while Instant::now() < deadline {
                let (b, r) = dev.read(rng.gen_range(pages.clone()) * PAGE as u64, buf).await;
                r?;
                (buf, n) = (b, n + 1);
            }
            Ok::<u64, tidepool_spdk::DeviceError>(n)
        });
    }
    let mut ops = 0;
    while let Some(r) = set.join_next().await {
        ops += r??;
    }
    Ok(clock.measure(ops * PAGE as u64, ops))
}

// ---------------------------------------------------------------- report

fn show(test: Test, m: &Measure) -> String {
    match test {
        Test::RandRead => format!("{:>9.0} IOPS ({:.1} MiB/s, cpu {:.0} %)", m.iops, mib(m.bytes_per_sec), m.cpu_pct),
        _ => format!("{:>9.1} MiB/s ({:.0} IOPS, cpu {:.0} %)", mib(m.bytes_per_sec), m.iops, m.cpu_pct),
    }
}

/// Median by throughput (mean of the middle two for an even count).
fn median(runs: &[Measure]) -> Measure {
    let mut v = runs.to_vec();
    v.sort_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec));
    let n = v.len();
    if !n.is_multiple_of(2) {
        return v[n / 2];
    }
    let (a, b) = (v[n / 2 - 1], v[n / 2]);
    Measure {
        bytes_per_sec: (a.bytes_per_sec + b.bytes_per_sec) / 2.0,
        iops: (a.iops + b.iops) / 2.0,
        cpu_pct: (a.cpu_pct + b.cpu_pct) / 2.0,
    }
}

fn report(
    args: &DeviceArgs,
    size: u64,
    fio_version: &str,
    cmds: &[Vec<String>],
    fio: &[[Measure; 3]],
    store: &[StoreRun],
) -> Value {
    let tests: Vec<Value> = TESTS
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let f: Vec<Measure> = fio.iter().map(|r| r[i]).collect();
            let s: Vec<Measure> = store.iter().map(|r| r.results[i]).collect();
            let (fm, sm) = (median(&f), median(&s));
            let ratio = sm.bytes_per_sec / fm.bytes_per_sec;
            json!({
                "test": t.key(), "label": t.label(),
                "fio": fm.json(), "tidepool": sm.json(),
                "fio_rounds": f.iter().map(Measure::json).collect::<Vec<_>>(),
                "tidepool_rounds": s.iter().map(Measure::json).collect::<Vec<_>>(),
                "ratio": (ratio * 1000.0).round() / 1000.0, "goal": GOAL, "met": ratio >= GOAL,
            })
        })
        .collect();
    let last = store.last().expect("rounds >= 1 was checked");
    let dev_runs: Vec<Measure> = store.iter().map(|r| r.device_rand_read).collect();
    let fio_rr = median(&fio.iter().map(|r| r[2]).collect::<Vec<_>>());
    let dev = median(&dev_runs);
    json!({
        "file": args.file.display().to_string(), "size_bytes": size, "qd": args.qd,
        "runtime_secs": args.runtime_secs, "rounds": args.rounds, "fio_version": fio_version,
        "store_threads": args.store_threads,
        "rand_read_note": "fio and the store in turn on the store's file (fio, store, store, fio; runtime_secs/2 each), over the bytes the store wrote",
        "fio_commands": cmds.iter().map(|c| shell_line(c)).collect::<Vec<_>>(),
        "store": { "engine": last.engine.to_string(), "segment_bytes": last.segment_bytes,
                   "blocks": last.blocks, "bytes_written": last.blocks * BLOCK as u64 },
        "tests": tests,
        "device_rand_read_4k": { "note": "random 4 KiB reads on the BlockDevice engine alone (no store), same qd",
            "median": dev.json(), "rounds": dev_runs.iter().map(Measure::json).collect::<Vec<_>>(),
            "ratio_to_fio": (dev.bytes_per_sec / fio_rr.bytes_per_sec * 1000.0).round() / 1000.0 },
    })
}

/// The sequential tests against fio on huge-page buffers: medians and the store's ratio.
fn huge_report(cmds: &[Vec<String>], huge: &[[Measure; 2]], store: &[StoreRun]) -> Value {
    let tests: Vec<Value> = [Test::SeqWrite, Test::SeqRead]
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let f: Vec<Measure> = huge.iter().map(|r| r[i]).collect();
            let s: Vec<Measure> = store.iter().map(|r| r.results[i]).collect();
            let (fm, sm) = (median(&f), median(&s));
            json!({
                "test": t.key(), "label": t.label(), "fio_huge": fm.json(),
                "fio_huge_rounds": f.iter().map(Measure::json).collect::<Vec<_>>(),
                "ratio": (sm.bytes_per_sec / fm.bytes_per_sec * 1000.0).round() / 1000.0,
            })
        })
        .collect();
    json!({ "note": "fio's sequential tests with --mem=mmaphuge (huge-page buffers), a reference beside the goal's",
            "commands": cmds.iter().map(|c| shell_line(c)).collect::<Vec<_>>(), "tests": tests })
}

fn print_table(r: &Value) {
    let st = &r["store"];
    println!(
        "device bench: file={} size={:.2} GiB qd={} rounds={} (median) rand-read runtime={} s, store on {} thread(s)",
        r["file"].as_str().unwrap_or(""),
        r["size_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
        r["qd"],
        r["rounds"],
        r["runtime_secs"],
        r["store_threads"]
    );
    println!("random reads: {}", r["rand_read_note"].as_str().unwrap_or(""));
    println!(
        "block store: engine={} segment={} MiB, {} blocks of 4 MiB ({:.2} GiB) written and read",
        st["engine"].as_str().unwrap_or(""),
        st["segment_bytes"].as_u64().unwrap_or(0) >> 20,
        st["blocks"],
        st["bytes_written"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64
    );
    println!("{} commands:", r["fio_version"].as_str().unwrap_or("fio"));
    for c in r["fio_commands"].as_array().into_iter().flatten() {
        println!("  {}", c.as_str().unwrap_or(""));
    }
    println!();
    println!(
        "{:<17} {:>12} {:>10} {:>6}  {:>14} {:>10} {:>6}  {:>8}  goal",
        "test", "fio MiB/s", "IOPS", "cpu%", "tidepool MiB/s", "IOPS", "cpu%", "ratio"
    );
    for t in r["tests"].as_array().into_iter().flatten() {
        let f = |side: &str, k: &str| t[side][k].as_f64().unwrap_or(0.0);
        let ratio = t["ratio"].as_f64().unwrap_or(0.0) * 100.0;
        let met = if t["met"].as_bool().unwrap_or(false) { "met" } else { "MISSED" };
        println!(
            "{:<17} {:>12.1} {:>10.0} {:>6.0}  {:>14.1} {:>10.0} {:>6.0}  {:>6.1} %  >= {:.0} %: {met}",
            t["label"].as_str().unwrap_or(""),
            f("fio", "mib_per_sec"),
            f("fio", "iops"),
            f("fio", "cpu_pct"),
            f("tidepool", "mib_per_sec"),
            f("tidepool", "iops"),
            f("tidepool", "cpu_pct"),
            ratio,
            GOAL * 100.0
        );
    }
    let d = &r["device_rand_read_4k"];
    println!(
        "(engine alone, no store: rand read 4 KiB {:.0} IOPS, cpu {:.0} %, {:.1} % of fio)",
        d["median"]["iops"].as_f64().unwrap_or(0.0),
        d["median"]["cpu_pct"].as_f64().unwrap_or(0.0),
        d["ratio_to_fio"].as_f64().unwrap_or(0.0) * 100.0
    );
    for t in r["fio_huge"]["tests"].as_array().into_iter().flatten() {
        println!(
            "(fio on huge-page buffers: {} {:.1} MiB/s, tidepool {:.1} % of it)",
            t["label"].as_str().unwrap_or(""),
            t["fio_huge"]["mib_per_sec"].as_f64().unwrap_or(0.0),
            t["ratio"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
    }

    #[test]
    fn fio_random_reads_cover_the_store_data_only() {
        let a = fio_rand_args(Path::new("/d/f"), (1 << 20)..(1 << 20) + (8 << 20), 32, 4);
        let line = shell_line(&a);
        assert!(
            line.ends_with("--runtime=4 --time_based --offset=1048576 --size=8388608 --output-format=json"),
            "{line}"
        );
        assert!(line.contains("--rw=randread --"), "{line}");
    }

    #[test]
    fn fio_json_is_read() {
        let out = "note: something\n{\"jobs\":[{\"usr_cpu\":1.5,\"sys_cpu\":2.5,\"read\":{\"bw_bytes\":1048576,\"iops\":256.0},\"write\":{\"bw_bytes\":0,\"iops\":0}}]}";
        let m = parse_fio(Test::RandRead, out).unwrap();
        assert_eq!((m.bytes_per_sec, m.iops, m.cpu_pct), (1048576.0, 256.0, 4.0));
        assert!(parse_fio(Test::SeqWrite, "{\"jobs\":[]}").is_err());
    }

    #[test]
    fn capacity_leaves_the_cleaner_segment_and_headers() {
        // 4 GiB file: 15 segments of 256 MiB, 14 usable, 63 entries of 4 MiB + 8 KiB each.
        assert_eq!(store_options(4 << 30).segment_bytes, 256 << 20);
        assert_eq!(blocks_that_fit(15, 256 << 20), 14 * 63);
        assert_eq!(store_options(256 << 20).segment_bytes, 16 << 20);
        assert_eq!(blocks_that_fit(15, 16 << 20), 14 * 3);
    }

    #[test]
    fn median_of_even_and_odd() {
        let m = |b: f64| Measure { bytes_per_sec: b, iops: b, cpu_pct: 0.0 };
        assert_eq!(median(&[m(3.0), m(1.0), m(2.0)]).bytes_per_sec, 2.0);
        assert_eq!(median(&[m(4.0), m(1.0)]).bytes_per_sec, 2.5);
    }

    #[test]
    fn fio_command_lines() {
        let a = fio_args(Test::RandRead, Path::new("/x y/f.img"), 1 << 30, 32, 15);
        let line = shell_line(&a);
        assert!(line.starts_with("fio --name=rand_read_4k '--filename=/x y/f.img' --ioengine=io_uring --direct=1 --iodepth=32 --bs=4k --rw=randread"), "{line}");
        assert!(line.ends_with("--runtime=15 --time_based --size=1073741824 --output-format=json"), "{line}");
        let h = shell_line(&fio_huge_args(Test::SeqWrite, Path::new("/f.img"), 1 << 30, 32, Path::new("/mnt/huge")));
        assert!(
            h.contains(
                "--bs=4m --rw=write --size=1073741824 --mem=mmaphuge:/mnt/huge/tidepool-bench-fio --output-format=json"
            ),
            "{h}"
        );
    }
}
