//! S3 access keys: kept in the meta group with the secret sealed under the node key
//! (`nodekey`), served to SigV4 checks by [`MetaKeys`], made on first start by
//! [`first_start`], and managed with `tidepool keys create|list|revoke`, which talk to the
//! running node's admin routes (`http.rs`) with the admin token derived from the node key.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rand::Rng;
use tidepool_cluster::meta::is_access_key_id;
use tidepool_fs::{AccessKeyInfo, ErrorKind, Fs};

use crate::datadir::anyhow_free::Result;
use crate::nodekey::NodeKey;

/// The file where nodes before `tidepool keys` kept their one key pair: imported into the
/// meta group on the next start, then removed.
pub const LEGACY_FILE: &str = "s3-credentials";
const ENV_ID: &str = "TIDEPOOL_S3_ACCESS_KEY_ID";
const ENV_SECRET: &str = "TIDEPOOL_S3_SECRET_ACCESS_KEY";
/// Longest secret accepted from the environment or a legacy file.
const SECRET_MAX: usize = 128;

/// Unsealed secrets by id: (sealed bytes, the secret, or `None` when they do not open).
type SecretCache = HashMap<String, (Vec<u8>, Option<String>)>;

/// Secrets for SigV4 from the meta group, as applied now: a revoked key fails the next request.
/// Unsealed secrets are cached by (id, sealed bytes), so a replaced key is unsealed again.
pub struct MetaKeys {
    fs: Arc<Fs>,
    node_key: Arc<NodeKey>,
    cache: Mutex<SecretCache>,
}

impl MetaKeys {
    pub fn new(fs: Arc<Fs>, node_key: Arc<NodeKey>) -> Self {
        MetaKeys { fs, node_key, cache: Mutex::new(HashMap::new()) }
    }
}

impl tidepool_s3::KeyProvider for MetaKeys {
    fn secret(&self, access_key: &str) -> Option<String> {
        let Some(sealed) = self.fs.access_key_sealed(access_key) else {
            if let Ok(mut c) = self.cache.lock() {
                c.remove(access_key);
            }
            return None;
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, secret)) = cache.get(access_key)
            && *s == sealed
        {
            return secret.clone();
        }
        let secret = match self.node_key.unseal(access_key, &sealed) {
            Ok(s) => Some(s),
            Err(e) => {
                // Logged once per sealed value (the failure is cached too); the key is unusable.
                tracing::error!(access_key_id = access_key, error = %e, "S3 access key unusable");
                None
            }
        };
        cache.insert(access_key.to_string(), (sealed, secret.clone()));
        secret
    }
}

/// A new key pair as AWS makes them: a 20-character id (`TP` + 18 of `A-Z0-9`) and a
/// 40-character secret (`A-Za-z0-9`).
pub fn generate() -> (String, String) {
    const ID: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rngs::OsRng;
    let id: String = (0..18).map(|_| char::from(ID[rng.gen_range(0..ID.len())])).collect();
    let secret: String = (&mut rng).sample_iter(&rand::distributions::Alphanumeric).take(40).map(char::from).collect();
    (format!("TP{id}"), secret)
}

fn check_secret(secret: &str) -> Result<()> {
    if secret.is_empty() || secret.len() > SECRET_MAX || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("an S3 secret must be 1 to {SECRET_MAX} printable ASCII characters without spaces").into());
    }
    Ok(())
}

fn check_id(id: &str, from: &str) -> Result<()> {
    if !is_access_key_id(id) {
        return Err(format!("{from}: an access key id must be 16 to 128 characters of A-Z and 0-9 (got {id:?})").into());
    }
    Ok(())
}

