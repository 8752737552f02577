#!/usr/bin/env bash
# Cold tier side by side with rclone (see BENCHMARKS.md, "Cold tier: tiering vs rclone"):
# the same tree (LARGE_FILES x LARGE_SIZE of large files + SMALL_FILES small files of
# SMALL_MIN..SMALL_MAX bytes, random sizes from a fixed seed) goes into the same local S3
# server (bench/s3s-fs-server on loopback, which counts requests by S3 operation), once by
# `tidepool tier flush` (the tree is first written into a node through its S3 front end
# with tiering held back, untimed; then one flush uploads every dirty block, timed) and once
# by `rclone copy` from a local folder. Three workloads: the whole tree, its small files
# alone (their PUT counts are the ones the goal is about) and its large files alone. Before
# each timed step the harness waits (up to QUIET_WAIT s) for the machine to be idle.
#
#   bench/tier.sh                                  # 3 rounds (sides alternate who goes first); medians
#   ROUNDS=1 bench/tier.sh                         # one round
#   TIDEPOOL_UPLOAD_PARALLELISM=8 bench/tier.sh    # any TIDEPOOL_* setting reaches the node
#   RCLONE_FLAGS="--transfers 16" bench/tier.sh    # rclone's flags (default: --transfers 4)
#   WORKLOADS="all small" bench/tier.sh            # workloads (default all small large: the tree, its small files, its large files)
#   SIDES=tidepool bench/tier.sh                   # one side only (tidepool, rclone)
#   SMALL=1 bench/tier.sh                          # a quick smoke run of the harness (tiny tree)
#
# Needs: rclone (apt-get install rclone if missing), python3, cargo. Builds
# bench/s3s-fs-server (own target dir) and target/release/tidepool (or takes TP_BIN).
# Everything lives under OUT (default target/bench-tier): the tree (kept and reused while its
# parameters stay the same), the server's data (emptied between runs), the node's data
# folder (deleted after each run), logs, and result.txt / runs.jsonl. Servers are stopped
# by their own pids on exit; every timed step runs under `timeout`.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/bench-tier}
ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-all small large}
SIDES=${SIDES:-tidepool rclone}
LARGE_FILES=${LARGE_FILES:-16}
LARGE_SIZE=${LARGE_SIZE:-128MiB}
SMALL_FILES=${SMALL_FILES:-10000}
SMALL_MIN=${SMALL_MIN:-1024}
SMALL_MAX=${SMALL_MAX:-65536}
SEED=${SEED:-20261122}
DEVICE_SIZE=${DEVICE_SIZE:-6GiB}      # the node's NVMe file; must hold the whole tree
RCLONE_FLAGS=${RCLONE_FLAGS:---transfers 4}
TIMEOUT=${TIMEOUT:-1800}              # seconds any one load / flush / copy may take
QUIET_WAIT=${QUIET_WAIT:-300}         # seconds to wait for a quiet machine before each timed step (0: don't)
QUIET_MAX=${QUIET_MAX:-25}            # quiet: below this % of one core busy (whole machine)
TP=${TP_BIN:-}
KEY=BENCHACCESSKEY0001
SECRET=benchsecretkey0123456789abcdefghijklmn
PY="python3 $ROOT/bench/s3_client.py"
if [ "${SMALL:-0}" = 1 ]; then
  LARGE_FILES=2; LARGE_SIZE=16MiB; SMALL_FILES=300; DEVICE_SIZE=2GiB; ROUNDS=1; QUIET_WAIT=0
  OUT=${OUT%/}-small
fi
TREE=${TREE:-$OUT/tree}                # kept between runs while its parameters stay the same
SFS_DATA=${SFS_DATA:-$OUT/s3s-fs}       # the S3 server's data (emptied after each run, removed at the end)
TP_DATA=${TP_DATA:-$OUT/tidepool}       # the node's data folder and device file (removed after each run)
mkdir -p "$OUT/logs"
: >"$OUT/runs.jsonl"
log() { echo "[$(date +%T)] $*" >&2; }

