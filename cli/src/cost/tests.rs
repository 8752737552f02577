use super::render::{bytes, duration, fmt_num, ibytes, price, usd};
use super::*;

use tidepool_tiering::LocalStore;

const MIB: u64 = 1 << 20;

/// Equal up to float rounding (relative 1e-12).
#[track_caller]
fn close(got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "got {got}, want {want}");
}

fn small_inputs() -> Inputs {
    Inputs {
        instance_name: "gpu.test".into(),
        instance: InstancePrice {
            cloud: Cloud::Aws,
            hourly_usd: 2.0,
            nvme_bytes: 1_000_000_000_000,
            gpus: 8,
            description: String::new(),
        },
        storage_name: "s3_standard".into(),
        storage: StoragePrice {
            cloud: Cloud::Aws,
            gb_month_usd: 0.02,
            put_per_1000_usd: 0.005,
            get_per_1000_usd: 0.0004,
            description: String::new(),
        },
        as_of: "test".into(),
        basis: "test".into(),
        pricing_origin: "test".into(),
        bucket_url: "file:///nowhere".into(),
        nodes: 3,
        hours_per_day: 8.0,
        churn: 0.1,
        assume_mbps: 1000.0,
        block_size_bytes: 4 * MIB,
        object_size_bytes: 64 * MIB,
        usage: BucketUsage {
            chunks: Usage { bytes: 10_000_000_000, objects: 100 },
            packs: Usage { bytes: 2_000_000_000, objects: 10 },
            manifests: Usage { bytes: 1_000_000, objects: 1 },
            last_manifest_sizes: vec![1_000_000],
        },
        measured: Measured::Stats(RehydrateStats { bytes: 6_000_000_000, secs: 3.0, finished_unix: 1_700_000_000 }),
    }
}

#[test]
fn the_arithmetic_with_exact_figures() {
    let r = estimate(&small_inputs());
    // Instances: 3 x $2/h x 24 h (or 8 h) x 30.4 days.
    close(r.always_on.instance_hours, 3.0 * 24.0 * 30.4);
    close(r.always_on.instances_monthly_usd, 4377.6);
    close(r.spun_down.instances_monthly_usd, 1459.2);
    // The bucket: 12.001 GB x $0.02, in both columns.
    assert_eq!((r.bucket.data_bytes, r.bucket.bytes, r.bucket.objects), (12_000_000_000, 12_001_000_000, 111));
    close(r.bucket.storage_monthly_usd, 0.24002);
    close(r.always_on.storage_monthly_usd, 0.24002);
    close(r.spun_down.storage_monthly_usd, 0.24002);
    // Spin-down: 10 % of 12 GB = 1.2 GB dirty = 17 full 64 MiB objects + 59,149,312 bytes;
    // each is a multipart upload (16 MiB threshold) of 8 parts of 8 MiB + create + complete:
    // 18 x 10 PUTs, plus the one small manifest object.
    let s = &r.requests.spin_down;
    assert_eq!(s.dirty_bytes, 1_200_000_000);
    assert_eq!((s.data_objects, s.manifest_objects, s.manifest_objects_assumed), (18, 1, false));
    assert_eq!(s.put_requests_per_cycle, 181);
    close(s.cycle_usd, 0.181 * 0.005);
    close(s.put_requests_per_month, 181.0 * 30.4);
    // Rehydrate: 12 GB in 4 MiB blocks = 2,862 ranged GETs, plus the manifest.
    let g = &r.requests.rehydrate;
    assert_eq!((g.bytes, g.block_gets, g.manifest_gets, g.get_requests_per_cycle), (12_000_000_000, 2862, 1, 2863));
    close(g.cycle_usd, 2.863 * 0.0004);
    close(r.requests.cycles_per_month, 30.4);
    close(r.requests.monthly_usd, (0.000905 + 0.0011452) * 30.4);
    close(r.spun_down.requests_monthly_usd, 0.06232608);
    assert_eq!(r.always_on.requests_monthly_usd, 0.0);
    close(r.always_on.total_monthly_usd, 4377.6 + 0.24002);
    close(r.spun_down.total_monthly_usd, 1459.2 + 0.24002 + 0.06232608);
    close(r.savings_monthly_usd, 4377.6 - 1459.2 - 0.06232608);
    close(r.savings_percent, (4377.6 - 1459.2 - 0.06232608) / (4377.6 + 0.24002) * 100.0);
    // Rehydrate time: 12 GB at the measured 6 GB / 3 s.
    let h = &r.rehydrate;
    assert_eq!((h.throughput_source, h.capped_by_nvme, h.cluster_nvme_bytes), ("measured", false, 3_000_000_000_000));
    close(h.throughput_bytes_per_sec, 2e9);
    close(h.secs, 6.0);
    assert!(h.note.is_none());
}

