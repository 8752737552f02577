//! Settings: typed, from `tidepool.toml` then `TIDEPOOL_*` environment variables, validated
//! once. Each default is documented next to its field. Keys are flat so that every setting
//! has one obvious variable: `device_size` <-> `TIDEPOOL_DEVICE_SIZE`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file path={path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad settings in {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid setting {key}={value}: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
}

/// A size in bytes, written as `4GiB`, `512MiB`, `64KiB`, `1000000` or `10GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?} (e.g. 4GiB, 512MiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "t" | "tb" => 1000u64.pow(4),
            "tib" => 1 << 40,
            u => return Err(format!("unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size too large: {s:?}"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&human_bytes(self.0))
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineSetting {
    /// io_uring with O_DIRECT where the file allows it, else posix.
    Auto,
    IoUring,
    Posix,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Everything of this node lives here. Default `./tidepool-data`.
    pub data_dir: PathBuf,
    /// The NVMe device: a file or a raw block device. Default `<data_dir>/nvme.img`.
    pub device_path: Option<PathBuf>,
    /// Size of the device file when tidepool creates it. Default 4GiB. Ignored for block devices.
    pub device_size: ByteSize,
    /// Device engine. Default `auto`.
    pub device_engine: EngineSetting,
    /// I/Os the engine keeps in flight. Default 64.
    pub queue_depth: usize,
    /// Block store segment size. Default 256MiB (tests use less).
    pub segment_size: ByteSize,
    /// Largest block a file is cut into. Default 4MiB.
    pub block_size: ByteSize,
    /// RAM for the read cache of verified 4 KiB block pages, below the S3 and NFS front ends
    /// (`fs/src/cache.rs`). Default: a quarter of the memory the node may use (the machine's
    /// `MemTotal`, capped by its cgroup's memory limit), at least 64MiB and at most 64GiB
    /// (`tidepool_fs::read_cache_bytes_for` says why); 1GiB if that memory cannot be read.
    /// Pages are taken only as they are read. 0 turns the cache off. 0, or 1MiB to 1TiB.
    pub read_cache_bytes: Option<ByteSize>,
    /// The cold tier: `file:///path`, `s3://bucket/prefix` or `az://container/prefix`.
    /// Default `file://<data_dir>/objects`. (`object_store` is accepted as an older name.)
    #[serde(alias = "object_store")]
    pub bucket: Option<String>,
    /// Region of an `s3://` bucket. Default: the AWS chain (`AWS_REGION`, profile, IMDS), else us-east-1.
    pub bucket_region: Option<String>,
    /// Endpoint of an S3-compatible server (`http://127.0.0.1:9000`, path-style) or of the Azure
    /// blob service (`http://127.0.0.1:10000/devstoreaccount1` for Azurite). Default: AWS / Azure.
    pub bucket_endpoint: Option<String>,
    /// A dirty block goes up this long after it was written. Default 30.
    pub tier_after_secs: u64,
    /// A clean block stays on NVMe at least this long after its upload, whatever the
    /// pressure. Default 0 (space alone decides).
    pub retain_for_secs: u64,
    /// Evict clean blocks above this fraction of the device. Default 0.90.
    pub evict_high: f64,
    /// ... down to this fraction. Default 0.80.
    pub evict_low: f64,
    /// Files at least this large go into chunk objects, smaller ones into pack objects. Default 1MiB.
    pub pack_threshold: ByteSize,
    /// Largest chunk object. Default 64MiB.
    pub chunk_object_size: ByteSize,
    /// Largest pack object. Default 64MiB.
    pub pack_object_size: ByteSize,
    /// Above this many dirty bytes blocks go up at once. Default: a quarter of the device.
    pub dirty_high: Option<ByteSize>,
    /// Above this many dirty bytes writers wait, then get an error if the bucket does not take
    /// uploads. Default: 60 % of the device.
    pub dirty_limit: Option<ByteSize>,
    /// Objects uploaded at once. Default 4.
    pub upload_parallelism: usize,
    /// Seconds between garbage collection passes over the bucket. Default 60.
    pub gc_interval_secs: u64,
    /// A manifest of the metadata goes to the bucket this often while running, so losing every
    /// node at once loses at most this window. Default 900 (15 min); 0 = off.
    pub snapshot_interval_secs: u64,
    /// Manifests kept in the bucket (the newest). Default 3.
    pub manifest_retain: u64,
    /// Blocks fetched at once when rehydrating. Default 8.
    pub rehydrate_parallelism: usize,
    /// Testing only: fraction of object store calls that fail (the fault-injecting wrapper). Default 0.
    pub fault_fail_rate: f64,
    /// Testing only: fraction of object store calls delayed by 50 ms. Default 0.
    pub fault_delay_rate: f64,
    /// Status and metrics HTTP endpoint. Default `127.0.0.1:9100`.
    pub http_listen: String,
    /// Snapshot the metadata and compact the Raft log once the log passes this. Default 64MiB.
    pub snapshot_log_size: ByteSize,
    /// S3 endpoint. Default `127.0.0.1:9000`.
    pub s3_listen: String,
    /// Region of the S3 endpoint: reported by GetBucketLocation and HeadBucket, and the only
    /// region a request may be signed for (others: AuthorizationHeaderMalformed). Default `us-east-1`.
    pub s3_region: String,
    /// NFSv3 endpoint (MOUNT and NFS on one TCP port). Default `127.0.0.1:11111`.
    pub nfs_listen: String,
    /// Client addresses that may MOUNT and call NFS, as CIDRs (a TOML array, or one string
    /// with commas: `TIDEPOOL_NFS_ALLOWED_CLIENTS=10.0.0.0/8,127.0.0.1`); others are refused.
    /// Default `["127.0.0.0/8", "::1/128"]` (loopback only).
    #[serde(deserialize_with = "cidr_list")]
    pub nfs_allowed_clients: Vec<tidepool_nfs::Cidr>,
    /// Export read-only: every NFS change answers NFS3ERR_ROFS. Default false.
    pub nfs_read_only: bool,
    /// Map uid 0 / gid 0 of NFS callers to `nfs_anon_uid` / `nfs_anon_gid`. Default false.
    pub nfs_root_squash: bool,
    /// Who a squashed root or an AUTH_NULL NFS caller is. Default 65534 (nobody).
    pub nfs_anon_uid: u32,
    /// Default 65534 (nogroup).
    pub nfs_anon_gid: u32,
    /// Node-to-node transport (Raft, block replicas, joins). Default `127.0.0.1:7100`; unset,
    /// a node that never joined a cluster takes a free port when that one is taken (see
    /// [`Settings::cluster_listen`]).
    pub cluster_listen: Option<String>,
    /// The transport address other nodes use to reach this one. Default: `cluster_listen`.
    pub cluster_advertise: Option<String>,
    /// Copies of a dirty block on distinct nodes before a write is acknowledged. Default: 2 in
    /// a cluster, 1 alone (a cluster with fewer nodes than this keeps one copy per node).
    pub replicas: Option<usize>,
    /// Join the cluster of the node at this transport address (`up --join ADDR`). Default: none
    /// (a new data folder starts a new cluster of one).
    pub join: Option<String>,
    /// `<cluster id>.<secret hex>`, as `tidepool cluster token` prints it (`up --token`). Needed
    /// to join; a node that has joined keeps it in `<data_dir>/cluster.token`. Default: none.
    pub cluster_token: Option<String>,
    /// A file holding the cluster token (instead of `cluster_token`). Default: none.
    pub cluster_token_file: Option<PathBuf>,
    /// A Raft message bigger than this (a metadata snapshot of a large namespace) goes to a
    /// peer in pieces of this size. Default 16 MiB; 256 bytes to 32 MiB.
    pub raft_snapshot_chunk_size: ByteSize,
}

/// A CIDR list from a TOML array of strings or one comma-separated string.
fn cidr_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<tidepool_nfs::Cidr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match Raw::deserialize(d)? {
        Raw::One(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
        Raw::Many(v) => v,
    };
    items.iter().map(|s| s.parse().map_err(serde::de::Error::custom)).collect()
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./tidepool-data"),
            device_path: None,
            device_size: ByteSize(4 << 30),
            device_engine: EngineSetting::Auto,
            queue_depth: 64,
            segment_size: ByteSize(256 << 20),
            block_size: ByteSize(4 << 20),
            read_cache_bytes: None,
            bucket: None,
            bucket_region: None,
            bucket_endpoint: None,
            tier_after_secs: 30,
            retain_for_secs: 0,
            evict_high: 0.90,
            evict_low: 0.80,
            pack_threshold: ByteSize(1 << 20),
            chunk_object_size: ByteSize(64 << 20),
            pack_object_size: ByteSize(64 << 20),
            dirty_high: None,
            dirty_limit: None,
            upload_parallelism: 4,
            gc_interval_secs: 60,
            snapshot_interval_secs: 900,
            manifest_retain: 3,
            rehydrate_parallelism: 8,
            fault_fail_rate: 0.0,
            fault_delay_rate: 0.0,
            http_listen: "127.0.0.1:9100".into(),
            snapshot_log_size: ByteSize(64 << 20),
            s3_listen: "127.0.0.1:9000".into(),
            s3_region: "us-east-1".into(),
            nfs_listen: "127.0.0.1:11111".into(),
            nfs_allowed_clients: tidepool_nfs::ExportOptions::default().allowed_clients,
            nfs_read_only: false,
            nfs_root_squash: false,
            nfs_anon_uid: 65534,
            nfs_anon_gid: 65534,
            cluster_listen: None,
            cluster_advertise: None,
            replicas: None,
            join: None,
            cluster_token: None,
            cluster_token_file: None,
            raft_snapshot_chunk_size: ByteSize(16 << 20),
        }
    }
}