# ---------- install and build ----------
if ! command -v rclone >/dev/null; then
  log "installing rclone (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null
fi
log "building bench/s3s-fs-server (s3s-fs 0.14.1 + TCP_NODELAY + request counts; own target dir)"
(cd bench/s3s-fs-server && CARGO_TARGET_DIR=$ROOT/target/bench-s3/s3s-fs-server-target \
  cargo build --release --locked 2>&1 | tail -1)
S3SFS=$ROOT/target/bench-s3/s3s-fs-server-target/release/s3s-fs-server
if [ -z "$TP" ]; then
  log "building tidepool (cargo build --release -p tidepool)"
  if cargo build --release -p tidepool >"$OUT/logs/tidepool-build.log" 2>&1; then
    TP=$ROOT/target/release/tidepool
    TP_COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench' || echo '+uncommitted changes')"
  else
    # The shared working tree can hold someone's half-done edit: build the last commit instead
    # (the dependencies' build is shared with bench/s3.sh's fallback).
    log "the working tree does not build (see $OUT/logs/tidepool-build.log): building HEAD from git archive"
    rm -rf "$OUT/src" && mkdir -p "$OUT/src" && git archive HEAD | tar -x -C "$OUT/src"
    (cd "$OUT/src" && CARGO_TARGET_DIR=$ROOT/target/bench-s3/tp-target cargo build --release -p tidepool 2>&1 | tail -1)
    TP=$ROOT/target/bench-s3/tp-target/release/tidepool
    TP_COMMIT=$(git rev-parse --short HEAD)
  fi
fi
TP_COMMIT=${TP_COMMIT:-$("$TP" --version)}

# ---------- room ----------
# The node's device file is allocated in full; the bucket gets a copy of the tree (plus
# multipart parts in flight); the tree itself if it is not there yet.
avail_kib() { mkdir -p "$1" && df --output=avail -k "$1" | tail -1; }
need_room() { # dir bytes what
  local have; have=$(( $(avail_kib "$1") * 1024 ))
  if [ "$have" -lt "$2" ]; then
    log "not enough room for $3 under $1: $((have >> 20)) MiB free, $(($2 >> 20)) MiB needed (see SFS_DATA, TP_DATA, DEVICE_SIZE)"; exit 1
  fi
}
TREE_EST=$(( LARGE_FILES * $(numfmt --from=iec-i "${LARGE_SIZE%B}") + SMALL_FILES * (SMALL_MIN + SMALL_MAX) / 2 ))
DEV_BYTES=$(numfmt --from=iec-i "${DEVICE_SIZE%B}")
mkdir -p "$TP_DATA" "$SFS_DATA"
if [ "$(df --output=source "$TP_DATA" | tail -1)" = "$(df --output=source "$SFS_DATA" | tail -1)" ]; then
  need_room "$SFS_DATA" $(( DEV_BYTES + TREE_EST * 12 / 10 )) "the node's device and the bucket"
else
  need_room "$TP_DATA" "$DEV_BYTES" "the node's device"; need_room "$SFS_DATA" $(( TREE_EST * 12 / 10 )) "the bucket"
fi
SFS_FS=$(findmnt -no FSTYPE -T "$SFS_DATA"); TP_FS=$(findmnt -no FSTYPE -T "$TP_DATA")
[ -f "$TREE.params" ] || need_room "$(dirname "$TREE")" "$TREE_EST" "the tree"

# ---------- the tree ----------
PARAMS="large=$LARGE_FILES x $LARGE_SIZE small=$SMALL_FILES x $SMALL_MIN..$SMALL_MAX seed=$SEED"
if [ "$(cat "$TREE.params" 2>/dev/null)" != "$PARAMS" ]; then
  log "writing the tree under $TREE ($PARAMS)"
  rm -rf "$TREE" "$TREE.params"
  python3 - "$TREE" "$LARGE_FILES" "$(numfmt --from=iec-i "${LARGE_SIZE%B}")" "$SMALL_FILES" \
    "$SMALL_MIN" "$SMALL_MAX" "$SEED" <<'EOF'