#[test]
fn assumed_throughput_nvme_cap_and_the_edges_of_the_day() {
    let mut i = small_inputs();
    i.nodes = 2;
    i.instance.nvme_bytes = 5_000_000_000;
    i.measured = Measured::None;
    i.usage.manifests = Usage::default();
    i.usage.last_manifest_sizes.clear();
    let r = estimate(&i);
    // 12 GB of data, 10 GB of NVMe: the rehydrate stops at 10 GB; 2 x 1000 MB/s assumed.
    let h = &r.rehydrate;
    assert_eq!((h.bytes, h.capped_by_nvme, h.throughput_source), (10_000_000_000, true, "assumed"));
    close(h.throughput_bytes_per_sec, 2e9);
    close(h.secs, 5.0);
    assert!(h.note.as_deref().unwrap().contains("not measured yet"), "{:?}", h.note);
    // No manifest in the bucket yet: a manifest and LATEST assumed.
    let s = &r.requests.spin_down;
    assert_eq!((s.manifest_objects, s.manifest_objects_assumed, s.put_requests_per_cycle), (2, true, 182));
    assert_eq!(r.requests.rehydrate.get_requests_per_cycle, 10_000_000_000u64.div_ceil(4 * MIB) + 2);

    // Running all day: no spin-down, nothing saved.
    i.hours_per_day = 24.0;
    let r = estimate(&i);
    assert_eq!((r.requests.cycles_per_month, r.requests.monthly_usd, r.savings_monthly_usd), (0.0, 0.0, 0.0));
    assert_eq!(r.always_on, r.spun_down);
    // Never running: only the bucket is paid.
    i.hours_per_day = 0.0;
    let r = estimate(&i);
    assert_eq!((r.spun_down.instances_monthly_usd, r.requests.monthly_usd), (0.0, 0.0));
    close(r.spun_down.total_monthly_usd, 0.24);
    // Nothing to pay at all: no division by zero.
    i.instance.hourly_usd = 0.0;
    i.usage = BucketUsage::default();
    let r = estimate(&i);
    assert_eq!((r.savings_monthly_usd, r.savings_percent, r.rehydrate.secs), (0.0, 0.0, 0.0));

    // A stats object that says nothing usable: assumed, and the note says why.
    i.measured = Measured::Unusable("no throughput in it bytes=0 secs=0".into());
    let note = estimate(&i).rehydrate.note.unwrap();
    assert!(note.contains("unusable") && note.contains("bytes=0"), "{note}");
}

#[test]
fn put_requests_follow_the_backends() {
    assert_eq!(put_requests(Cloud::Aws, 0), 1);
    assert_eq!(put_requests(Cloud::Aws, 16 * MIB - 1), 1);
    assert_eq!(put_requests(Cloud::Aws, 16 * MIB), 2 + 2);
    assert_eq!(put_requests(Cloud::Aws, 64 * MIB), 8 + 2);
    // Parts grow past 8 MiB so that a huge object fits 10,000 parts.
    assert_eq!(put_requests(Cloud::Aws, 100_000_000_000), 10_000 + 2);
    assert_eq!(put_requests(Cloud::Azure, 16 * MIB), 1);
    assert_eq!(put_requests(Cloud::Azure, 16 * MIB + 1), 3 + 1);
    assert_eq!(put_requests(Cloud::Azure, 64 * MIB), 8 + 1);
}