/// Environment variables with the prefix that are not settings (read elsewhere; the S3 key
/// pair is a secret, read by `up` and never part of the settings; `TIDEPOOL_AZURITE_BIN` is
/// the test suite's, exported by test.sh and inherited by every node a test starts).
const NOT_SETTINGS: &[&str] = &[
    "TIDEPOOL_LOG",
    "TIDEPOOL_BIN",
    "TIDEPOOL_AZURITE_BIN",
    "TIDEPOOL_S3_ACCESS_KEY_ID",
    "TIDEPOOL_S3_SECRET_ACCESS_KEY",
];

/// `cluster_listen` when it is not set.
pub const DEFAULT_CLUSTER_LISTEN: &str = "127.0.0.1:7100";

impl Settings {
    /// Load `file` (if given, it must exist; else `./tidepool.toml` if present), then overlay
    /// `TIDEPOOL_*` from `env`, then validate.
    pub fn load(file: Option<&Path>, env: impl Iterator<Item = (String, String)>) -> Result<Self, SettingsError> {
        let mut table = toml::Table::new();
        let path = match file {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("tidepool.toml")).filter(|p| p.exists()),
        };
        if let Some(p) = &path {
            let text = std::fs::read_to_string(p)
                .map_err(|source| SettingsError::Read { path: p.display().to_string(), source })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| SettingsError::Parse { origin: p.display().to_string(), message: e.to_string() })?;
        }
        for (k, v) in env {
            let Some(key) = k.strip_prefix("TIDEPOOL_") else { continue };
            if NOT_SETTINGS.contains(&k.as_str()) {
                continue;
            }
            // A value that parses as TOML (a number, a quoted string) is taken as such; else it is a string.
            let value = format!("v = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(v.clone()));
            table.insert(key.to_ascii_lowercase(), value);
        }
        let origin = path
            .map(|p| format!("{} and TIDEPOOL_* environment", p.display()))
            .unwrap_or_else(|| "TIDEPOOL_* environment".into());
        let s: Settings = table
            .try_into()
            .map_err(|e: toml::de::Error| SettingsError::Parse { origin, message: e.message().to_string() })?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |key, value: String, reason: &str| Err(SettingsError::Invalid { key, value, reason: reason.into() });
        if !(256..=32 << 20).contains(&self.raft_snapshot_chunk_size.0) {
            return bad(
                "raft_snapshot_chunk_size",
                self.raft_snapshot_chunk_size.to_string(),
                "must be between 256 bytes and 32MiB",
            );
        }
        let bs = self.block_size.0;
        if !(4096..=16 << 20).contains(&bs) || !bs.is_multiple_of(4096) {
            return bad("block_size", self.block_size.to_string(), "must be a multiple of 4KiB between 4KiB and 16MiB");
        }
        let seg = self.segment_size.0;
        if !seg.is_multiple_of(1 << 20) || seg < 4 * bs.max(1 << 20) {
            return bad(
                "segment_size",
                self.segment_size.to_string(),
                "must be a multiple of 1MiB and at least 4 blocks",
            );
        }
        if self.device_size.0 < 4 * seg {
            return bad(
                "device_size",
                self.device_size.to_string(),
                "must hold at least 4 segments (lower segment_size for small devices)",
            );
        }
        if let Some(rc) = self.read_cache_bytes
            && rc.0 != 0
            && !(1 << 20..=1 << 40).contains(&rc.0)
        {
            return bad("read_cache_bytes", rc.to_string(), "must be 0 (off) or between 1MiB and 1TiB");
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return bad("queue_depth", self.queue_depth.to_string(), "must be between 1 and 4096");
        }
        if self.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("http_listen", self.http_listen.clone(), "must be an address like 127.0.0.1:9100");
        }
        if self.s3_listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("s3_listen", self.s3_listen.clone(), "must be an address like 127.0.0.1:9000");
        }
        if self.nfs_listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "nfs_listen",
                self.nfs_listen.clone(),
                "must be an address like 127.0.0.1:11111 (or 0.0.0.0:2049)",
            );
        }
        let r = &self.s3_region;
        if r.is_empty() || r.len() > 32 || !r.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return bad("s3_region", r.clone(), "must be a region name like us-east-1");
        }
        if self.snapshot_log_size.0 < 4096 {
            return bad("snapshot_log_size", self.snapshot_log_size.to_string(), "must be at least 4KiB");
        }
        if let Some(url) = &self.bucket
            && let Err(e) = tidepool_tiering::parse_bucket_url(url)
        {
            return bad("bucket", url.clone(), &e.to_string());
        }
        let frac = |x: f64| (0.0..=1.0).contains(&x);
        if !frac(self.evict_low) || !frac(self.evict_high) || self.evict_low >= self.evict_high {
            return bad(
                "evict_high",
                format!("{} (evict_low={})", self.evict_high, self.evict_low),
                "need 0 <= evict_low < evict_high <= 1",
            );
        }
        if !frac(self.fault_fail_rate) || !frac(self.fault_delay_rate) {
            return bad("fault_fail_rate", self.fault_fail_rate.to_string(), "fault rates are fractions in [0, 1]");
        }
        for (key, v) in [("chunk_object_size", self.chunk_object_size), ("pack_object_size", self.pack_object_size)] {
            if v.0 < self.block_size.0 || v.0 > 5 << 30 {
                return bad(key, v.to_string(), "must be between block_size and 5GiB");
            }
        }
        if self.manifest_retain == 0 {
            return bad("manifest_retain", "0".into(), "must keep at least 1 manifest");
        }
        if !(1..=256).contains(&self.rehydrate_parallelism) {
            return bad("rehydrate_parallelism", self.rehydrate_parallelism.to_string(), "must be between 1 and 256");
        }
        if !(1..=64).contains(&self.upload_parallelism) {
            return bad("upload_parallelism", self.upload_parallelism.to_string(), "must be between 1 and 64");
        }
        if let (Some(h), Some(l)) = (self.dirty_high, self.dirty_limit)
            && h > l
        {
            return bad("dirty_high", h.to_string(), "must not be above dirty_limit");
        }
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), SettingsError> {
        let bad = |key, value: String, reason: &str| Err(SettingsError::Invalid { key, value, reason: reason.into() });
        if let Some(a) = &self.cluster_listen {
            match a.parse::<std::net::SocketAddr>() {
                Err(_) => return bad("cluster_listen", a.clone(), "must be an address like 127.0.0.1:7100"),
                Ok(sa) if sa.ip().is_unspecified() && self.cluster_advertise.is_none() => {
                    return bad(
                        "cluster_listen",
                        a.clone(),
                        "listens on every address: set cluster_advertise to the one other nodes reach this node at",
                    );
                }
                Ok(_) => {}
            }
        }
        if let Some(a) = &self.cluster_advertise
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            return bad("cluster_advertise", a.clone(), "must be an address like 10.0.0.5:7100");
        }
        if let Some(a) = &self.join
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            return bad("join", a.clone(), "must be the transport address of a cluster node, like 127.0.0.1:7100");
        }
        if let Some(r) = self.replicas
            && !(1..=16).contains(&r)
        {
            return bad("replicas", r.to_string(), "must be between 1 and 16");
        }
        if self.cluster_token.is_some() && self.cluster_token_file.is_some() {
            return bad("cluster_token_file", "(set)".into(), "give cluster_token or cluster_token_file, not both");
        }
        if let Some(t) = &self.cluster_token
            && let Err(e) = crate::cluster::ClusterToken::parse(t)
        {
            return bad("cluster_token", "(hidden)".into(), &e);
        }
        Ok(())
    }

    /// The read cache's size and where it comes from: the setting if given, else
    /// `tidepool_fs::read_cache_bytes_for` the memory this process may use.
    pub fn read_cache(&self) -> ReadCacheSize {
        match self.read_cache_bytes {
            Some(b) => ReadCacheSize { bytes: b.0, memory_bytes: None, from_setting: true },
            None => {
                let memory_bytes = memory_limit_bytes();
                let bytes = tidepool_fs::read_cache_bytes_for(memory_bytes);
                ReadCacheSize { bytes, memory_bytes, from_setting: false }
            }
        }
    }

    pub fn device_path(&self) -> PathBuf {
        self.device_path.clone().unwrap_or_else(|| self.data_dir.join("nvme.img"))
    }

    /// The transport's address: the setting, else `127.0.0.1:7100`.
    pub fn cluster_listen(&self) -> &str {
        self.cluster_listen.as_deref().unwrap_or(DEFAULT_CLUSTER_LISTEN)
    }

    pub fn bucket_url(&self) -> String {
        self.bucket.clone().unwrap_or_else(|| {
            let abs =
                std::path::absolute(self.data_dir.join("objects")).unwrap_or_else(|_| self.data_dir.join("objects"));
            format!("file://{}", abs.display())
        })
    }
}

