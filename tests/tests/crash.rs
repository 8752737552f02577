//! Crash safety, shown: run `tidepool workload` (writes through the fs API and prints each
//! acknowledged op), SIGKILL it at a random moment, restart, and check that the namespace is
//! exactly the model of every acknowledged op, plus possibly the one op in flight, whole.
//! At least 20 rounds on one data folder, so recovery also runs on recovered state.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tidepool_e2e::{pattern, tidepool_bin};

type Model = BTreeMap<String, Vec<u8>>;

fn apply(model: &mut Model, op: &[&str]) {
    match op {
        ["create", p] => {
            model.insert(p.to_string(), Vec::new());
        }
        ["write", p, off, len, seed] => {
            let (off, len, seed): (usize, usize, u64) =
                (off.parse().unwrap(), len.parse().unwrap(), seed.parse().unwrap());
            let f = model.get_mut(*p).expect("write to a file the model has");
            if f.len() < off + len {
                f.resize(off + len, 0);
            }
            f[off..off + len].copy_from_slice(&pattern(seed, len));
        }
        ["truncate", p, size] => {
            model.get_mut(*p).expect("truncate of a file the model has").resize(size.parse().unwrap(), 0)
        }
        ["unlink", p] => {
            model.remove(*p);
        }
        ["rename", a, b] => {
            let v = model.remove(*a).expect("rename of a file the model has");
            model.insert(b.to_string(), v);
        }
        other => panic!("unknown op {other:?}"),
    }
}

fn summary(model: &Model) -> BTreeMap<String, (u64, u32)> {
    model.iter().map(|(p, d)| (p.clone(), (d.len() as u64, crc32c::crc32c(d)))).collect()
}

fn tidepool(data: &std::path::Path) -> Command {
    let mut c = Command::new(tidepool_bin());
    c.arg("--data-dir").arg(data);
    c.env("TIDEPOOL_DEVICE_SIZE", "512MiB").env("TIDEPOOL_SEGMENT_SIZE", "16MiB").env("TIDEPOOL_LOG", "warn");
    c
}

/// The namespace as `tidepool fs dump` sees it after a restart: path -> (size, crc32c).
fn dump(data: &std::path::Path) -> BTreeMap<String, (u64, u32)> {
    let out = tidepool(data).args(["fs", "dump"]).output().expect("run tidepool fs dump");
    assert!(out.status.success(), "fs dump failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0] == "file")
                .then(|| (f[1].to_string(), (f[2].parse().unwrap(), u32::from_str_radix(f[3], 16).unwrap())))
        })
        .collect()
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let seed: u64 = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = Model::new();
    let (mut total_acked, mut kills_mid_op) = (0, 0);
    for round in 0..22u64 {
        let mut child = tidepool(&data)
            .args(["workload", "--seed", &(seed ^ round).to_string(), "--ops", "300"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tidepool workload");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(
            lines.next().and_then(|l| l.ok()).as_deref(),
            Some("ready"),
            "round {round}: workload did not start"
        );
        let kill_after = rng.gen_range(0..40);
        let mut pending: Option<(u64, String)> = None;
        let mut acks = 0;
        let mut killed = false;
        for line in lines.by_ref() {
            let line = line.unwrap();
            let mut f = line.splitn(3, ' ');
            match (f.next(), f.next().map(|n| n.parse::<u64>().unwrap()), f.next()) {
                (Some("begin"), Some(n), Some(op)) => pending = Some((n, op.to_string())),
                (Some("ack"), Some(n), None) => {
                    let (pn, op) = pending.take().expect("ack without begin");
                    assert_eq!(pn, n);
                    apply(&mut model, &op.split(' ').collect::<Vec<_>>());
                    acks += 1;
                }
                (Some("fail"), Some(n), Some(errno)) => {
                    let (pn, op) = pending.take().expect("fail without begin");
                    assert_eq!(pn, n);
                    assert_eq!(errno, "28", "only ENOSPC is an expected failure, got errno {errno} for {op}");
                }
                (Some("done"), None, None) => break,
                _ => panic!("unexpected workload line {line:?}"),
            }
            if acks >= kill_after && !killed {
                std::thread::sleep(Duration::from_micros(rng.gen_range(0..20_000)));
                child.kill().expect("SIGKILL the workload");
                killed = true;
            }
        }
        let _ = child.wait();
        total_acked += acks;
        let got = dump(&data);
        let without = summary(&model);
        if got == without {
            // The op in flight (if any) left no trace.
        } else if let Some((_, op)) = &pending {
            let mut with = model.clone();
            apply(&mut with, &op.split(' ').collect::<Vec<_>>());
            assert_eq!(
                got,
                summary(&with),
                "round {round}: state is neither the acknowledged model nor it plus the op in flight ({op})"
            );
            model = with;
            kills_mid_op += 1;
        } else {
            panic!("round {round}: namespace differs from the acknowledged model\n got: {got:?}\nwant: {without:?}");
        }
    }
    println!("22 rounds, {total_acked} acknowledged ops checked, {kills_mid_op} in-flight ops found applied whole");
    assert!(total_acked > 100, "the workload acknowledged too little to prove anything ({total_acked})");
}
