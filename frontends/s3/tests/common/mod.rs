//! A real `Fs` on the in-memory device (Raft log in a temp folder), and the S3 service on a
//! free loopback port over it.

#![allow(dead_code)]

use std::sync::Arc;

use tidepool_cluster::{MetaGroup, MetaState, RaftOptions, SystemClock};
use tidepool_fs::{Fs, FsOptions};
use tidepool_s3::{S3Metrics, S3Options, StaticKeys, TidepoolS3};
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::{BlockDevice, BlockStore, StoreOptions};

pub const ACCESS_KEY: &str = "TPTESTACCESSKEY";
pub const SECRET_KEY: &str = "tp-test-secret-key-0123456789";

pub struct Env {
    pub _dir: tempfile::TempDir,
    pub fs: Arc<Fs>,
}

/// Blocks of 64 KiB so that small test bodies span several blocks.
pub async fn fs_env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let block = 64 << 10;
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
    let opts = StoreOptions { segment_bytes: 4 << 20, max_block_bytes: block, crc_cache_bytes: 1 << 20 };
    let store = Arc::new(BlockStore::format(dev, opts).await.unwrap());
    let meta = MetaGroup::open(&dir.path().join("meta"), RaftOptions::default(), MetaState::new()).unwrap();
    let (fs, _) = Fs::open(
        meta,
        store,
        Arc::new(SystemClock),
        FsOptions { block_size: block, id_batch: 4096, ..FsOptions::default() },
    )
    .await
    .unwrap();
    Env { _dir: dir, fs: Arc::new(fs) }
}

pub struct Server {
    pub env: Env,
    pub port: u16,
    pub metrics: Arc<S3Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

pub async fn start() -> Server {
    let env = fs_env().await;
    let metrics = Arc::new(S3Metrics::default());
    let s3 = TidepoolS3::new(env.fs.clone(), S3Options::default(), metrics.clone()).await.unwrap();
    let service = tidepool_s3::build_service(s3, Arc::new(StaticKeys::single(ACCESS_KEY, SECRET_KEY)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let m = metrics.clone();
    let task = tokio::spawn(async move {
        tidepool_s3::serve(listener, service, m, async {
            let _ = rx.await;
        })
        .await
    });
    Server { env, port, metrics, stop: Some(tx), task: Some(task) }
}

/// The Python interpreter for client scripts (`$PYTHON`, else `python3`).
#[allow(dead_code)] // not every test binary that includes this module runs scripts
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `tests/<script>` (a boto3 script) against `endpoint` with the test key, and asserts it
/// exited 0 and printed "all checks passed".
#[allow(dead_code)]
pub async fn run_boto3_script(script: &str, endpoint: String) {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(path)
            .args([&endpoint, ACCESS_KEY, SECRET_KEY])
            .env_remove("AWS_PROFILE")
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run {} (python3 with boto3 is needed; ./test.sh installs it): {e}", python()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "{script}: boto3 checks failed (is boto3 installed? ./test.sh installs it)\n{stdout}\n{stderr}"
    );
}