#[test]
fn the_embedded_table_parses_and_has_the_required_entries() {
    let t = PriceTable::embedded().unwrap();
    assert!(!t.as_of.is_empty() && t.basis.contains("list prices"), "{} / {}", t.as_of, t.basis);
    let mut required = vec![
        ("p4d.24xlarge", Cloud::Aws, 8),
        ("p5.48xlarge", Cloud::Aws, 8),
        ("Standard_ND96asr_v4", Cloud::Azure, 8),
        ("Standard_ND96isr_H100_v5", Cloud::Azure, 8),
    ];
    for size in ["large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "32xlarge"] {
        required.push((Box::leak(format!("i4i.{size}").into_boxed_str()), Cloud::Aws, 0));
    }
    for size in [8, 16, 32, 48, 64, 80] {
        required.push((Box::leak(format!("Standard_L{size}s_v3").into_boxed_str()), Cloud::Azure, 0));
    }
    for (name, cloud, gpus) in required {
        let p = t.instance(name).unwrap();
        assert_eq!((p.cloud, p.gpus), (cloud, gpus), "{name}");
        assert!(p.hourly_usd > 0.0 && p.nvme_bytes > 100_000_000_000 && !p.description.is_empty(), "{name}: {p:?}");
    }
    for (name, cloud) in [("s3_standard", Cloud::Aws), ("azure_hot", Cloud::Azure)] {
        let s = t.storage(name).unwrap();
        assert_eq!(s.cloud, cloud);
        assert!(s.gb_month_usd > 0.0 && s.put_per_1000_usd > 0.0 && s.get_per_1000_usd > 0.0, "{name}: {s:?}");
        // Writes cost more than reads on both clouds.
        assert!(s.put_per_1000_usd > s.get_per_1000_usd, "{name}");
    }
    // Bigger i4i sizes cost more and hold more.
    let i4i = |s: &str| t.instance(&format!("i4i.{s}")).unwrap().clone();
    assert!(i4i("32xlarge").hourly_usd > i4i("large").hourly_usd);
    assert_eq!(i4i("32xlarge").nvme_bytes, 8 * i4i("4xlarge").nvme_bytes);
}

#[test]
fn a_pricing_file_merges_over_the_embedded_table() {
    let text = r#"
as_of = "2031-01"

[instances."p4d.24xlarge"]
hourly_usd = 20.5

[instances.my-box]
cloud = "azure"
hourly_usd = 3
nvme_bytes = 2_000_000_000_000
gpus = 1

[storage.azure_hot]
gb_month_usd = 0.01

[storage.minio]
cloud = "aws"
gb_month_usd = 0.005
put_per_1000_usd = 0
get_per_1000_usd = 0
"#;
    let embedded = PriceTable::embedded().unwrap();
    let t = PriceTable::with_override("mine.toml", text).unwrap();
    assert_eq!(t.as_of, "2031-01");
    assert_eq!(t.basis, embedded.basis);
    assert_eq!(t.origin, "embedded deploy/pricing.toml + mine.toml");
    // Only the figure given changed.
    let p4d = t.instance("p4d.24xlarge").unwrap();
    assert_eq!(p4d.hourly_usd, 20.5);
    assert_eq!(
        (p4d.nvme_bytes, p4d.gpus, &p4d.description),
        (8_000_000_000_000, 8, &embedded.instance("p4d.24xlarge").unwrap().description)
    );
    // New entries are added (an integer price is a price); the rest is untouched.
    assert_eq!(t.instance("my-box").unwrap().hourly_usd, 3.0);
    assert_eq!(t.instances.len(), embedded.instances.len() + 1);
    assert_eq!(t.instance("p5.48xlarge").unwrap(), embedded.instance("p5.48xlarge").unwrap());
    let hot = t.storage("azure_hot").unwrap();
    assert_eq!(
        (hot.gb_month_usd, hot.put_per_1000_usd),
        (0.01, embedded.storage("azure_hot").unwrap().put_per_1000_usd)
    );
    assert_eq!(t.storage("minio").unwrap().put_per_1000_usd, 0.0);
}