import os, random, sys
tree, nl, ls, ns, lo, hi, seed = sys.argv[1], *map(int, sys.argv[2:])
r = random.Random(seed)
os.makedirs(f"{tree}/large")
for i in range(nl):  # incompressible bytes, 16 MiB at a time
    with open(f"{tree}/large/f{i:03}.bin", "wb") as f:
        left = ls
        while left:
            n = min(left, 16 << 20); f.write(r.randbytes(n)); left -= n
for i in range(ns):  # 100 files a folder
    d = f"{tree}/small/d{i // 100:03}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:05}.bin", "wb") as f:
        f.write(r.randbytes(r.randint(lo, hi)))
EOF
  echo "$PARAMS" >"$TREE.params"
fi
sync
tree_bytes() { find "$TREE/$1" -type f -printf '%s\n' | paste -sd+ - | bc; }
tree_files() { find "$TREE/$1" -type f | wc -l; }

# ---------- servers ----------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SF_PID=""; TP_PID=""
stop_pid() {
  [ -n "$1" ] || return 0
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$1" 2>/dev/null || true
}
cleanup() {
  stop_pid "$TP_PID"; stop_pid "$SF_PID"; rm -rf "$TP_DATA" "$SFS_DATA"
  rmdir "$(dirname "$TP_DATA")" "$(dirname "$SFS_DATA")" 2>/dev/null || true   # parents left empty (e.g. under /dev/shm)
}
trap cleanup EXIT
trap "exit 143" TERM INT
calc() { awk "BEGIN {printf \"%.3f\", $1}"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
counts() { curl -sf "http://127.0.0.1:$SF_CNT/$1"; }

rm -rf "$SFS_DATA"; mkdir -p "$SFS_DATA"
SF_PORT=$(free_port); SF_CNT=$(free_port)
"$S3SFS" 127.0.0.1:"$SF_PORT" "$SFS_DATA" $KEY $SECRET 127.0.0.1:"$SF_CNT" >"$OUT/logs/s3s-fs.log" 2>&1 &
SF_PID=$!
for _ in $(seq 1 100); do counts counts >/dev/null 2>&1 && break; sleep 0.1; done
log "s3s-fs-server pid $SF_PID on 127.0.0.1:$SF_PORT (counts on :$SF_CNT), data under $SFS_DATA"
SF_URL=http://127.0.0.1:$SF_PORT

# rclone remotes: sf = the s3s-fs server (the peer's target), tp = the node's S3 front end
# (used only to load the node). rclone 1.60 refuses to start with AWS_CA_BUNDLE set.
export RCLONE_CONFIG_SF_TYPE=s3 RCLONE_CONFIG_SF_PROVIDER=Other RCLONE_CONFIG_SF_ENDPOINT=$SF_URL \
  RCLONE_CONFIG_SF_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_SF_SECRET_ACCESS_KEY=$SECRET \
  RCLONE_CONFIG_SF_FORCE_PATH_STYLE=true RCLONE_CONFIG_SF_REGION=us-east-1
rclone_() { env -u AWS_CA_BUNDLE rclone "$@"; }

drop_bucket() { # name: its folder and s3s-fs's per-object files (.bucket-NAME.object-*.json at the root)
  rm -rf "${SFS_DATA:?}/$1"
  find "$SFS_DATA" -maxdepth 1 -name ".bucket-$1.*" -delete
  sync
}
fresh_bucket() { # name: an empty bucket on the s3s-fs server
  drop_bucket "$1"
  $PY "$SF_URL" $KEY $SECRET mb "$1"
}
bucket_objects() { find "$SFS_DATA/$1" -type f | wc -l; }

start_node() {
  stop_pid "$TP_PID"; TP_PID=""
  rm -rf "$TP_DATA"; mkdir -p "$TP_DATA"
  TP_S3=$(free_port); TP_HTTP=$(free_port); TP_NFS=$(free_port)
  # Tiering held back during the load (tier_after 1 h, dirty marks above the tree), so that
  # every block is still dirty when the timed flush starts. Any TIDEPOOL_* of the caller
  # (upload_parallelism, chunk_object_size, ...) is passed on.
  (cd "$TP_DATA" && exec env TIDEPOOL_S3_ACCESS_KEY_ID=$KEY TIDEPOOL_S3_SECRET_ACCESS_KEY=$SECRET \
    TIDEPOOL_S3_LISTEN=127.0.0.1:$TP_S3 TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP \
    TIDEPOOL_NFS_LISTEN=127.0.0.1:$TP_NFS TIDEPOOL_DEVICE_SIZE=$DEVICE_SIZE \
    TIDEPOOL_TIER_AFTER_SECS=${TIDEPOOL_TIER_AFTER_SECS:-3600} \
    TIDEPOOL_DIRTY_HIGH=${TIDEPOOL_DIRTY_HIGH:-$DEVICE_SIZE} TIDEPOOL_DIRTY_LIMIT=${TIDEPOOL_DIRTY_LIMIT:-$DEVICE_SIZE} \
    TIDEPOOL_BUCKET=s3://tidepool/tp TIDEPOOL_BUCKET_ENDPOINT="$SF_URL" \
    AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=us-east-1 \
    "$TP" --data-dir "$TP_DATA/data" up) >"$OUT/logs/tidepool-$1.log" 2>&1 &
  TP_PID=$!
  for _ in $(seq 1 300); do
    kill -0 "$TP_PID" 2>/dev/null || { log "tidepool exited; see $OUT/logs/tidepool-$1.log"; tail -5 "$OUT/logs/tidepool-$1.log"; exit 1; }
    if $PY "http://127.0.0.1:$TP_S3" $KEY $SECRET mb load 2>/dev/null; then break; fi
    sleep 0.2
  done
  export RCLONE_CONFIG_TP_TYPE=s3 RCLONE_CONFIG_TP_PROVIDER=Other RCLONE_CONFIG_TP_ENDPOINT=http://127.0.0.1:$TP_S3 \
    RCLONE_CONFIG_TP_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_TP_SECRET_ACCESS_KEY=$SECRET \
    RCLONE_CONFIG_TP_FORCE_PATH_STYLE=true RCLONE_CONFIG_TP_REGION=us-east-1
}
tier_status() { TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP "$TP" --data-dir "$TP_DATA/data" tier status /load --json; }
jget() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1"; }

# Busy CPU ticks of the whole machine (all cores; user, nice, system, irq, softirq, steal).
machine_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# Before each timed step: wait (up to QUIET_WAIT s) until the machine has been quiet (below
# QUIET_MAX % of one core busy) for two 2-second samples in a row; the wait and whether it
# ended quiet go into the run's record.
wait_quiet() {
  QUIET=false; WAITED=0
  [ "$QUIET_WAIT" -gt 0 ] || return 0
  local t0 n=0 b0 b1 pct=0; t0=$(date +%s)
  while [ $(($(date +%s) - t0)) -lt "$QUIET_WAIT" ]; do
    b0=$(machine_busy); sleep 2; b1=$(machine_busy)
    pct=$(( (b1 - b0) * 100 / (2 * $(getconf CLK_TCK)) ))
    if [ "$pct" -lt "$QUIET_MAX" ]; then n=$((n + 1)); else n=0; fi
    if [ "$n" -ge 2 ]; then QUIET=true; break; fi
  done
  WAITED=$(($(date +%s) - t0))
  [ "$QUIET" = true ] || log "the machine did not get quiet in ${QUIET_WAIT}s (last 2 s: ${pct}% of one core busy); running anyway"
}

# run_timed NAME CMD... : wall seconds of CMD (under timeout) into $WALL; CPU of the command
# (user+sys, children included) into $CLIENT_CPU seconds.
run_timed() {
  local name=$1; shift
  local t0 t1
  MB0=$(machine_busy); t0=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$OUT/logs/$name.time" timeout "$TIMEOUT" "$@" >"$OUT/logs/$name.out" 2>&1 \
    || { log "$name failed or timed out:"; tail -20 "$OUT/logs/$name.out" >&2; exit 1; }
  t1=$(date +%s.%N); MB1=$(machine_busy)
  WALL=$(calc "$t1 - $t0")
  MACHINE_CPU=$(calc "($MB1 - $MB0) / $(getconf CLK_TCK)")
  CLIENT_CPU=$(awk 'END {print $1 + $2}' "$OUT/logs/$name.time")
}

record() { # side workload round extra-json
  python3 - "$@" <<EOF >>"$OUT/runs.jsonl"
import json, sys
side, wl, rnd, extra = sys.argv[1:5]
d = dict(side=side, workload=wl, round=int(rnd), wall=$WALL, bytes=$BYTES, files=$FILES,
         counts=json.loads('''$COUNTS'''), client_cpu=$CLIENT_CPU, server_cpu=$SERVER_CPU,
         machine_cpu=$MACHINE_CPU, quiet_wait=$WAITED, quiet=$(if [ "$QUIET_WAIT" = 0 ]; then echo None; elif [ "$QUIET" = true ]; then echo True; else echo False; fi), load=$(uptime | sed 's/.*load average: //; s/,.*//'))
d.update(json.loads(extra))
print(json.dumps(d))
EOF
}

src_of() { if [ "$1" = all ]; then echo "$TREE"; else echo "$TREE/$1"; fi; }
dst_of() { if [ "$1" = all ]; then echo ""; else echo "/$1"; fi; }

run_tidepool() { # workload round
  local wl=$1 r=$2 src dst tag; src=$(src_of "$wl"); dst=$(dst_of "$wl"); tag=r$r-tidepool-$wl
  fresh_bucket tidepool
  start_node "$tag"
  log "round $r tidepool $wl: loading $FILES files ($BYTES B) into the node through its S3 front end (untimed)"
  local l0 l1; l0=$(date +%s.%N)
  timeout "$TIMEOUT" env -u AWS_CA_BUNDLE rclone copy "$src" "tp:load$dst" --transfers 8 >"$OUT/logs/$tag-load.out" 2>&1 \
    || { log "loading failed"; tail -20 "$OUT/logs/$tag-load.out"; exit 1; }
  l1=$(date +%s.%N)
  local st dirty; st=$(tier_status); dirty=$(echo "$st" | jget path.dirty_bytes)
  if [ "$dirty" != "$BYTES" ]; then
    log "ERROR: the node holds $dirty dirty bytes after the load, not $BYTES (did something tier early?)"; echo "$st" >&2; exit 1
  fi
  local early; early=$(counts reset)
  sync; wait_quiet
  local c0; c0=$(cpu_ticks "$SF_PID"); local tc0; tc0=$(cpu_ticks "$TP_PID")
  log "round $r tidepool $wl: tier flush ($dirty dirty bytes)"
  run_timed "$tag-flush" env TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP "$TP" --data-dir "$TP_DATA/data" tier flush
  local c1; c1=$(cpu_ticks "$SF_PID"); local tc1; tc1=$(cpu_ticks "$TP_PID")
  COUNTS=$(counts reset)
  SERVER_CPU=$(calc "($c1 - $c0) / $(getconf CLK_TCK)")
  CLIENT_CPU=$(calc "($tc1 - $tc0) / $(getconf CLK_TCK)")   # the node does the uploading
  st=$(tier_status)
  local left clean; left=$(echo "$st" | jget path.dirty_bytes); clean=$(echo "$st" | jget path.clean_bytes)
  if [ "$left" != 0 ] || [ "$clean" != "$BYTES" ]; then
    log "ERROR: after the flush: $left dirty, $clean clean bytes (expected 0 and $BYTES)"; echo "$st" >&2; exit 1
  fi
  log "round $r tidepool $wl: $(cat "$OUT/logs/$tag-flush.out") in ${WALL}s"
  record tidepool "$wl" "$r" "{\"load_wall\": $(calc "$l1 - $l0"), \"objects\": $(bucket_objects tidepool), \"requests_during_load\": $early}"
  stop_pid "$TP_PID"; TP_PID=""; rm -rf "$TP_DATA"
  drop_bucket tidepool
}

run_rclone() { # workload round
  local wl=$1 r=$2 src dst tag; src=$(src_of "$wl"); dst=$(dst_of "$wl"); tag=r$r-rclone-$wl
  fresh_bucket rclone
  counts reset >/dev/null
  sync; wait_quiet
  local c0; c0=$(cpu_ticks "$SF_PID")
  log "round $r rclone $wl: rclone copy $src sf:rclone$dst $RCLONE_FLAGS"
  # shellcheck disable=SC2086
  run_timed "$tag" env -u AWS_CA_BUNDLE rclone copy "$src" "sf:rclone$dst" $RCLONE_FLAGS
  local c1; c1=$(cpu_ticks "$SF_PID")
  COUNTS=$(counts reset)
  SERVER_CPU=$(calc "($c1 - $c0) / $(getconf CLK_TCK)")
  local got; got=$(bucket_objects rclone)
  if [ "$got" != "$FILES" ]; then log "ERROR: the bucket holds $got objects after rclone, not $FILES"; exit 1; fi
  counts reset >/dev/null
  log "round $r rclone $wl: $FILES files in ${WALL}s"
  record rclone "$wl" "$r" "{\"objects\": $got}"
  drop_bucket rclone
}

for r in $(seq 1 "$ROUNDS"); do
  for wl in $WORKLOADS; do
    case $wl in
      all) BYTES=$(tree_bytes .); FILES=$(tree_files .) ;;
      small|large) BYTES=$(tree_bytes "$wl"); FILES=$(tree_files "$wl") ;;
      *) log "unknown workload $wl (all, small, large)"; exit 1 ;;
    esac
    if [ $((r % 2)) = 1 ]; then order="tidepool rclone"; else order="rclone tidepool"; fi
    order=$(for s in $order; do case " $SIDES " in *" $s "*) echo "$s";; esac; done)
    for side in $order; do "run_$side" "$wl" "$r"; done
  done
