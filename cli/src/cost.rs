//! `tidepool cost`: what N instances cost a month running all day versus running H hours a
//! day and spun down to the bucket the rest of the time, from the price table in
//! `deploy/pricing.toml` (embedded; `--pricing FILE` merges over it, flags override single
//! figures), the bytes and objects actually in the bucket (listed directly: no node needs to
//! run), the requests one spin-down and one rehydrate cost, and the rehydrate time at the
//! throughput last measured (`stats/rehydrate.json` in the bucket) or an assumed one.
//!
//! The arithmetic ([`estimate`]) is a pure function of the prices, the bucket usage and the
//! arguments, so it is tested with exact figures; [`run`] gathers the inputs and prints.

mod pricing;
mod render;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tidepool_tiering::store::azure::{DEFAULT_BLOCK_SIZE_BYTES, DEFAULT_SINGLE_PUT_MAX_BYTES};
use tidepool_tiering::{BucketUrl, ObjectError, ObjectStore, S3Config, parse_bucket_url};

use crate::datadir::anyhow_free;
use crate::settings::Settings;

pub use pricing::{Cloud, InstancePrice, PriceTable, StoragePrice};
pub use render::render;

/// The default price table, `deploy/pricing.toml`.
pub const EMBEDDED_PRICING: &str = include_str!("../../deploy/pricing.toml");
const EMBEDDED_ORIGIN: &str = "embedded deploy/pricing.toml";

/// Days in the month every monthly figure is for.
pub const DAYS_PER_MONTH: f64 = 30.4;

/// The bucket object a rehydrate leaves behind: `{"bytes": u64, "secs": f64, "finished_unix": u64}`.
pub const REHYDRATE_STATS_KEY: &str = "stats/rehydrate.json";

/// Bucket prefixes that are counted (see `tiering/src/format`).
const PREFIXES: [&str; 3] = ["chunks/", "packs/", "manifests/"];

/// Manifest objects one spin-down writes (a manifest and `LATEST`) while the bucket has none
/// to count.
const ASSUMED_MANIFEST_OBJECTS: u64 = 2;

/// S3's largest number of parts in a multipart upload (the S3 backend grows parts to fit).
const S3_MAX_PARTS: u64 = 10_000;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Instance type as named in the price table (p4d.24xlarge, p5.48xlarge, i4i.4xlarge,
    /// Standard_ND96asr_v4, Standard_ND96isr_H100_v5, Standard_L16s_v3, ...).
    #[arg(long)]
    pub instance: String,
    /// Number of instances in the cluster.
    #[arg(long)]
    pub nodes: u32,
    /// Hours a day the cluster runs (0 to 24); it is spun down to the bucket the rest of the day.
    #[arg(long)]
    pub hours_per_day: f64,
    /// The bucket to measure (default: the `bucket` setting); it is listed directly.
    #[arg(long)]
    pub bucket: Option<String>,
    /// Storage price entry (s3_standard, azure_hot, ...). Default: s3_standard for an AWS
    /// instance, azure_hot for an Azure one.
    #[arg(long)]
    pub storage: Option<String>,
    /// A price table of the same shape as deploy/pricing.toml, merged over the embedded one.
    #[arg(long)]
    pub pricing: Option<PathBuf>,
    /// Override the instance's price per hour.
    #[arg(long)]
    pub hourly_usd: Option<f64>,
    /// Override the storage price per GB (10^9 bytes) a month.
    #[arg(long)]
    pub gb_month_usd: Option<f64>,
    /// Override the price of 1,000 PUT (write) requests.
    #[arg(long)]
    pub put_per_1000_usd: Option<f64>,
    /// Override the price of 1,000 GET (read) requests.
    #[arg(long)]
    pub get_per_1000_usd: Option<f64>,
    /// Fraction of the bucket's data bytes written again each day (uploaded by the day's
    /// write-back and spin-down), when not measured.
    #[arg(long, default_value_t = 0.1)]
    pub churn: f64,
    /// Rehydrate throughput per node in MB/s (10^6 bytes) assumed while none was measured.
    #[arg(long, default_value_t = 1000.0)]
    pub assume_mbps: f64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("bad pricing file {origin}: {message}")]
    Pricing { origin: String, message: String },
    #[error("cannot read pricing file path={path}: {source}")]
    ReadPricing {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown instance {name:?}; known (add others with --pricing FILE): {known}")]
    UnknownInstance { name: String, known: String },
    #[error("unknown storage {name:?}; known (add others with --pricing FILE): {known}")]
    UnknownStorage { name: String, known: String },
    #[error("invalid --{arg}={value}: {reason}")]
    Invalid { arg: &'static str, value: String, reason: &'static str },
    #[error("no bucket folder at {path} (a file:// bucket is read, never created, by tidepool cost)")]
    NoBucketFolder { path: String },
    #[error("cannot {what} in bucket {url}: {source}")]
    Bucket {
        what: &'static str,
        url: String,
        #[source]
        source: ObjectError,
    },
}

