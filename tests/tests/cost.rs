//! `tidepool cost` as a user runs it: against a local-folder bucket holding a few objects and
//! a measured rehydrate (`stats/rehydrate.json`), the `--json` figures, the table, a pricing
//! file, the `bucket` setting, and the refusals. No node runs: the bucket is listed directly.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tidepool_e2e::tidepool_bin;

/// `tidepool cost ARGS` in `cwd` (no tidepool.toml there) with no TIDEPOOL_* setting from
/// the test's environment, plus `env`.
fn cost(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(tidepool_bin());
    c.current_dir(cwd).arg("cost").args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TIDEPOOL_")) {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c.output().expect("run tidepool cost")
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "tidepool cost failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "should fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn close(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "got {got}, want {want}");
}

/// A bucket folder as tiering and spin-down leave it (sizes only matter: listing sums them).
fn fake_bucket(root: &Path, with_stats: bool) {
    let objects: [(&str, usize); 6] = [
        ("chunks/1a/0123456789abcdef0123456789abcdef", 3_000_000),
        ("chunks/2b/fedcba9876543210fedcba9876543210", 1_000_000),
        ("packs/3c/00112233445566778899aabbccddeeff", 500_000),
        ("manifests/00000000000000000001.tpm", 1_000),
        ("manifests/LATEST", 50),
        ("unrelated/file", 12_345),
    ];
    for (key, len) in objects {
        let p = root.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, vec![7u8; len]).unwrap();
    }
    if with_stats {
        std::fs::create_dir_all(root.join("stats")).unwrap();
        let stats = r#"{"bytes": 4500000, "secs": 2.25, "finished_unix": 1760000000}"#;
        std::fs::write(root.join("stats/rehydrate.json"), stats).unwrap();
    }
}

#[test]
fn json_figures_from_the_bucket_and_a_measured_rehydrate() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    fake_bucket(&bucket, true);
    let url = format!("file://{}", bucket.display());
    let prices =
        ["--hourly-usd", "10", "--gb-month-usd", "0.02", "--put-per-1000-usd", "0.005", "--get-per-1000-usd", "0.0004"];
    let mut args =
        vec!["--instance", "p5.48xlarge", "--nodes", "2", "--hours-per-day", "6", "--bucket", &url, "--json"];
    args.extend(prices);
    let j = ok_json(&cost(dir.path(), &[], &args));

    assert_eq!(j["instance"], "p5.48xlarge");
    assert_eq!(j["storage"], "s3_standard");
    assert_eq!(j["prices"]["source"], "embedded deploy/pricing.toml");
    close(&j["prices"]["hourly_usd"], 10.0);
    assert_eq!(j["bucket"]["url"], url.as_str());
    // chunks, packs and manifests are counted; other keys and stats/ are not.
    assert_eq!(j["bucket"]["chunks"], serde_json::json!({"bytes": 4_000_000, "objects": 2}));
    assert_eq!(j["bucket"]["packs"], serde_json::json!({"bytes": 500_000, "objects": 1}));
    assert_eq!(j["bucket"]["manifests"], serde_json::json!({"bytes": 1_050, "objects": 2}));
    assert_eq!((j["bucket"]["data_bytes"].as_u64(), j["bucket"]["bytes"].as_u64()), (Some(4_500_000), Some(4_501_050)));
    close(&j["bucket"]["storage_monthly_usd"], 4_501_050.0 / 1e9 * 0.02);

    // 2 x $10/h x 24 h vs 6 h x 30.4 days.
    close(&j["always_on"]["instances_monthly_usd"], 14_592.0);
    close(&j["spun_down"]["instances_monthly_usd"], 3_648.0);
    // Spin-down: 10 % of 4.5 MB = one small object, plus the manifest root and LATEST.
    let s = &j["requests"]["spin_down"];
    assert_eq!((s["dirty_bytes"].as_u64(), s["data_objects"].as_u64()), (Some(450_000), Some(1)));
    assert_eq!((s["manifest_objects"].as_u64(), s["manifest_objects_assumed"].as_bool()), (Some(2), Some(false)));
    assert_eq!(s["put_requests_per_cycle"].as_u64(), Some(3));
    // Rehydrate: 4.5 MB in 4 MiB blocks = 2 ranged GETs, plus the two manifest objects.
    let g = &j["requests"]["rehydrate"];
    assert_eq!((g["block_gets"].as_u64(), g["get_requests_per_cycle"].as_u64()), (Some(2), Some(4)));
    let requests = (3.0 * 0.005 + 4.0 * 0.0004) / 1000.0 * 30.4;
    close(&j["requests"]["monthly_usd"], requests);
    close(&j["spun_down"]["requests_monthly_usd"], requests);
    let storage = 4_501_050.0 / 1e9 * 0.02;
    close(&j["always_on"]["total_monthly_usd"], 14_592.0 + storage);
    close(&j["spun_down"]["total_monthly_usd"], 3_648.0 + storage + requests);
    close(&j["savings_monthly_usd"], 14_592.0 - 3_648.0 - requests);
    close(&j["savings_percent"], (14_592.0 - 3_648.0 - requests) / (14_592.0 + storage) * 100.0);
    // Rehydrate time at the measured 4.5 MB / 2.25 s.
    let r = &j["rehydrate"];
    assert_eq!(r["throughput_source"], "measured");
    assert_eq!(r["measured"], serde_json::json!({"bytes": 4_500_000, "secs": 2.25, "finished_unix": 1_760_000_000u64}));
    close(&r["throughput_bytes_per_sec"], 2e6);
    close(&r["secs"], 2.25);

    // The table says the same, and that the bucket is paid either way.
    args.retain(|a| *a != "--json");
    let out = cost(dir.path(), &[], &args);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    for want in
        ["always on", "6 h/day, spun down", "$14,592.00", "$3,648.00", "paid either way", "measured: 4.50 MB in 2.2s"]
    {
        assert!(table.contains(want), "{want:?} not in:\n{table}");
    }
}