#[test]
fn bad_pricing_files_are_refused_with_the_reason() {
    let err = |text: &str| PriceTable::with_override("bad.toml", text).unwrap_err().to_string();
    let e = err("[instances.x\nhourly_usd = 1");
    assert!(e.starts_with("bad pricing file bad.toml: ") && e.contains("line 1"), "{e}");
    let e = err("[instances.new]\nhourly_usd = 1\n");
    assert!(e.contains("[instances.\"new\"]") && e.contains("missing field `cloud`"), "{e}");
    let e = err("[instances.\"p5.48xlarge\"]\nhourly = 1\n");
    assert!(e.contains("unknown field `hourly`"), "{e}");
    let e = err("[instances.\"p5.48xlarge\"]\ncloud = \"gcp\"\n");
    assert!(e.contains("unknown variant `gcp`"), "{e}");
    let e = err("[storage.s3_standard]\nget_per_1000_usd = -1\n");
    assert!(e.contains("get_per_1000_usd must be a price of at least 0"), "{e}");
    let e = err("currency = \"EUR\"\n");
    assert!(e.contains("unknown key currency"), "{e}");
    let e = err("instances = 3\n");
    assert!(e.contains("instances must be a table"), "{e}");
    let e = err("[instances]\nfoo = 3\n");
    assert!(e.contains("[instances.foo] must be a table"), "{e}");
}

fn args(instance: &str) -> Args {
    Args {
        instance: instance.into(),
        nodes: 2,
        hours_per_day: 8.0,
        bucket: None,
        storage: None,
        pricing: None,
        hourly_usd: None,
        gb_month_usd: None,
        put_per_1000_usd: None,
        get_per_1000_usd: None,
        churn: 0.1,
        assume_mbps: 1000.0,
        json: false,
    }
}

#[test]
fn instance_storage_and_flag_overrides() {
    let t = PriceTable::embedded().unwrap();
    let e = select_prices(&args("p9.huge"), &t).unwrap_err().to_string();
    assert!(e.starts_with("unknown instance \"p9.huge\"") && e.contains("p4d.24xlarge, p5.48xlarge"), "{e}");
    // The storage follows the instance's cloud unless named.
    assert_eq!(select_prices(&args("p5.48xlarge"), &t).unwrap().1, "s3_standard");
    assert_eq!(select_prices(&args("Standard_L8s_v3"), &t).unwrap().1, "azure_hot");
    let mut a = args("Standard_L8s_v3");
    a.storage = Some("glacier".into());
    let e = select_prices(&a, &t).unwrap_err().to_string();
    assert!(e.contains("unknown storage \"glacier\"") && e.contains("azure_hot, s3_standard"), "{e}");
    a.storage = Some("s3_standard".into());
    (a.hourly_usd, a.gb_month_usd, a.put_per_1000_usd, a.get_per_1000_usd) =
        (Some(1.5), Some(0.1), Some(0.2), Some(0.3));
    let (i, name, s) = select_prices(&a, &t).unwrap();
    assert_eq!(
        (i.hourly_usd, name.as_str(), s.gb_month_usd, s.put_per_1000_usd, s.get_per_1000_usd),
        (1.5, "s3_standard", 0.1, 0.2, 0.3)
    );
}