/// The read cache's size as chosen at start (`Settings::read_cache`), for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCacheSize {
    pub bytes: u64,
    /// The memory the default was sized from (`None`: the setting was given, or it was unknown).
    pub memory_bytes: Option<u64>,
    pub from_setting: bool,
}

impl std::fmt::Display for ReadCacheSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.bytes, self.from_setting, self.memory_bytes) {
            (0, _, _) => f.write_str("off (read_cache_bytes = 0)"),
            (b, true, _) => write!(f, "{} (read_cache_bytes)", human_bytes(b)),
            (b, false, Some(m)) => write!(
                f,
                "{} ({} % of {} of memory, within {}..{}; read_cache_bytes sets it)",
                human_bytes(b),
                tidepool_fs::READ_CACHE_MEMORY_PERCENT,
                human_bytes(m),
                human_bytes(tidepool_fs::READ_CACHE_MIN_BYTES),
                human_bytes(tidepool_fs::READ_CACHE_MAX_BYTES),
            ),
            (b, false, None) => write!(f, "{} (memory size unknown; read_cache_bytes sets it)", human_bytes(b)),
        }
    }
}

/// The memory this process may use: the machine's `MemTotal`, capped by the memory limit of
/// its cgroup or of any cgroup above it (v2 `memory.max`, v1 `memory.limit_in_bytes`).
/// `None` where `/proc/meminfo` cannot be read (not Linux).
pub fn memory_limit_bytes() -> Option<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let meminfo = read(Path::new("/proc/meminfo"))?;
    let cgroup = read(Path::new("/proc/self/cgroup")).unwrap_or_default();
    memory_limit_from(&meminfo, &cgroup, Path::new("/sys/fs/cgroup"), read)
}