#[test]
fn assumed_throughput_the_bucket_setting_and_a_pricing_file() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    fake_bucket(&bucket, false);
    let url = format!("file://{}", bucket.display());
    let pricing = dir.path().join("mine.toml");
    std::fs::write(
        &pricing,
        "as_of = \"2030-06\"\n[instances.tiny]\ncloud = \"azure\"\nhourly_usd = 1\nnvme_bytes = 1_000_000\ngpus = 0\n",
    )
    .unwrap();
    // No --bucket: the `bucket` setting (from the environment here).
    let args = ["--instance", "tiny", "--nodes", "3", "--hours-per-day", "12", "--json", "--pricing"];
    let mut args = args.to_vec();
    args.push(pricing.to_str().unwrap());
    let j = ok_json(&cost(dir.path(), &[("TIDEPOOL_BUCKET", &url)], &args));
    assert_eq!(j["bucket"]["url"], url.as_str());
    assert_eq!(j["prices"]["as_of"], "2030-06");
    assert!(j["prices"]["source"].as_str().unwrap().ends_with("mine.toml"), "{}", j["prices"]);
    // An Azure instance is priced with Azure Blob Hot (from the embedded table).
    assert_eq!(j["storage"], "azure_hot");
    close(&j["always_on"]["instances_monthly_usd"], 3.0 * 24.0 * 30.4);
    // 3 x 1 MB of NVMe holds only 3 MB of the 4.5 MB: the rehydrate stops there, at the
    // assumed 3 x 1000 MB/s.
    let r = &j["rehydrate"];
    assert_eq!((r["bytes"].as_u64(), r["capped_by_nvme"].as_bool()), (Some(3_000_000), Some(true)));
    assert_eq!(r["throughput_source"], "assumed");
    close(&r["throughput_bytes_per_sec"], 3e9);
    close(&r["secs"], 0.001);
    assert!(r["note"].as_str().unwrap().contains("not measured yet"), "{r}");

    let out = cost(dir.path(), &[("TIDEPOOL_BUCKET", &url)], &args[..args.len() - 3]);
    assert!(failed(&out).contains("unknown instance \"tiny\""), "without the pricing file tiny is unknown");
}

#[test]
fn refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    fake_bucket(&bucket, false);
    let url = format!("file://{}", bucket.display());
    let run = |extra: &[&str]| {
        let mut args = vec!["--bucket", url.as_str()];
        args.extend_from_slice(extra);
        cost(dir.path(), &[], &args)
    };
    let e = failed(&run(&["--instance", "p9.huge", "--nodes", "1", "--hours-per-day", "8"]));
    assert!(
        e.contains("unknown instance \"p9.huge\"") && e.contains("p4d.24xlarge") && e.contains("Standard_L8s_v3"),
        "{e}"
    );
    let e = failed(&run(&["--instance", "p4d.24xlarge", "--nodes", "1", "--hours-per-day", "25"]));
    assert!(e.contains("invalid --hours-per-day=25: must be between 0 and 24"), "{e}");
    let e = failed(&run(&["--instance", "p4d.24xlarge", "--nodes", "0", "--hours-per-day", "8"]));
    assert!(e.contains("invalid --nodes=0"), "{e}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[instances.x]\nhourly_usd = \n").unwrap();
    let e = failed(&run(&[
        "--instance",
        "p4d.24xlarge",
        "--nodes",
        "1",
        "--hours-per-day",
        "8",
        "--pricing",
        bad.to_str().unwrap(),
    ]));
    assert!(e.contains("bad pricing file") && e.contains("bad.toml") && e.contains("line 2"), "{e}");
    // A missing bucket folder is reported, not created.
    let gone = dir.path().join("gone");
    let out = cost(
        dir.path(),
        &[],
        &[
            "--instance",
            "p4d.24xlarge",
            "--nodes",
            "1",
            "--hours-per-day",
            "8",
            "--bucket",
            &format!("file://{}", gone.display()),
        ],
    );
    assert!(failed(&out).contains("no bucket folder"), "missing folder");
    assert!(!gone.exists());
}
