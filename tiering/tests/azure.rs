//! `AzureStore` against a real Azurite blob service, started by each test on a free loopback
//! port and killed at its end. `./test.sh` installs Azurite (npm) into `.peers/azurite/`;
//! without it these tests fail, saying so.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::http::{ClientOptions, Transport};
use azure_storage_blob::models::BlockListType;
use azure_storage_blob::{BlockBlobClient, BlockBlobClientOptions};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tidepool_tiering::store::azure::{AzureConfig, AzureCredential, AzureStore};
use tidepool_tiering::{ObjectError, ObjectStore, PutIfAbsent};

use common::conformance::{self, pattern};

/// Azurite's development account and its key, public in Azurite's documentation.
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Another valid base64 key of the same length, which Azurite does not know.
const WRONG_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// A running Azurite blob service; killed (and its data folder removed) on drop.
struct Azurite {
    child: Child,
    port: u16,
    data: tempfile::TempDir,
}

impl Azurite {
    fn start() -> Azurite {
        let bin = azurite_bin();
        let data = tempfile::tempdir().expect("create a temp folder for azurite");
        // Invariant: binding port 0 on loopback gives a free port; Azurite takes it next.
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free loopback port").port();
        let log = std::fs::File::create(data.path().join("azurite.log")).expect("create azurite log");
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
            .arg(data.path().join("store"))
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start azurite: {e} bin={}", bin.display()));
        let mut azurite = Azurite { child, port, data };
        azurite.wait_ready();
        azurite
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("azurite exited before listening: {status} log={}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "azurite did not listen within 60 s port={} log={}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.data.path().join("azurite.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Blocks of 4 MiB above 6 MiB, so the suite's 12 MiB object goes up as staged blocks.
    fn config(&self, container: &str, credential: AzureCredential) -> AzureConfig {
        AzureConfig {
            prefix: "tp".into(),
            endpoint: Some(self.endpoint()),
            block_size_bytes: 4 << 20,
            single_put_max_bytes: 6 << 20,
            ..AzureConfig::new(ACCOUNT, container, credential)
        }
    }

    /// A store on a fresh container (created with the account key).
    async fn store(&self, container: &str, credential: AzureCredential) -> AzureStore {
        let admin = AzureStore::new(self.config(container, AzureCredential::SharedKey(ACCOUNT_KEY.into())))
            .expect("admin store config");
        admin.create_container().await.expect("create container");
        AzureStore::new(self.config(container, credential)).expect("store config")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `TIDEPOOL_AZURITE_BIN` (test.sh sets it), else `<repo>/.peers/azurite/node_modules/.bin/azurite-blob`.
fn azurite_bin() -> PathBuf {
    let bin = match std::env::var_os("TIDEPOOL_AZURITE_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.peers/azurite/node_modules/.bin/azurite-blob"),
    };
    assert!(
        bin.exists(),
        "azurite is not installed: run ./test.sh (it installs azurite with npm into .peers/azurite) or set \
         TIDEPOOL_AZURITE_BIN bin={}",
        bin.display()
    );
    bin
}

/// An account SAS (blob service; service, container and object resources; read, write,
/// delete, list, add, create) signed with `key`, as the Azure documentation builds one.
fn account_sas(key_b64: &str) -> String {
    let (permissions, services, resource_types, expiry, protocol, version) =
        ("rwdlac", "b", "sco", "2099-01-01T00:00:00Z", "https,http", "2021-08-06");
    // Version 2020-12-06 on: the encryption scope (empty) is signed too, and a final newline.
    let to_sign =
        format!("{ACCOUNT}\n{permissions}\n{services}\n{resource_types}\n\n{expiry}\n\n{protocol}\n{version}\n\n");
    let key = azure_core::base64::decode(key_b64).expect("test keys are base64");
    // Invariant: HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("hmac accepts any key length");
    mac.update(to_sign.as_bytes());
    let signature = azure_core::base64::encode(mac.finalize().into_bytes());
    format!(
        "sv={version}&ss={services}&srt={resource_types}&sp={permissions}&se={}&spr={}&sig={}",
        encode(expiry),
        encode(protocol),
        encode(&signature)
    )
}

/// Client options for an SDK client of the test's own over plain http. The SDK's default
/// transport needs a process-wide rustls provider; give it a client with ring instead.
fn plain_http_options() -> BlockBlobClientOptions {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default tls versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let http = reqwest::Client::builder().tls_backend_preconfigured(tls).build().expect("http client");
    let client_options = ClientOptions { transport: Some(Transport::new(Arc::new(http))), ..ClientOptions::default() };
    BlockBlobClientOptions { client_options, ..BlockBlobClientOptions::default() }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_a_sas() {
    let azurite = Azurite::start();
    let store = azurite.store("sas", AzureCredential::Sas(account_sas(ACCOUNT_KEY))).await;
    conformance::run(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_the_shared_key() {
    let azurite = Azurite::start();
    let store = azurite.store("sharedkey", AzureCredential::SharedKey(ACCOUNT_KEY.into())).await;
    conformance::run(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_put_goes_up_as_staged_blocks() {
    let azurite = Azurite::start();
    let sas = account_sas(ACCOUNT_KEY);
    let config = AzureConfig {
        block_size_bytes: 64 << 10,
        block_parallelism: 3,
        single_put_max_bytes: 100 << 10,
        ..azurite.config("big", AzureCredential::Sas(sas.clone()))
    };
    azurite.store("big", AzureCredential::Sas(sas.clone())).await;
    let store = AzureStore::new(config).expect("store config");
    let body = pattern((1 << 20) + 123, 7);

    store.put("chunks/ab/big", body.clone()).await.expect("staged put");
    assert_eq!(store.get("chunks/ab/big", None).await.expect("get whole"), body);
    let across = (64 << 10) - 10..(3 * (64 << 10)) + 10;
    let part = store.get("chunks/ab/big", Some(across.clone())).await.expect("ranged get across blocks");
    assert_eq!(part, body.slice(across.start as usize..across.end as usize));
    let info = store.head("chunks/ab/big").await.expect("head").expect("object exists");
    assert_eq!(info.size_bytes, body.len() as u64);

    // The blob really is 17 committed blocks of at most 64 KiB (16 full and one of 123 bytes).
    let url = format!("{}/big/tp/chunks/ab/big?{sas}", azurite.endpoint());
    let blocks = BlockBlobClient::new(url.parse().expect("blob url"), None, Some(plain_http_options()))
        .expect("block blob client");
    let list = blocks.get_block_list(BlockListType::Committed, None).await.expect("get block list");
    let list = list.into_model().expect("block list");
    let committed = list.committed_blocks.unwrap_or_default();
    assert_eq!(committed.len(), 17);
    assert!(committed.iter().all(|b| b.size.is_some_and(|s| s <= 64 << 10)));

    // A conditional staged put: created once, then left alone.
    let other = pattern((300 << 10) + 1, 9);
    assert_eq!(store.put_if_absent("manifests/LATEST", other.clone()).await.expect("first"), PutIfAbsent::Created);
    assert_eq!(store.put_if_absent("manifests/LATEST", body.clone()).await.expect("second"), PutIfAbsent::Exists);
    assert_eq!(store.get("manifests/LATEST", None).await.expect("get"), other);

    // An overwrite by a staged put replaces the whole object.
    let shorter = pattern((200 << 10) + 5, 11);
    store.put("chunks/ab/big", shorter.clone()).await.expect("staged overwrite");
    assert_eq!(store.get("chunks/ab/big", None).await.expect("get after overwrite"), shorter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_auth() {
    let azurite = Azurite::start();
    azurite.store("auth", AzureCredential::SharedKey(ACCOUNT_KEY.into())).await;
    let wrong_key =
        AzureStore::new(azurite.config("auth", AzureCredential::SharedKey(WRONG_KEY.into()))).expect("store config");
    let wrong_sas =
        AzureStore::new(azurite.config("auth", AzureCredential::Sas(account_sas(WRONG_KEY)))).expect("store config");
    for store in [wrong_key, wrong_sas] {
        let err = store.put("k", Bytes::from_static(b"x")).await.expect_err("put with a wrong credential");
        assert!(matches!(err, ObjectError::Auth(_)), "put: {err:?}");
        assert!(!err.is_retryable());
        let err = store.get("k", None).await.expect_err("get with a wrong credential");
        assert!(matches!(err, ObjectError::Auth(_)), "get: {err:?}");
        let err = store.list("", None, 10).await.expect_err("list with a wrong credential");
        assert!(matches!(err, ObjectError::Auth(_)), "list: {err:?}");
        let err = store.head("k").await.expect_err("head with a wrong credential");
        assert!(matches!(err, ObjectError::Auth(_)), "head: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_container_is_no_bucket() {
    let azurite = Azurite::start();
    for credential in [AzureCredential::SharedKey(ACCOUNT_KEY.into()), AzureCredential::Sas(account_sas(ACCOUNT_KEY))] {
        let store = AzureStore::new(azurite.config("nothere", credential)).expect("store config");
        let err = store.put("k", Bytes::from_static(b"x")).await.expect_err("put into a missing container");
        assert!(matches!(err, ObjectError::NoBucket(_)), "put: {err:?}");
        let err = store.put_if_absent("k", Bytes::from_static(b"x")).await.expect_err("conditional put");
        assert!(matches!(err, ObjectError::NoBucket(_)), "put_if_absent: {err:?}");
        let err = store.get("k", Some(0..1)).await.expect_err("get from a missing container");
        assert!(matches!(err, ObjectError::NoBucket(_)), "get: {err:?}");
        let err = store.list("", None, 10).await.expect_err("list a missing container");
        assert!(matches!(err, ObjectError::NoBucket(_)), "list: {err:?}");
        let err = store.delete("k").await.expect_err("delete in a missing container");
        assert!(matches!(err, ObjectError::NoBucket(_)), "delete: {err:?}");
        let err = store.head("k").await.expect_err("head in a missing container");
        assert!(matches!(err, ObjectError::NoBucket(_)), "head: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_azurite_is_unavailable() {
    let mut azurite = Azurite::start();
    let store = azurite.store("stop", AzureCredential::SharedKey(ACCOUNT_KEY.into())).await;
    store.put("k", Bytes::from_static(b"before")).await.expect("put while running");
    azurite.stop();
    let err = store.get("k", None).await.expect_err("get after azurite stopped");
    assert!(matches!(err, ObjectError::Unavailable(_)), "get: {err:?}");
    assert!(err.is_retryable());
    let err = store.put("k", Bytes::from_static(b"after")).await.expect_err("put after azurite stopped");
    assert!(matches!(err, ObjectError::Unavailable(_)), "put: {err:?}");
    let err = store.head("k").await.expect_err("head after azurite stopped");
    assert!(matches!(err, ObjectError::Unavailable(_)), "head: {err:?}");
}