done
stop_pid "$SF_PID"; SF_PID=""

{
  echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); server data on $SFS_FS ($SFS_DATA), node device on $TP_FS ($TP_DATA, $DEVICE_SIZE), tree on $(findmnt -no FSTYPE -T "$TREE"); $(rclone version 2>/dev/null | head -1), s3s-fs 0.14.1 (bench/s3s-fs-server), tidepool $TP_COMMIT"
  echo "tree: $PARAMS; rclone flags: $RCLONE_FLAGS; node settings: tier_after/dirty marks held back$(env | grep -E '^TIDEPOOL_' | sort | sed 's/^/, /' | tr -d '\n')"
  python3 - "$OUT/runs.jsonl" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
PUTS = ("PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload")
def puts(c): return sum(c.get(k, {}).get("n", 0) for k in PUTS)
def other(c): return sum(v["n"] for k, v in c.items() if k not in PUTS and not k.startswith("~"))
def signing(c):  # requests with a body by how they sign it (counted by the server)
    return ", ".join(f"{v['n']} {k[len('~payload '):]}" for k, v in c.items() if k.startswith("~payload "))
def pct(x, r): return f"{x * 100 / r['wall']:.0f}"
rows, res = [], {}
NAMES = {"all": "tree", "small": "small files only", "large": "large files only"}
for wl in ("all", "small", "large"):
    for side in ("tidepool", "rclone"):
        rs = sorted([r for r in runs if r["workload"] == wl and r["side"] == side], key=lambda r: r["wall"])
        if not rs: continue
        m = rs[(len(rs) - 1) // 2]  # the median round (the lower one of an even count)
        c, b = m["counts"], m["bytes"]
        res[(wl, side)] = dict(wall=m["wall"], puts=puts(c), signing=signing(c))
        busy = max(0.0, m["machine_cpu"] - m["client_cpu"] - m["server_cpu"])
        rows.append((NAMES[wl] + f" ({m['files']} files, {b / 1e6:.0f} MB)",
                     "tidepool tier flush" if side == "tidepool" else "rclone copy",
                     f"{m['wall']:.1f}", f"{b / 1e6 / m['wall']:.1f}", f"{puts(c)}",
                     "/".join(str(c.get(k, {}).get("n", 0)) for k in PUTS), f"{other(c)}",
                     f"{pct(m['client_cpu'], m)} / {pct(m['server_cpu'], m)} / {pct(busy, m)}",
                     ", ".join(f"{r['wall']:.1f}" + ("*" if r.get("quiet") is False else "")
                               for r in sorted(rs, key=lambda r: r["round"]))))
hdr = ("workload", "side", "wall s", "MB/s", "PUTs", "Put/Part/Create/Complete", "other reqs",
       "cpu % client / server / rest", "rounds (wall s)")
w = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(len(hdr))]
for x in [hdr, tuple("-" * n for n in w)] + rows:
    print("| " + " | ".join(str(v).ljust(n) for v, n in zip(x, w)) + " |")
