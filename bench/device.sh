#!/usr/bin/env bash
# Block store vs fio on the same file: sequential 4 MiB write and read, random 4 KiB reads,
# at equal queue depth (see BENCHMARKS.md, "Device: block store vs fio").
#
#   bench/device.sh                        # 4 GiB file, QD 32, 3 alternating rounds
#   SIZE=8GiB QD=64 ROUNDS=5 RUNTIME=30 bench/device.sh
#   FILE=/mnt/nvme/tp-bench.img bench/device.sh
#   FIO_HUGE=0 bench/device.sh             # skip fio's second reference on huge-page buffers
#
# FILE must be on a real disk (not tmpfs: that is memory, whatever O_DIRECT does there); it is overwritten and deleted.
set -euo pipefail

cd "$(dirname "$0")/.."
SIZE=${SIZE:-4GiB}
QD=${QD:-32}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-15}
FILE=${FILE:-$PWD/target/bench-device.img}
OUT=${OUT:-$PWD/target/bench-device}

if ! command -v fio >/dev/null 2>&1; then
    echo "fio not found: installing it with apt-get" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y fio
fi

if [ "$(stat -f -c %T "$(dirname "$FILE")")" = tmpfs ]; then
    echo "warning: $(dirname "$FILE") is tmpfs (memory, not a disk): the figures mean nothing" >&2
fi

cargo build --release -p tidepool
mkdir -p "$OUT"

# A second fio reference for the sequential tests: fio with its buffers on huge pages
# (--mem=mmaphuge), as the store's large buffers are. Needs root for a hugetlbfs mount and a
# few huge pages (QD buffers of 4 MiB, plus slack); both are given back at exit.
HUGE_ARGS=()
if [ "$(id -u)" -eq 0 ] && [ -w /proc/sys/vm/nr_hugepages ] && [ "${FIO_HUGE:-1}" = 1 ]; then
    HUGE_DIR=$(mktemp -d)
    HUGE_OLD=$(cat /proc/sys/vm/nr_hugepages)
    cleanup_huge() { umount "$HUGE_DIR" 2>/dev/null; rmdir "$HUGE_DIR"; echo "$HUGE_OLD" >/proc/sys/vm/nr_hugepages; }
    trap cleanup_huge EXIT
    HUGE_WANT=$((HUGE_OLD + QD * 2 + 16))
    echo "$HUGE_WANT" >/proc/sys/vm/nr_hugepages
    if mount -t hugetlbfs none "$HUGE_DIR" && [ "$(cat /proc/sys/vm/nr_hugepages)" -ge "$HUGE_WANT" ]; then
        HUGE_ARGS=(--fio-huge "$HUGE_DIR")
    else
        echo "note: no huge pages for fio's second reference (hugetlbfs or free memory missing); skipping it" >&2
    fi
fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; file system of $(dirname "$FILE"): $(stat -f -c %T "$(dirname "$FILE")"), device $(df --output=source "$(dirname "$FILE")" | tail -1)" | tee "$OUT/machine.txt"
set -x
target/release/tidepool bench device --file "$FILE" --force --size "$SIZE" --qd "$QD" \
    --runtime-secs "$RUNTIME" --rounds "$ROUNDS" "${HUGE_ARGS[@]}" --json >"$OUT/result.json"
{ set +x; } 2>/dev/null
python3 - "$OUT/result.json" <<'PY' | tee "$OUT/result.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"file={r['file']} size={r['size_bytes']/2**30:.2f} GiB qd={r['qd']} rounds={r['rounds']} (median) randread runtime={r['runtime_secs']} s, store on {r['store_threads']} thread(s)")
print(f"random reads: {r['rand_read_note']}")
print(f"block store: engine={r['store']['engine']} segment={r['store']['segment_bytes']>>20} MiB blocks={r['store']['blocks']}")
for c in r["fio_commands"]:
    print("  " + c)
print(f"{'test':<17} {'fio':>22} {'tidepool':>22} {'ratio':>8}  goal >= 90 %")
for t in r["tests"]:
    unit = (lambda m: f"{m['iops']:>9.0f} IOPS") if t["test"].startswith("rand") else (lambda m: f"{m['mib_per_sec']:>9.1f} MiB/s")
    print(f"{t['label']:<17} {unit(t['fio']):>22} {unit(t['tidepool']):>22} {t['ratio']*100:>7.1f} %  {'met' if t['met'] else 'MISSED'}")
d = r["device_rand_read_4k"]
print(f"(engine alone, no store: rand read 4 KiB {d['median']['iops']:.0f} IOPS, {d['ratio_to_fio']*100:.1f} % of fio)")
for t in r.get("fio_huge", {}).get("tests", []):
    print(f"(fio on huge-page buffers: {t['label']} {t['fio_huge']['mib_per_sec']:.1f} MiB/s, tidepool {t['ratio']*100:.1f} % of it)")
PY
echo "results: $OUT/result.json (JSON, every round) and $OUT/result.txt (table)"