/// Create a new key (sealed) in the meta group; returns its id and secret.
pub async fn create(fs: &Fs, node_key: &NodeKey, name: &str) -> tidepool_fs::Result<(String, String)> {
    loop {
        let (id, secret) = generate();
        match fs.put_access_key(&id, node_key.seal(&id, &secret), name).await {
            Ok(()) => return Ok((id, secret)),
            // 36^18 ids: a collision is next to impossible, but never an error.
            Err(e) if e.kind() == ErrorKind::Exists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Make `id` / `secret` a key of the meta group (replacing a key of that id with another secret).
async fn ensure(fs: &Fs, node_key: &NodeKey, id: &str, secret: &str, name: &str) -> Result<&'static str> {
    if let Some(sealed) = fs.access_key_sealed(id) {
        if node_key.unseal(id, &sealed).is_ok_and(|s| s == secret) {
            return Ok("kept");
        }
        fs.delete_access_key(id).await?;
        fs.put_access_key(id, node_key.seal(id, secret), name).await?;
        return Ok("replaced");
    }
    fs.put_access_key(id, node_key.seal(id, secret), name).await?;
    Ok("added")
}

/// What `tidepool up` prints about S3 keys.
pub enum Banner {
    /// A key whose secret is printed: new on this start, or given in the environment.
    Key { id: String, secret: String, source: String },
    /// Keys exist already; their secrets were shown when they were made.
    Ids(Vec<String>),
}

/// The key pair of `TIDEPOOL_S3_ACCESS_KEY_ID` / `TIDEPOOL_S3_SECRET_ACCESS_KEY` (both or
/// neither), checked before anything is opened.
pub fn env_key(env: impl Fn(&str) -> Option<String>) -> Result<Option<(String, String)>> {
    let id = env(ENV_ID).filter(|s| !s.is_empty());
    let secret = env(ENV_SECRET).filter(|s| !s.is_empty());
    match (id, secret) {
        (Some(id), Some(secret)) => {
            check_id(&id, ENV_ID)?;
            check_secret(&secret).map_err(|e| format!("{ENV_SECRET}: {e}"))?;
            Ok(Some((id, secret)))
        }
        (None, None) => Ok(None),
        _ => Err(format!("set both {ENV_ID} and {ENV_SECRET}, or neither").into()),
    }
}

/// At every start: import a legacy `s3-credentials` file, then make sure the key from the
/// environment (see [`env_key`]) is a key, else make a first key when there is none.
pub async fn first_start(
    fs: &Fs,
    node_key: &NodeKey,
    data_dir: &Path,
    env_key: Option<(String, String)>,
) -> Result<Banner> {
    import_legacy(fs, node_key, data_dir).await?;
    if let Some((id, secret)) = env_key {
        let what = ensure(fs, node_key, &id, &secret, "TIDEPOOL_S3_* environment").await?;
        tracing::info!(access_key_id = %id, what, "S3 key from the environment");
        return Ok(Banner::Key { id, secret, source: "TIDEPOOL_S3_* environment".into() });
    }
    let ids: Vec<String> = fs.access_keys().into_iter().map(|k| k.id).collect();
    if !ids.is_empty() {
        return Ok(Banner::Ids(ids));
    }
    let (id, secret) = create(fs, node_key, "first key").await?;
    Ok(Banner::Key { id, secret, source: "new; the secret is shown only now".into() })
}

/// `<data_dir>/s3-credentials` (written by tidepool before `tidepool keys`): its key goes into
/// the meta group (sealed), then the file is removed.
async fn import_legacy(fs: &Fs, node_key: &NodeKey, data_dir: &Path) -> Result<()> {
    let path = data_dir.join(LEGACY_FILE);
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path)?;
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(str::trim).map(str::to_owned));
    let (Some(id), Some(secret)) = (get("access_key_id="), get("secret_access_key=")) else {
        return Err(format!(
            "{} is damaged (expected access_key_id= and secret_access_key= lines); fix or remove it",
            path.display()
        )
        .into());
    };
    check_id(&id, &path.display().to_string())?;
    check_secret(&secret).map_err(|e| format!("{}: {e}", path.display()))?;
    let what = ensure(fs, node_key, &id, &secret, "imported from s3-credentials").await?;
    std::fs::remove_file(&path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    tracing::info!(
        access_key_id = %id,
        what,
        file = %path.display(),
        "imported the S3 key of the legacy credentials file into the meta group (secret sealed) and removed the file"
    );
    Ok(())
}

/// `tidepool keys ...`: talks to the running node's admin routes.
#[derive(clap::Subcommand)]
pub enum KeysCmd {
    /// Create an access key; prints its id and secret (the secret is shown only now).
    Create {
        /// A label to tell keys apart in `tidepool keys list`.
        #[arg(long, default_value = "")]
        name: String,
        /// Status endpoint of the node (default: the `http_listen` setting).
        #[arg(long)]
        addr: Option<String>,
    },
    /// List access keys: id, label, creation time (never secrets).
    List {
        #[arg(long)]
        addr: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an access key: requests signed with it fail from the next one on.
    Revoke {
        /// The access key id.
        id: String,
        #[arg(long)]
        addr: Option<String>,
    },
}

/// Run a `tidepool keys` command against the node at `addr` (default `http_listen`), with the
/// admin token from `data_dir`'s node key.
pub fn run(cmd: KeysCmd, data_dir: &Path, http_listen: &str) -> Result<()> {
    let node_key = NodeKey::read(data_dir).map_err(|e| {
        format!("{e}; `tidepool keys` needs read access to the node's data folder (--data-dir, or data_dir)")
    })?;
    let token = node_key.admin_token();
    let call = |addr: &Option<String>, method: &str, path: &str, body: &str| -> Result<(u16, String)> {
        let addr = addr.as_deref().unwrap_or(http_listen);
        let (code, text) = crate::http::request(addr, method, path, Some(&token), body).map_err(|e| {
            format!("no tidepool node answers at {addr} ({e}); start it with `tidepool up` (or pass --addr)")
        })?;
        match code {
            200 => Ok((code, text)),
            401 => Err(format!(
                "the node at {addr} refused the admin token of {} (is it the node of this data folder?)",
                data_dir.display()
            )
            .into()),
            _ => Err(format!("the node at {addr} answered {code}: {}", text.trim()).into()),
        }
    };
    match cmd {
        KeysCmd::Create { name, addr } => {
            let body = serde_json::json!({ "name": name }).to_string();
            let (_, text) = call(&addr, "POST", "/admin/keys", &body)?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let (id, secret) = (v["id"].as_str().unwrap_or("?"), v["secret"].as_str().unwrap_or("?"));
            println!("access key id      {id}");
            println!("secret access key  {secret}");
            println!("(the secret is shown only now; keep it: the node keeps it sealed and never prints it again)");
        }
        KeysCmd::List { addr, json } => {
            let (_, text) = call(&addr, "GET", "/admin/keys", "")?;
            if json {
                println!("{text}");
                return Ok(());
            }
            let keys: Vec<serde_json::Value> = serde_json::from_str(&text)?;
            println!("{:<24} {:<22} NAME", "ACCESS KEY ID", "CREATED (UTC)");
            for k in &keys {
                let created = k["created"].as_i64().map(format_nanos).unwrap_or_else(|| "?".into());
                println!(
                    "{:<24} {:<22} {}",
                    k["id"].as_str().unwrap_or("?"),
                    created,
                    k["name"].as_str().unwrap_or("")
                );
            }
        }
        KeysCmd::Revoke { id, addr } => {
            call(&addr, "DELETE", &format!("/admin/keys/{id}"), "")?;
            println!("revoked {id}: requests signed with it are refused from now on");
        }
    }
    Ok(())
}

/// `2024-05-01 12:00:00` from nanoseconds since the epoch (UTC).
fn format_nanos(n: i64) -> String {
    let secs = n.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The admin routes' work, called by `http.rs` once the token checked out.
pub struct Admin {
    pub fs: Arc<Fs>,
    pub node_key: Arc<NodeKey>,
}

impl Admin {
    /// `(status, JSON body)` for a request to `/admin/keys[/ID]`.
    pub async fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let err = |code: u16, msg: String| (code, serde_json::json!({ "error": msg }).to_string());
        let fs_err = |e: tidepool_fs::FsError| {
            let code = match e.kind() {
                ErrorKind::NotFound => 404,
                ErrorKind::Exists => 409,
                ErrorKind::Invalid => 400,
                ErrorKind::ReadOnly | ErrorKind::Unavailable => 503,
                _ => 500,
            };
            err(code, e.to_string())
        };
        match (method, path) {
            ("GET", "/admin/keys") => {
                let keys: Vec<AccessKeyInfo> = self.fs.access_keys();
                (200, serde_json::to_string(&keys).unwrap_or_else(|_| "[]".into()))
            }
            ("POST", "/admin/keys") => {
                #[derive(serde::Deserialize)]
                struct Req {
                    #[serde(default)]
                    name: String,
                }
                let req: Req = if body.is_empty() {
                    Req { name: String::new() }
                } else {
                    match serde_json::from_slice(body) {
                        Ok(r) => r,
                        Err(e) => return err(400, format!("bad JSON body: {e}")),
                    }
                };
                match create(&self.fs, &self.node_key, &req.name).await {
                    Ok((id, secret)) => {
                        tracing::info!(access_key_id = %id, name = %req.name, "S3 access key created");
                        (200, serde_json::json!({ "id": id, "secret": secret, "name": req.name }).to_string())
                    }
                    Err(e) => fs_err(e),
                }
            }
            ("DELETE", p) if p.starts_with("/admin/keys/") => {
                let id = &p["/admin/keys/".len()..];
                match self.fs.delete_access_key(id).await {
                    Ok(()) => {
                        tracing::info!(access_key_id = %id, "S3 access key revoked");
                        (200, serde_json::json!({ "revoked": id }).to_string())
                    }
                    Err(e) => fs_err(e),
                }
            }
            _ => err(404, format!("no admin route {method} {path}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_s3::KeyProvider;

    async fn fs(dir: &Path) -> Arc<Fs> {
        use tidepool_cluster::{ManualClock, MetaGroup, MetaState, RaftOptions};
        let dev: Arc<dyn tidepool_spdk::BlockDevice> = Arc::new(tidepool_spdk::device::mem::MemDevice::new(32 << 20));
        let opts =
            tidepool_spdk::StoreOptions { segment_bytes: 4 << 20, max_block_bytes: 1 << 20, crc_cache_bytes: 1 << 20 };
        let store = Arc::new(tidepool_spdk::BlockStore::format(dev, opts).await.unwrap());
        let meta = MetaGroup::open(&dir.join("meta"), RaftOptions::default(), MetaState::new()).unwrap();
        let clock = Arc::new(ManualClock::new(1));
        Arc::new(Fs::open(meta, store, clock, tidepool_fs::FsOptions::default()).await.unwrap().0)
    }

    /// The provider follows the meta group: a new key works, a replaced secret is unsealed
    /// again, a revoked key fails at once, and an undecryptable one is unusable, not a panic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_follows_the_meta_group() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path()).await;
        let nk = Arc::new(NodeKey::from_bytes([3; 32]));
        let p = MetaKeys::new(fs.clone(), nk.clone());
        let (id, secret) = create(&fs, &nk, "a").await.unwrap();
        assert_eq!(p.secret(&id).as_deref(), Some(secret.as_str()));
        assert_eq!(p.secret(&id).as_deref(), Some(secret.as_str()), "cached");
        assert_eq!(ensure(&fs, &nk, &id, "other-secret", "a").await.unwrap(), "replaced");
        assert_eq!(p.secret(&id).as_deref(), Some("other-secret"));
        assert_eq!(ensure(&fs, &nk, &id, "other-secret", "a").await.unwrap(), "kept");
        fs.delete_access_key(&id).await.unwrap();
        assert_eq!(p.secret(&id), None, "revoked at once");
        let bad = "TPCORRUPT00000000000";
        fs.put_access_key(bad, vec![9; 60], "").await.unwrap();
        assert_eq!(p.secret(bad), None);
        let other_node = NodeKey::from_bytes([4; 32]);
        fs.put_access_key("TPOTHERNODE000000000", other_node.seal("TPOTHERNODE000000000", "s"), "").await.unwrap();
        assert_eq!(p.secret("TPOTHERNODE000000000"), None);
        assert_eq!(p.secret("TPNEVERMADE000000000"), None);
    }

    #[test]
    fn generated_pairs_look_like_aws_and_dates_format() {
        let (id, secret) = generate();
        assert!(id.starts_with("TP") && id.len() == 20 && is_access_key_id(&id), "{id}");
        assert!(secret.len() == 40 && secret.bytes().all(|b| b.is_ascii_alphanumeric()), "{secret}");
        assert_ne!(generate(), generate());
        assert_eq!(format_nanos(0), "1970-01-01 00:00:00");
        assert_eq!(format_nanos(1_700_000_000_000_000_000), "2023-11-14 22:13:20");
        assert!(check_secret("").is_err() && check_secret("a b").is_err() && check_secret("ok/+=").is_ok());
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        }
        assert_eq!(env_key(env(&[])).unwrap(), None);
        let both = [(ENV_ID, "TPABCDEFGHIJKLMNOPQR"), (ENV_SECRET, "s3cr3t/+=")];
        assert_eq!(env_key(env(&both)).unwrap(), Some(("TPABCDEFGHIJKLMNOPQR".into(), "s3cr3t/+=".into())));
        assert!(env_key(env(&[(ENV_ID, "TPABCDEFGHIJKLMNOPQR")])).unwrap_err().to_string().contains("set both"));
        let short = [(ENV_ID, "short"), (ENV_SECRET, "x")];
        assert!(env_key(env(&short)).unwrap_err().to_string().contains("16 to 128"));
    }
}