/// [`memory_limit_bytes`] from the text of `/proc/meminfo` and `/proc/self/cgroup`, with the
/// cgroup files read by `read` under `root` (the cgroup mount).
fn memory_limit_from(meminfo: &str, cgroup: &str, root: &Path, read: impl Fn(&Path) -> Option<String>) -> Option<u64> {
    let total = meminfo.lines().find_map(|l| {
        let kib = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim();
        kib.parse::<u64>().ok()?.checked_mul(1024)
    })?;
    // A limit file holds bytes, or "max" (v2) / a huge number (v1) for none.
    let limit_at = |dir: PathBuf, file: &str| read(&dir.join(file)).and_then(|t| t.trim().parse::<u64>().ok());
    let mut limit = total;
    for line in cgroup.lines() {
        // "0::/path" (v2), "4:memory:/path" (v1); the process's cgroup and each one above it
        // (a container without a cgroup namespace sees its own cgroup as the mount's root).
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let (base, file) = if id == "0" && controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = Some(Path::new(path.trim()));
        while let Some(d) = dir {
            let rel = d.strip_prefix("/").unwrap_or(d);
            if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                break;
            }
            if let Some(l) = limit_at(base.join(rel), file) {
                limit = limit.min(l);
            }
            dir = d.parent();
        }
    }
    Some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("4GiB".parse::<ByteSize>().unwrap().0, 4 << 30);
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("10GB".parse::<ByteSize>().unwrap().0, 10_000_000_000);
        assert_eq!("123".parse::<ByteSize>().unwrap().0, 123);
        assert!("4 parsecs".parse::<ByteSize>().is_err());
        assert!("lots".parse::<ByteSize>().is_err());
    }

    #[test]
    fn cluster_settings() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!((s.cluster_listen(), s.cluster_advertise.as_deref()), ("127.0.0.1:7100", None));
        assert_eq!((s.replicas, s.join.as_deref()), (None, None));
        let tok = format!("{}.{}", "ab".repeat(16), "cd".repeat(32));
        let s = Settings::load(
            None,
            env(&[
                ("TIDEPOOL_CLUSTER_LISTEN", "127.0.0.2:7100"),
                ("TIDEPOOL_JOIN", "127.0.0.1:7100"),
                ("TIDEPOOL_REPLICAS", "3"),
                ("TIDEPOOL_CLUSTER_TOKEN", tok.as_str()),
            ]),
        )
        .unwrap();
        assert_eq!((s.cluster_listen(), s.replicas), ("127.0.0.2:7100", Some(3)));
        for (k, v, want) in [
            ("TIDEPOOL_CLUSTER_LISTEN", "nowhere", "cluster_listen"),
            ("TIDEPOOL_CLUSTER_LISTEN", "0.0.0.0:7100", "cluster_advertise"),
            ("TIDEPOOL_CLUSTER_ADVERTISE", "x:y", "cluster_advertise"),
            ("TIDEPOOL_JOIN", "node1", "join"),
            ("TIDEPOOL_REPLICAS", "0", "replicas"),
            ("TIDEPOOL_CLUSTER_TOKEN", "nodot", "cluster_token"),
            ("TIDEPOOL_CLUSTER_TOKEN", "abc.zz", "cluster_token"),
        ] {
            let e = Settings::load(None, env(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
            assert!(!e.contains("zz"), "the token is not echoed: {e}");
        }
    }

    #[test]
    fn env_overrides_file_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tidepool.toml");
        std::fs::write(&f, "device_size = \"8GiB\"\nqueue_depth = 32\n").unwrap();
        let s = Settings::load(Some(&f), env(&[("TIDEPOOL_QUEUE_DEPTH", "16"), ("HOME", "/x")])).unwrap();
        assert_eq!(s.device_size.0, 8 << 30);
        assert_eq!(s.queue_depth, 16);

        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_DEVICE_SIZE", "3 bananas")])).unwrap_err();
        assert!(e.to_string().contains("bananas"), "{e}");
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_QUEUE_DEPTH", "0")])).unwrap_err();
        assert!(e.to_string().contains("queue_depth"), "{e}");
        assert_eq!(s.read_cache_bytes, None, "default: sized from memory");
        let auto = s.read_cache();
        assert!(!auto.from_setting && auto.bytes >= tidepool_fs::READ_CACHE_MIN_BYTES, "{auto}");
        assert_eq!(auto.bytes, tidepool_fs::read_cache_bytes_for(memory_limit_bytes()));
        let s = Settings::load(Some(&f), env(&[("TIDEPOOL_READ_CACHE_BYTES", "256MiB")])).unwrap();
        assert_eq!(s.read_cache(), ReadCacheSize { bytes: 256 << 20, memory_bytes: None, from_setting: true });
        let off = Settings::load(Some(&f), env(&[("TIDEPOOL_READ_CACHE_BYTES", "0")])).unwrap().read_cache();
        assert_eq!((off.bytes, off.from_setting), (0, true), "0 is off, not the default");
        std::fs::write(&f, "read_cache_bytes = \"2GiB\"\n").unwrap();
        assert_eq!(Settings::load(Some(&f), env(&[])).unwrap().read_cache().bytes, 2 << 30, "from the file");
        std::fs::write(&f, "device_size = \"8GiB\"\nqueue_depth = 32\n").unwrap();
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_READ_CACHE_BYTES", "4KiB")])).unwrap_err();
        assert!(e.to_string().contains("read_cache_bytes"), "{e}");
        let s = Settings::load(
            Some(&f),
            env(&[
                ("TIDEPOOL_S3_LISTEN", "127.0.0.1:9999"),
                ("TIDEPOOL_S3_SECRET_ACCESS_KEY", "not a setting"),
                ("TIDEPOOL_AZURITE_BIN", "/opt/azurite-blob"),
            ]),
        )
        .unwrap();
        assert_eq!((s.s3_listen.as_str(), s.s3_region.as_str()), ("127.0.0.1:9999", "us-east-1"));
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_S3_LISTEN", "port 9000")])).unwrap_err();
        assert!(e.to_string().contains("s3_listen"), "{e}");
        let s = Settings::load(Some(&f), env(&[("TIDEPOOL_NFS_LISTEN", "0.0.0.0:2049")])).unwrap();
        assert_eq!(s.nfs_listen, "0.0.0.0:2049");
        let s = Settings::load(
            Some(&f),
            env(&[("TIDEPOOL_NFS_ALLOWED_CLIENTS", "10.0.0.0/8, 127.0.0.2"), ("TIDEPOOL_NFS_ROOT_SQUASH", "true")]),
        )
        .unwrap();
        let cidrs: Vec<String> = s.nfs_allowed_clients.iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "127.0.0.2/32"]);
        assert!(s.nfs_root_squash && !s.nfs_read_only && s.nfs_anon_uid == 65534);
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_NFS_ALLOWED_CLIENTS", "10.0.0.0/40")])).unwrap_err();
        assert!(e.to_string().contains("prefix length"), "{e}");
        assert_eq!(Settings::default().nfs_listen, "127.0.0.1:11111");
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_NFS_LISTEN", "localhost")])).unwrap_err();
        assert!(e.to_string().contains("nfs_listen"), "{e}");
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_S3_REGION", "Mars 1")])).unwrap_err();
        assert!(e.to_string().contains("s3_region"), "{e}");
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_NO_SUCH_THING", "1")])).unwrap_err();
        assert!(e.to_string().contains("no_such_thing"), "{e}");
        std::fs::write(&f, "block_size = \"3KiB\"\n").unwrap();
        let e = Settings::load(Some(&f), env(&[])).unwrap_err();
        assert!(e.to_string().contains("block_size"), "{e}");
        let s = Settings::load(Some(&f), env(&[("TIDEPOOL_TIER_AFTER_SECS", "2"), ("TIDEPOOL_BLOCK_SIZE", "1MiB")]))
            .unwrap();
        assert_eq!(s.tier_after_secs, 2);
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_BUCKET", "ftp://x"), ("TIDEPOOL_BLOCK_SIZE", "1MiB")]))
            .unwrap_err();
        assert!(e.to_string().contains("unknown scheme"), "{e}");
        let e = Settings::load(Some(&f), env(&[("TIDEPOOL_EVICT_LOW", "0.95"), ("TIDEPOOL_BLOCK_SIZE", "1MiB")]))
            .unwrap_err();
        assert!(e.to_string().contains("evict_low < evict_high"), "{e}");
        let s =
            Settings::load(Some(&f), env(&[("TIDEPOOL_OBJECT_STORE", "s3://b-1/p"), ("TIDEPOOL_BLOCK_SIZE", "1MiB")]))
                .unwrap();
        assert_eq!(s.bucket.as_deref(), Some("s3://b-1/p"));
        std::fs::write(&f, "device_size = [").unwrap();
        assert!(matches!(Settings::load(Some(&f), env(&[])), Err(SettingsError::Parse { .. })));
    }

    #[test]
    fn memory_limit_is_memtotal_capped_by_cgroups() {
        let meminfo = "MemTotal:       24634772 kB\nMemFree:        1000 kB\n";
        let total = 24634772u64 * 1024;
        let files = |m: &'static [(&'static str, &'static str)]| {
            move |p: &Path| m.iter().find(|(k, _)| Path::new(k) == p).map(|(_, v)| v.to_string())
        };
        let root = Path::new("/cg");
        let none = files(&[]);
        assert_eq!(memory_limit_from(meminfo, "0::/\n", root, none), Some(total), "no limit files");
        assert_eq!(memory_limit_from("nothing", "0::/\n", root, none), None, "no MemTotal");
        // v2: the process's own cgroup, one above it, "max" for none.
        let v2 = files(&[("/cg/a/b/memory.max", "max\n"), ("/cg/a/memory.max", "8589934592\n")]);
        assert_eq!(memory_limit_from(meminfo, "0::/a/b\n", root, v2), Some(8 << 30), "a parent's limit");
        let v2root = files(&[("/cg/memory.max", "2147483648\n")]);
        assert_eq!(memory_limit_from(meminfo, "0::/\n", root, v2root), Some(2 << 30), "a namespaced container");
        assert_eq!(memory_limit_from(meminfo, "0::/x/y\n", root, v2root), Some(2 << 30), "no cgroup namespace");
        // v1: the memory controller's hierarchy; "no limit" is a huge number.
        let v1 = files(&[
            ("/cg/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/cg/memory/job/memory.limit_in_bytes", "1073741824\n"),
        ]);
        let cg = "9:name=systemd:/\n4:memory:/job\n1:cpu:/\n0::/\n";
        assert_eq!(memory_limit_from(meminfo, cg, root, v1), Some(1 << 30));
        assert_eq!(memory_limit_from(meminfo, "4:memory:/\n", root, v1), Some(total), "v1 without a limit");
        assert_eq!(memory_limit_from(meminfo, "4:memory:/../etc\n", root, v1), Some(total), "odd paths are skipped");
        // The sizes this gives (fs's rule): a quarter, within the floor and the cap.
        assert_eq!(tidepool_fs::read_cache_bytes_for(memory_limit_from(meminfo, cg, root, v1)), 256 << 20);
    }
}