// ---------------------------------------------------------------------------------------
// Inputs and the arithmetic
// ---------------------------------------------------------------------------------------

/// Bytes and objects under one prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: u64,
    pub objects: u64,
}

impl Usage {
    fn add(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.objects += 1;
    }
}

/// What a listing of the bucket found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketUsage {
    pub chunks: Usage,
    pub packs: Usage,
    pub manifests: Usage,
    /// Sizes of the objects one spin-down writes and a rehydrate reads: the newest manifest
    /// epoch's root and parts, and `LATEST` (older epochs only cost storage). A large manifest
    /// object is uploaded in several requests.
    pub last_manifest_sizes: Vec<u64>,
}

/// The epoch of a manifest object (`manifests/<epoch:020>.tpm` or `.tpm.p<NNNNN>`), as the
/// manifest writer names them; `None` for `LATEST` and anything else.
fn manifest_epoch(key: &str) -> Option<u64> {
    let name = key.strip_prefix("manifests/")?;
    let digits = name.get(..20)?;
    if !name[20..].starts_with(".tpm") || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `stats/rehydrate.json`: the last rehydrate's bytes and duration (aggregate, whole cluster).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RehydrateStats {
    pub bytes: u64,
    pub secs: f64,
    pub finished_unix: u64,
}

/// The last measured rehydrate: none, usable, or present but unusable (why).
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    None,
    Stats(RehydrateStats),
    Unusable(String),
}

/// Everything [`estimate`] needs; prices already carry the flag overrides.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub instance_name: String,
    pub instance: InstancePrice,
    pub storage_name: String,
    pub storage: StoragePrice,
    pub as_of: String,
    pub basis: String,
    pub pricing_origin: String,
    pub bucket_url: String,
    pub nodes: u32,
    pub hours_per_day: f64,
    pub churn: f64,
    pub assume_mbps: f64,
    /// The `block_size` setting: one ranged GET per block on rehydrate.
    pub block_size_bytes: u64,
    /// The `chunk_object_size` setting: the size of the objects spin-down writes.
    pub object_size_bytes: u64,
    pub usage: BucketUsage,
    pub measured: Measured,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub instance: String,
    pub cloud: Cloud,
    pub instance_description: String,
    pub gpus_per_node: u32,
    pub nvme_bytes_per_node: u64,
    pub storage: String,
    pub storage_description: String,
    pub prices: Prices,
    pub nodes: u32,
    pub hours_per_day: f64,
    pub days_per_month: f64,
    pub bucket: BucketReport,
    pub always_on: Column,
    pub spun_down: Column,
    pub savings_monthly_usd: f64,
    pub savings_percent: f64,
    pub requests: Requests,
    pub rehydrate: Rehydrate,
}

