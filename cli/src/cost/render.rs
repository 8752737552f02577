//! The human-readable report of `tidepool cost`.

use super::{Cloud, Report};

/// The human-readable report.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let p = &r.prices;
    let b = &r.bucket;
    let q = &r.requests;
    let h = r.hours_per_day;
    let _ = writeln!(
        o,
        "{} x {} ({}, {} GPUs, {} NVMe each{}) at {}/h; storage {} at {}/GB-month, {} / {} per 1,000 PUT / GET",
        r.nodes,
        r.instance,
        match r.cloud {
            Cloud::Aws => "aws",
            Cloud::Azure => "azure",
        },
        r.gpus_per_node,
        bytes(r.nvme_bytes_per_node),
        if r.instance_description.is_empty() { String::new() } else { format!(": {}", r.instance_description) },
        price(p.hourly_usd),
        r.storage,
        price(p.gb_month_usd),
        price(p.put_per_1000_usd),
        price(p.get_per_1000_usd),
    );
    let _ = writeln!(o, "prices as of {}: {} ({})", p.as_of, p.basis, p.source);
    let _ = writeln!(
        o,
        "bucket {}: {} in {} objects (chunks {} / {}, packs {} / {}, manifests {} / {})",
        b.url,
        bytes(b.bytes),
        count(b.objects),
        bytes(b.chunks.bytes),
        count(b.chunks.objects),
        bytes(b.packs.bytes),
        count(b.packs.objects),
        bytes(b.manifests.bytes),
        count(b.manifests.objects),
    );
    let _ = writeln!(o);
    let down = format!("{} h/day, spun down", fmt_num(h));
    let _ = writeln!(o, "{:<40}{:>16}{:>26}", format!("per month ({} days)", r.days_per_month), "always on", down);
    let row = |o: &mut String, label: String, a: f64, d: f64| {
        let _ = writeln!(o, "  {:<38}{:>16}{:>26}", label, usd(a), usd(d));
    };
    row(
        &mut o,
        format!("instances ({} x {}/h)", r.nodes, price(p.hourly_usd)),
        r.always_on.instances_monthly_usd,
        r.spun_down.instances_monthly_usd,
    );
    row(
        &mut o,
        "bucket storage (paid either way)".into(),
        r.always_on.storage_monthly_usd,
        r.spun_down.storage_monthly_usd,
    );
    row(
        &mut o,
        "spin-down + rehydrate requests".into(),
        r.always_on.requests_monthly_usd,
        r.spun_down.requests_monthly_usd,
    );
    row(&mut o, "total".into(), r.always_on.total_monthly_usd, r.spun_down.total_monthly_usd);
    let _ = writeln!(
        o,
        "  {:<38}{:>16}{:>26}",
        "savings",
        "",
        format!("{} ({:.1} %)", usd(r.savings_monthly_usd), r.savings_percent)
    );
    let _ = writeln!(o);
    let s = &q.spin_down;
    let g = &q.rehydrate;
    if q.cycles_per_month > 0.0 {
        let _ = writeln!(
            o,
            "requests: one spin-down and one rehydrate a day, {} a month: {} a cycle, {} a month",
            fmt_num(q.cycles_per_month),
            usd(q.cycle_usd),
            usd(q.monthly_usd)
        );
    } else {
        let _ = writeln!(
            o,
            "requests: none a month at {} h/day (no spin-down); one cycle would cost {}",
            fmt_num(h),
            usd(q.cycle_usd)
        );
    }
    let _ = writeln!(
        o,
        "  spin-down: {} churn = {} dirty -> {} objects of up to {} + {} manifest objects{} = {} PUT requests ({} a cycle, {} a month)",
        fmt_num(s.churn),
        bytes(s.dirty_bytes),
        count(s.data_objects),
        ibytes(s.object_size_bytes),
        count(s.manifest_objects),
        if s.manifest_objects_assumed { " (assumed: none in the bucket yet)" } else { "" },
        count(s.put_requests_per_cycle),
        usd(s.cycle_usd),
        usd(s.monthly_usd),
    );
    let _ = writeln!(
        o,
        "  rehydrate: {} in blocks of {} -> {} ranged GETs + {} manifest GETs = {} GET requests ({} a cycle, {} a month)",
        bytes(g.bytes),
        ibytes(g.block_size_bytes),
        count(g.block_gets),
        count(g.manifest_gets),
        count(g.get_requests_per_cycle),
        usd(g.cycle_usd),
        usd(g.monthly_usd),
    );
    let rh = &r.rehydrate;
    let _ = writeln!(
        o,
        "rehydrate time: {} at {}/s = {} ({})",
        bytes(rh.bytes),
        bytes(rh.throughput_bytes_per_sec.round() as u64),
        duration(rh.secs),
        match (&rh.measured, &rh.note) {
            (Some(m), _) => format!(
                "measured: {} in {} by the rehydrate that finished at unix time {}",
                bytes(m.bytes),
                duration(m.secs),
                m.finished_unix
            ),
            (None, Some(n)) => format!("ASSUMED: {n}"),
            (None, None) => String::new(),
        }
    );
    if rh.capped_by_nvme {
        let _ = writeln!(
            o,
            "  the bucket's {} of data is more than the cluster's {} of NVMe: rehydrate fills the NVMe, the rest stays cold",
            bytes(b.data_bytes),
            bytes(rh.cluster_nvme_bytes)
        );
    }
    o
}

pub(super) fn usd(v: f64) -> String {
    let sign = if v < 0.0 { "-" } else { "" };
    let v = v.abs();
    if v != 0.0 && v < 0.01 {
        // Two significant digits: $0.0009, $0.000017.
        let decimals = (1.0 - v.log10().floor()) as usize;
        return format!("{sign}${v:.decimals$}");
    }
    let cents = (v * 100.0).round() as u64;
    format!("{sign}${}.{:02}", count(cents / 100), cents % 100)
}

/// A unit price as given, without rounding: $32.7726, $0.023.
pub(super) fn price(v: f64) -> String {
    format!("${}", fmt_num(v))
}

/// A power-of-two size as configured: 4 MiB, 64 MiB.
pub(super) fn ibytes(n: u64) -> String {
    match n.trailing_zeros() {
        30.. => format!("{} GiB", n >> 30),
        20.. => format!("{} MiB", n >> 20),
        10.. => format!("{} KiB", n >> 10),
        _ => format!("{n} B"),
    }
}

pub(super) fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Decimal units, as the clouds price them (GB = 10^9 bytes).
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

pub(super) fn duration(secs: f64) -> String {
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 { format!("{h}h {m:02}m {s:02}s") } else { format!("{m}m {s:02}s") }
}

/// A number without trailing zeros (8 rather than 8.0, 30.4, 0.1, 32.7726).
pub(super) fn fmt_num(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_owned()
}