#[test]
fn bad_arguments_are_refused() {
    let e = |f: &dyn Fn(&mut Args)| {
        let mut a = args("p4d.24xlarge");
        f(&mut a);
        check_args(&a).unwrap_err().to_string()
    };
    assert!(check_args(&args("x")).is_ok());
    assert_eq!(e(&|a| a.nodes = 0), "invalid --nodes=0: a cluster has at least 1 node");
    assert_eq!(e(&|a| a.hours_per_day = 24.5), "invalid --hours-per-day=24.5: must be between 0 and 24");
    assert_eq!(e(&|a| a.hours_per_day = -1.0), "invalid --hours-per-day=-1: must be between 0 and 24");
    assert!(e(&|a| a.hours_per_day = f64::NAN).starts_with("invalid --hours-per-day=NaN"));
    assert!(e(&|a| a.churn = -0.1).starts_with("invalid --churn=-0.1"));
    assert!(e(&|a| a.assume_mbps = 0.0).starts_with("invalid --assume-mbps=0"));
    assert!(e(&|a| a.put_per_1000_usd = Some(-1.0)).starts_with("invalid --put-per-1000-usd=-1"));
    for h in [0.0, 8.5, 24.0] {
        let mut a = args("x");
        a.hours_per_day = h;
        assert!(check_args(&a).is_ok(), "{h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_is_measured_by_listing() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().to_path_buf()).unwrap();
    assert_eq!(measure(&store).await.unwrap(), BucketUsage::default());
    assert_eq!(read_measured(&store).await.unwrap(), Measured::None);
    // Objects outside the counted prefixes are not counted.
    let objects = [
        ("chunks/01/a", 300),
        ("chunks/02/b", 700),
        ("packs/03/c", 50),
        ("manifests/00000000000000000001.tpm", 10),
        ("manifests/00000000000000000002.tpm", 20),
        ("manifests/00000000000000000002.tpm.p00000", 30),
        ("manifests/LATEST", 7),
    ];
    for (key, len) in objects {
        store.put(key, vec![0u8; len].into()).await.unwrap();
    }
    store.put("other/x", b"12345".as_slice().into()).await.unwrap();
    let u = measure(&store).await.unwrap();
    assert_eq!(u.chunks, Usage { bytes: 1000, objects: 2 });
    assert_eq!(u.packs, Usage { bytes: 50, objects: 1 });
    // Every manifest object is stored; one cycle writes the newest epoch's and LATEST.
    assert_eq!((u.manifests, u.last_manifest_sizes), (Usage { bytes: 67, objects: 4 }, vec![20, 30, 7]));
    assert_eq!(manifest_epoch("manifests/00000000000000000002.tpm.p00000"), Some(2));
    assert_eq!(manifest_epoch("manifests/LATEST"), None);

    let stats = |body: &'static [u8]| {
        let store = store.clone();
        async move {
            store.put(REHYDRATE_STATS_KEY, body.into()).await.unwrap();
            read_measured(&store).await.unwrap()
        }
    };
    assert_eq!(
        stats(br#"{"bytes": 1000, "secs": 0.5, "finished_unix": 17}"#).await,
        Measured::Stats(RehydrateStats { bytes: 1000, secs: 0.5, finished_unix: 17 })
    );
    assert!(matches!(stats(b"{").await, Measured::Unusable(m) if m.contains("not the expected JSON")));
    assert!(
        matches!(stats(br#"{"bytes": 1000, "secs": 0, "finished_unix": 17}"#).await, Measured::Unusable(m) if m.contains("secs=0"))
    );
}

#[test]
fn the_table_reads_well() {
    let r = estimate(&small_inputs());
    let t = render(&r);
    for want in [
        "3 x gpu.test (aws, 8 GPUs, 1.00 TB NVMe each) at $2/h; storage s3_standard at $0.02/GB-month, $0.005 / $0.0004 per 1,000 PUT / GET",
        "always on",
        "8 h/day, spun down",
        "$4,377.84",
        "$1,459.50",
        "savings",
        "(66.7 %)",
        "1.20 GB dirty -> 18 objects of up to 64 MiB + 1 manifest objects = 181 PUT requests ($0.00090 a cycle, $0.03 a month)",
        "12.00 GB in blocks of 4 MiB -> 2,862 ranged GETs + 1 manifest GETs = 2,863 GET requests",
        "rehydrate time: 12.00 GB at 2.00 GB/s = 6.0s (measured",
    ] {
        assert!(t.contains(want), "{want:?} not in:\n{t}");
    }
    assert_eq!(usd(1234567.891), "$1,234,567.89");
    assert_eq!(usd(0.00123), "$0.0012");
    assert_eq!(usd(0.0000166), "$0.000017");
    assert_eq!(price(32.7726), "$32.7726");
    assert_eq!(
        (ibytes(4 * MIB), ibytes(64 * MIB), ibytes(1 << 30), ibytes(1000)),
        ("4 MiB".into(), "64 MiB".into(), "1 GiB".into(), "1000 B".into())
    );
    assert_eq!(usd(0.0), "$0.00");
    assert_eq!(duration(3725.0), "1h 02m 05s");
    assert_eq!(duration(125.0), "2m 05s");
    assert_eq!(fmt_num(30.4), "30.4");
    assert_eq!(fmt_num(8.0), "8");
    assert_eq!(bytes(999), "999 B");
}