/// The prices used (after `--pricing` and the flags).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prices {
    pub as_of: String,
    pub basis: String,
    pub source: String,
    pub hourly_usd: f64,
    pub gb_month_usd: f64,
    pub put_per_1000_usd: f64,
    pub get_per_1000_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketReport {
    pub url: String,
    pub chunks: Usage,
    pub packs: Usage,
    pub manifests: Usage,
    /// Chunks and packs: what a rehydrate brings back.
    pub data_bytes: u64,
    pub bytes: u64,
    pub objects: u64,
    /// Paid whether the cluster runs or not.
    pub storage_monthly_usd: f64,
}

/// One way of running the cluster, per month.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Column {
    pub instance_hours: f64,
    pub instances_monthly_usd: f64,
    pub storage_monthly_usd: f64,
    pub requests_monthly_usd: f64,
    pub total_monthly_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Requests {
    /// One spin-down and one rehydrate a day while 0 < hours_per_day < 24, else none.
    pub cycles_per_month: f64,
    pub spin_down: SpinDown,
    pub rehydrate: RehydrateRequests,
    pub cycle_usd: f64,
    pub monthly_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpinDown {
    pub churn: f64,
    /// churn x data bytes: written (and uploaded) per day.
    pub dirty_bytes: u64,
    pub object_size_bytes: u64,
    pub data_objects: u64,
    /// The newest manifest's objects and LATEST in the bucket, or assumed (a manifest and
    /// LATEST) while there are none.
    pub manifest_objects: u64,
    pub manifest_objects_assumed: bool,
    /// Single PUTs, or multipart / staged-block uploads at several requests each.
    pub put_requests_per_cycle: u64,
    pub put_requests_per_month: f64,
    pub cycle_usd: f64,
    pub monthly_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RehydrateRequests {
    pub bytes: u64,
    pub block_size_bytes: u64,
    pub block_gets: u64,
    pub manifest_gets: u64,
    pub get_requests_per_cycle: u64,
    pub get_requests_per_month: f64,
    pub cycle_usd: f64,
    pub monthly_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rehydrate {
    /// Data bytes, at most what the cluster's NVMe holds (the rest stays cold).
    pub bytes: u64,
    pub cluster_nvme_bytes: u64,
    pub capped_by_nvme: bool,
    pub throughput_bytes_per_sec: f64,
    /// `measured` (stats/rehydrate.json) or `assumed` (--assume-mbps x nodes).
    pub throughput_source: &'static str,
    pub measured: Option<RehydrateStats>,
    /// Why the throughput is assumed, when it is.
    pub note: Option<String>,
    pub secs: f64,
}

/// Requests one upload of `size` bytes costs on `cloud`'s object store, as the tiering
/// backends upload: S3 a single PUT below the multipart threshold, else create + parts +
/// complete; Azure a single Put Blob up to its limit, else the staged blocks + Put Block List.
pub fn put_requests(cloud: Cloud, size: u64) -> u64 {
    match cloud {
        Cloud::Aws => {
            let c = S3Config::new("", "");
            if size < c.multipart_threshold_bytes {
                1
            } else {
                let part = c.part_size_bytes.max(size.div_ceil(S3_MAX_PARTS));
                size.div_ceil(part) + 2
            }
        }
        Cloud::Azure => {
            if size <= DEFAULT_SINGLE_PUT_MAX_BYTES {
                1
            } else {
                size.div_ceil(DEFAULT_BLOCK_SIZE_BYTES) + 1
            }
        }
    }
}

/// The monthly figures. Pure: every input is in `i`.
pub fn estimate(i: &Inputs) -> Report {
    let days = DAYS_PER_MONTH;
    let nodes = f64::from(i.nodes);
    let u = &i.usage;
    let data_bytes = u.chunks.bytes + u.packs.bytes;
    let bucket_bytes = data_bytes + u.manifests.bytes;
    let bucket_objects = u.chunks.objects + u.packs.objects + u.manifests.objects;
    let storage_monthly_usd = bucket_bytes as f64 / 1e9 * i.storage.gb_month_usd;
    let cycles_per_month = if i.hours_per_day > 0.0 && i.hours_per_day < 24.0 { days } else { 0.0 };

    // Spin-down: the day's dirty data in full-size objects, then the manifest objects.
    let dirty_bytes = (i.churn * data_bytes as f64).round() as u64;
    let object = i.object_size_bytes.max(1);
    let (full, rest) = (dirty_bytes / object, dirty_bytes % object);
    let data_objects = full + u64::from(rest > 0);
    let data_puts =
        full * put_requests(i.storage.cloud, object) + if rest > 0 { put_requests(i.storage.cloud, rest) } else { 0 };
    let manifest_objects_assumed = u.last_manifest_sizes.is_empty();
    let (manifest_objects, manifest_puts) = if manifest_objects_assumed {
        (ASSUMED_MANIFEST_OBJECTS, ASSUMED_MANIFEST_OBJECTS)
    } else {
        let sizes = &u.last_manifest_sizes;
        (sizes.len() as u64, sizes.iter().map(|&s| put_requests(i.storage.cloud, s)).sum())
    };
    let puts = data_puts + manifest_puts;
    let put_cycle_usd = puts as f64 / 1000.0 * i.storage.put_per_1000_usd;

    // Rehydrate: the data bytes, up to the cluster's NVMe, one ranged GET per block; the
    // manifest objects whole.
    let cluster_nvme_bytes = u64::from(i.nodes).saturating_mul(i.instance.nvme_bytes);
    let rehydrate_bytes = data_bytes.min(cluster_nvme_bytes);
    let block_gets = rehydrate_bytes.div_ceil(i.block_size_bytes.max(1));
    let gets = block_gets + manifest_objects;
    let get_cycle_usd = gets as f64 / 1000.0 * i.storage.get_per_1000_usd;
    let requests_monthly_usd = (put_cycle_usd + get_cycle_usd) * cycles_per_month;

    let column = |hours_per_day: f64, requests_monthly_usd: f64| {
        let instance_hours = nodes * hours_per_day * days;
        let instances_monthly_usd = instance_hours * i.instance.hourly_usd;
        Column {
            instance_hours,
            instances_monthly_usd,
            storage_monthly_usd,
            requests_monthly_usd,
            total_monthly_usd: instances_monthly_usd + storage_monthly_usd + requests_monthly_usd,
        }
    };
    let always_on = column(24.0, 0.0);
    let spun_down = column(i.hours_per_day, requests_monthly_usd);
    let savings_monthly_usd = always_on.total_monthly_usd - spun_down.total_monthly_usd;
    let savings_percent =
        if always_on.total_monthly_usd > 0.0 { savings_monthly_usd / always_on.total_monthly_usd * 100.0 } else { 0.0 };

    let assumed = |why: String| (i.assume_mbps * 1e6 * nodes, "assumed", None, Some(why));
    let (throughput_bytes_per_sec, throughput_source, measured, note) = match &i.measured {
        Measured::Stats(s) => (s.bytes as f64 / s.secs, "measured", Some(*s), None),
        Measured::None => assumed(format!(
            "not measured yet (no {REHYDRATE_STATS_KEY} in the bucket): assuming {} MB/s per node x {}",
            i.assume_mbps, i.nodes
        )),
        Measured::Unusable(why) => assumed(format!(
            "{REHYDRATE_STATS_KEY} is unusable ({why}): assuming {} MB/s per node x {}",
            i.assume_mbps, i.nodes
        )),
    };
    let secs = if throughput_bytes_per_sec > 0.0 { rehydrate_bytes as f64 / throughput_bytes_per_sec } else { 0.0 };

    Report {
        instance: i.instance_name.clone(),
        cloud: i.instance.cloud,
        instance_description: i.instance.description.clone(),
        gpus_per_node: i.instance.gpus,
        nvme_bytes_per_node: i.instance.nvme_bytes,
        storage: i.storage_name.clone(),
        storage_description: i.storage.description.clone(),
        prices: Prices {
            as_of: i.as_of.clone(),
            basis: i.basis.clone(),
            source: i.pricing_origin.clone(),
            hourly_usd: i.instance.hourly_usd,
            gb_month_usd: i.storage.gb_month_usd,
            put_per_1000_usd: i.storage.put_per_1000_usd,
            get_per_1000_usd: i.storage.get_per_1000_usd,
        },
        nodes: i.nodes,
        hours_per_day: i.hours_per_day,
        days_per_month: days,
        bucket: BucketReport {
            url: i.bucket_url.clone(),
            chunks: u.chunks,
            packs: u.packs,
            manifests: u.manifests,
            data_bytes,
            bytes: bucket_bytes,
            objects: bucket_objects,
            storage_monthly_usd,
        },
        always_on,
        spun_down,
        savings_monthly_usd,
        savings_percent,
        requests: Requests {
            cycles_per_month,
            spin_down: SpinDown {
                churn: i.churn,
                dirty_bytes,
                object_size_bytes: i.object_size_bytes,
                data_objects,
                manifest_objects,
                manifest_objects_assumed,
                put_requests_per_cycle: puts,
                put_requests_per_month: puts as f64 * cycles_per_month,
                cycle_usd: put_cycle_usd,
                monthly_usd: put_cycle_usd * cycles_per_month,
            },
            rehydrate: RehydrateRequests {
                bytes: rehydrate_bytes,
                block_size_bytes: i.block_size_bytes,
                block_gets,
                manifest_gets: manifest_objects,
                get_requests_per_cycle: gets,
                get_requests_per_month: gets as f64 * cycles_per_month,
                cycle_usd: get_cycle_usd,
                monthly_usd: get_cycle_usd * cycles_per_month,
            },
            cycle_usd: put_cycle_usd + get_cycle_usd,
            monthly_usd: requests_monthly_usd,
        },
        rehydrate: Rehydrate {
            bytes: rehydrate_bytes,
            cluster_nvme_bytes,
            capped_by_nvme: data_bytes > cluster_nvme_bytes,
            throughput_bytes_per_sec,
            throughput_source,
            measured,
            note,
            secs,
        },
    }
}

// ---------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------

fn invalid(arg: &'static str, value: impl ToString, reason: &'static str) -> CostError {
    CostError::Invalid { arg, value: value.to_string(), reason }
}

/// The arguments' own checks, before any price or bucket is looked at.
pub fn check_args(a: &Args) -> Result<(), CostError> {
    if a.nodes == 0 {
        return Err(invalid("nodes", a.nodes, "a cluster has at least 1 node"));
    }
    if !(0.0..=24.0).contains(&a.hours_per_day) {
        return Err(invalid("hours-per-day", a.hours_per_day, "must be between 0 and 24"));
    }
    if !(a.churn.is_finite() && a.churn >= 0.0) {
        return Err(invalid("churn", a.churn, "must be a fraction of at least 0 (0.1: a tenth of the data a day)"));
    }
    if !(a.assume_mbps.is_finite() && a.assume_mbps > 0.0) {
        return Err(invalid("assume-mbps", a.assume_mbps, "must be above 0"));
    }
    let prices = [
        ("hourly-usd", a.hourly_usd),
        ("gb-month-usd", a.gb_month_usd),
        ("put-per-1000-usd", a.put_per_1000_usd),
        ("get-per-1000-usd", a.get_per_1000_usd),
    ];
    for (arg, v) in prices {
        if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(invalid(arg, v, "must be a price of at least 0"));
        }
    }
    Ok(())
}

/// The table, the instance and the storage the arguments name, with the flags applied.
pub fn select_prices(a: &Args, table: &PriceTable) -> Result<(InstancePrice, String, StoragePrice), CostError> {
    let mut instance = table.instance(&a.instance)?.clone();
    let storage_name = a.storage.clone().unwrap_or_else(|| instance.cloud.default_storage().to_owned());
    let mut storage = table.storage(&storage_name)?.clone();
    if let Some(v) = a.hourly_usd {
        instance.hourly_usd = v;
    }
    if let Some(v) = a.gb_month_usd {
        storage.gb_month_usd = v;
    }
    if let Some(v) = a.put_per_1000_usd {
        storage.put_per_1000_usd = v;
    }
    if let Some(v) = a.get_per_1000_usd {
        storage.get_per_1000_usd = v;
    }
    Ok((instance, storage_name, storage))
}

/// Sum sizes and count objects under each counted prefix.
pub async fn measure(store: &dyn ObjectStore) -> Result<BucketUsage, ObjectError> {
    let mut usage = BucketUsage::default();
    let mut manifests = Vec::new();
    for prefix in PREFIXES {
        let mut next = None;
        loop {
            let page = store.list(prefix, next, 1000).await?;
            for o in &page.objects {
                match prefix {
                    "chunks/" => usage.chunks.add(o.size_bytes),
                    "packs/" => usage.packs.add(o.size_bytes),
                    _ => {
                        usage.manifests.add(o.size_bytes);
                        manifests.push((manifest_epoch(&o.key), o.size_bytes));
                    }
                }
            }
            match page.next {
                Some(n) => next = Some(n),
                None => break,
            }
        }
    }
    let newest = manifests.iter().filter_map(|(e, _)| *e).max();
    usage.last_manifest_sizes =
        manifests.into_iter().filter(|(e, _)| e.is_none() || *e == newest).map(|(_, size)| size).collect();
    Ok(usage)
}

/// `stats/rehydrate.json`, if a rehydrate left one.
pub async fn read_measured(store: &dyn ObjectStore) -> Result<Measured, ObjectError> {
    let body = match store.get(REHYDRATE_STATS_KEY, None).await {
        Ok(b) => b,
        Err(ObjectError::NotFound(_)) => return Ok(Measured::None),
        Err(e) => return Err(e),
    };
    Ok(match serde_json::from_slice::<RehydrateStats>(&body) {
        Err(e) => Measured::Unusable(format!("not the expected JSON: {e}")),
        Ok(s) if !(s.secs.is_finite() && s.secs > 0.0) || s.bytes == 0 => {
            Measured::Unusable(format!("no throughput in it bytes={} secs={}", s.bytes, s.secs))
        }
        Ok(s) => Measured::Stats(s),
    })
}

pub async fn run(mut settings: Settings, a: Args) -> anyhow_free::Result<()> {
    check_args(&a)?;
    let table = match &a.pricing {
        None => PriceTable::embedded()?,
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|source| CostError::ReadPricing { path: p.display().to_string(), source })?;
            PriceTable::with_override(&p.display().to_string(), &text)?
        }
    };
    let (instance, storage_name, storage) = select_prices(&a, &table)?;

    if let Some(b) = &a.bucket {
        parse_bucket_url(b)?;
        settings.bucket = Some(b.clone());
    }
    let url = settings.bucket_url();
    if let BucketUrl::File(path) = parse_bucket_url(&url)?
        && !path.is_dir()
    {
        return Err(CostError::NoBucketFolder { path: path.display().to_string() }.into());
    }
    let store = crate::bucket::wrap(&settings, crate::bucket::open_backend(&settings).await?);
    let bucket_err = |what: &'static str, source| CostError::Bucket { what, url: url.clone(), source };
    let usage = measure(&*store).await.map_err(|e| bucket_err("list objects", e))?;
    let measured = read_measured(&*store).await.map_err(|e| bucket_err("read stats/rehydrate.json", e))?;

    let inputs = Inputs {
        bucket_url: url,
        instance_name: a.instance.clone(),
        instance,
        storage_name,
        storage,
        as_of: table.as_of,
        basis: table.basis,
        pricing_origin: table.origin,
        nodes: a.nodes,
        hours_per_day: a.hours_per_day,
        churn: a.churn,
        assume_mbps: a.assume_mbps,
        block_size_bytes: settings.block_size.0,
        object_size_bytes: settings.chunk_object_size.0,
        usage,
        measured,
    };
    let report = estimate(&inputs);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