print()
def per_round(wl):
    out = []
    for r in sorted({r["round"] for r in runs}):
        t = [x["wall"] for x in runs if x["workload"] == wl and x["round"] == r and x["side"] == "tidepool"]
        c = [x["wall"] for x in runs if x["workload"] == wl and x["round"] == r and x["side"] == "rclone"]
        if t and c: out.append(c[0] / t[0])
    return out
if ("all", "tidepool") in res and ("all", "rclone") in res:
    s = res[("all", "rclone")]["wall"] / res[("all", "tidepool")]["wall"]
    pr = per_round("all")
    print(f"goal: tidepool at least 2x faster than rclone on the tree: {s:.2f}x (medians; per round "
          f"{', '.join(f'{x:.2f}x' for x in pr)}) -> {'met' if s >= 2 else 'MISSED'}")
if ("small", "tidepool") in res and ("small", "rclone") in res:
    p = res[("small", "rclone")]["puts"] / max(1, res[("small", "tidepool")]["puts"])
    print(f"goal: at least 100x fewer PUTs for the small files: {res[('small', 'rclone')]['puts']} / "
          f"{res[('small', 'tidepool')]['puts']} = {p:.0f}x -> {'met' if p >= 100 else 'MISSED'}")
    s = res[("small", "rclone")]["wall"] / res[("small", "tidepool")]["wall"]
    print(f"small files alone: tidepool {s:.1f}x faster than rclone (per round "
          f"{', '.join(f'{x:.1f}x' for x in per_round('small'))})")
for (wl, side), v in res.items():
    if v["signing"]: print(f"payload signing, {NAMES[wl]}, {side}: {v['signing']}")
print("(median of the rounds by wall time; its request counts and cpu. PUTs = PutObject + UploadPart + "
      "CreateMultipartUpload + CompleteMultipartUpload, counted at the server; other reqs: HEAD, GET, LIST. "
      "cpu in % of one core over the wall time: client = rclone or the tidepool node, server = s3s-fs, "
      "rest = everything else on the machine (kernel writeback, other users). "
      "* = the machine was not quiet before that run)")
EOF
} | tee "$OUT/result.txt"
echo "results: $OUT/result.txt (table), $OUT/runs.jsonl (every run, with all request counts), $OUT/logs/"
