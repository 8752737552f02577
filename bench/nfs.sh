#!/usr/bin/env bash
# NFS front end side by side with NFS-Ganesha (Debian nfs-ganesha + nfs-ganesha-vfs, the VFS
# FSAL exporting a folder on the same disk, on other ports), in one invocation (see
# BENCHMARKS.md, "NFS front end"):
#   1. sequential write of a SIZE_MIB file with libnfs's nfs-cp (local file -> server)
#   2. sequential read of it with nfs-cp (server -> a file in /dev/shm)
#   3. creation of FILES small files (CREATE + one 4 KiB WRITE FILE_SYNC each) and
#   4. random 4 KiB reads of the big file for READ_SECS seconds,
# 3 and 4 with one NFSv3 client library (the nfs3_client crate: bench/nfs-client) driving
# both servers over CONNS TCP connections.
#
#   bench/nfs.sh                      # everything, 3 rounds (median shown)
#   ROUNDS=1 SIZE_MIB=512 FILES=2000 bench/nfs.sh
#   SMALL=1 bench/nfs.sh              # a quick smoke run of the harness
#   TIERING=1 bench/nfs.sh            # leave tidepool's cold tier at its defaults (see below)
#   CASES=randread ROUNDS=1 bench/nfs.sh   # only some cases (seq_write seq_read small randread);
#                                     # without seq_write the big file is still written, untimed
#
# Installs what it needs (apt-get: libnfs-utils, nfs-ganesha, nfs-ganesha-vfs, rpcbind),
# builds target/release/tidepool (shared target dir) and bench/nfs-client (own target dir,
# target/bench-nfs/client-target). Ganesha needs rpcbind: started here if none runs. Both
# servers listen on free 127.0.0.1 ports with their data under OUT (default target/bench-nfs,
# the same disk) and are stopped (SIGTERM to their own pids) on exit. Before each read the
# page cache is dropped (DROP_CACHES=0 to keep it): Ganesha reads through it, tidepool's
# io_uring engine reads the device file with O_DIRECT. tidepool has its own RAM read cache
# (`read_cache_bytes`, by default 25 % of memory; READ_CACHE=512MiB or READ_CACHE=0 to set it): the node
# is restarted before its random reads, so that cache starts empty as the page cache does
# (with DROP_CACHES=0 it is not restarted). Its hits and misses are recorded after the run.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
SIZE_MIB=${SIZE_MIB:-2048}     # the sequential file
FILES=${FILES:-10000}          # small files per round
FILE_BYTES=${FILE_BYTES:-4096}
CONNS=${CONNS:-16}             # connections of the client library (small files, random reads)
READ_SECS=${READ_SECS:-15}     # random-read run length
DROP_CACHES=${DROP_CACHES:-1}
QUIET_LOAD=${QUIET_LOAD:-1.5}  # wait for the 1-minute load to fall below this (10 min at start, 1 min per run)
OUT=${OUT:-$ROOT/target/bench-nfs}
TP=${TP_BIN:-}
CASES=" ${CASES:-seq_write seq_read small randread} "
want() { [[ "$CASES" == *" $1 "* ]]; }
if [ "${SMALL:-0}" = 1 ]; then ROUNDS=1; SIZE_MIB=64; FILES=300; READ_SECS=2; fi

mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" >&2; }
need() { command -v "$1" >/dev/null || { log "installing $2"; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need nfs-cp libnfs-utils
need rpcbind rpcbind
need ganesha.nfsd nfs-ganesha
dpkg -s nfs-ganesha-vfs >/dev/null 2>&1 || { log "installing nfs-ganesha-vfs"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nfs-ganesha-vfs >/dev/null; }

if [ -z "$TP" ]; then
  log "building target/release/tidepool"
  cargo build --release -p tidepool 2>&1 | tail -1
  TP=$ROOT/target/release/tidepool
fi
log "building bench/nfs-client (nfs3_client; own target dir)"
(cd bench/nfs-client && CARGO_TARGET_DIR=$OUT/client-target cargo build --release 2>&1 | tail -1)
CLIENT=$OUT/client-target/release/nfs-bench-client

# nfs-cp cannot write to /dev/null: reads land in a tmpfs file (memory), removed after each.
SINK=${SINK:-/dev/shm/tidepool-bench-nfs-read.bin}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() {
  [ -n "$TP_PID" ] && kill "$TP_PID" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$SINK"
  [ "${SRC_MADE:-0}" = 1 ] && rm -f "$SRC"
  # The servers' data (a device file of several GiB) goes; KEEP_DATA=1 keeps it.
  [ "${KEEP_DATA:-0}" = 1 ] || rm -rf "$OUT/tp-data" "$OUT/ganesha/export"
}
trap cleanup EXIT

wait_quiet() { # up to $1 seconds
  for _ in $(seq $(( $1 / 10 ))); do
    awk -v q="$QUIET_LOAD" '{exit !($1 < q)}' /proc/loadavg && return 0
    sleep 10
  done
  log "load still $(cut -d' ' -f1 /proc/loadavg) after $1 s: measuring anyway"
}

# ---------- servers ----------
TP_PORT=$(free_port); TP_HTTP=$(free_port); TP_S3=$(free_port)
G_PORT=$(free_port); G_MNT=$(free_port)
# One big file at a time (each round's is removed after it); room for two, and the small files.
DEVICE_GIB=$(( (2 * SIZE_MIB + 1023) / 1024 + 2 ))
rm -rf "$OUT/tp-data" "$OUT/ganesha"
need_mib=$(( DEVICE_GIB * 1024 + SIZE_MIB + 2048 ))
free_mib=$(df -Pm "$OUT" | awk 'NR==2 {print $4}')
if [ "$free_mib" -lt "$need_mib" ]; then
  log "only ${free_mib} MiB free on the disk of $OUT; this run needs ${need_mib} MiB (device ${DEVICE_GIB} GiB + Ganesha's copy + 2 GiB margin)"
  exit 1
fi
mkdir -p "$OUT/ganesha/export" "$OUT/ganesha/recovery"
# The cold tier is held back (TIERING=1: its defaults), as Ganesha has none: otherwise the
# node's write-back copies each big file into its bucket (a local folder on the same disk by
# default) during the runs, once the dirty bytes pass dirty_high (a quarter of the device) or
# 30 s after the write. Its own benchmark is bench/tier.sh.
TIER_ENV=()
if [ "${TIERING:-0}" != 1 ]; then
  TIER_ENV=(TIDEPOOL_TIER_AFTER_SECS=86400 TIDEPOOL_DIRTY_HIGH=$(( DEVICE_GIB * 1024 / 2 ))MiB)
fi
[ -n "${READ_CACHE:-}" ] && TIER_ENV+=(TIDEPOOL_READ_CACHE_BYTES=$READ_CACHE)
TP_PID=
start_tp() {
  env "${TIER_ENV[@]}" TIDEPOOL_DEVICE_SIZE=${DEVICE_GIB}GiB TIDEPOOL_NFS_LISTEN=127.0.0.1:$TP_PORT \
    TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP TIDEPOOL_S3_LISTEN=127.0.0.1:$TP_S3 \
    TIDEPOOL_S3_ACCESS_KEY_ID=BENCHNFSACCESSKEY001 TIDEPOOL_S3_SECRET_ACCESS_KEY=benchnfssecret0123456789abcdefghij \
    "$TP" --data-dir "$OUT/tp-data" up >>"$OUT/tidepool.log" 2>&1 &
  TP_PID=$!
}
log "starting tidepool up (nfs 127.0.0.1:$TP_PORT, device ${DEVICE_GIB}GiB under $OUT/tp-data, read cache ${READ_CACHE:-25 % of memory (default)}, ${TIER_ENV[*]:-tiering at its defaults})"
: >"$OUT/tidepool.log"
start_tp
if ! pgrep -x rpcbind >/dev/null; then
  log "starting rpcbind (Ganesha registers with it)"
  # It outlives this script: it must not inherit our descriptors, or it would hold the lock
  # of a caller running us under `flock` (bench runs take turns on one) for ever.
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    exec rpcbind -f -w
  ) >"$OUT/rpcbind.log" 2>&1 &
  PIDS+=($!)
  sleep 1
fi
cat >"$OUT/ganesha/ganesha.conf" <<EOF
NFS_CORE_PARAM { Protocols = 3, 4; Bind_addr = 127.0.0.1; NFS_Port = $G_PORT; MNT_Port = $G_MNT;
  Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; mount_path_pseudo = false; }
NFSV4 { Graceless = true; RecoveryRoot = $OUT/ganesha/recovery; }
EXPORT { Export_Id = 1; Path = $OUT/ganesha/export; Pseudo = /export; Access_Type = RW;
  Squash = No_Root_Squash; SecType = sys; Protocols = 3, 4; Transports = TCP; FSAL { Name = VFS; } }
LOG { Default_Log_Level = WARN; }
EOF
log "starting ganesha.nfsd (nfs 127.0.0.1:$G_PORT, mount $G_MNT, export $OUT/ganesha/export)"
ganesha.nfsd -F -f "$OUT/ganesha/ganesha.conf" -L "$OUT/ganesha/ganesha.log" -p "$OUT/ganesha/ganesha.pid" &
PIDS+=($!)

declare -A PORT=([tidepool]=$TP_PORT [ganesha]=$G_PORT)
declare -A MNT=([tidepool]=$TP_PORT [ganesha]=$G_MNT)
declare -A EXP=([tidepool]=/ [ganesha]=$OUT/ganesha/export)
url() { # server, file at the export's top
  # libnfs takes the export as the path up to the last `/`: tidepool's top is nfs://host//file
  echo "nfs://127.0.0.1${EXP[$1]}/$2?nfsport=${PORT[$1]}&mountport=${MNT[$1]}"
}
answers() {
  for _ in $(seq 100); do nfs-ls "$(url $1 '')" >/dev/null 2>&1 && break; sleep 0.2; done
  nfs-ls "$(url $1 '')" >/dev/null || { log "$1 does not answer"; tail -20 "$OUT/$1.log" "$OUT/ganesha/ganesha.log" 2>/dev/null; exit 1; }
}
for s in tidepool ganesha; do answers $s; done
# tidepool's RAM read cache emptied the only way it can be from outside: a restart (SIGTERM
# to its own pid, then `up` on the same data folder).
restart_tp() {
  kill "$TP_PID"; wait "$TP_PID" 2>/dev/null || true
  start_tp; answers tidepool
}
cache_metrics() {
  curl -s "http://127.0.0.1:$TP_HTTP/metrics" | awk '
    /^tidepool_read_cache_total\{what="hits"\}/ {h=$2} /^tidepool_read_cache_total\{what="misses"\}/ {m=$2}
    /^tidepool_read_cache_bytes / {b=$2} /^tidepool_read_cache_capacity_bytes / {c=$2}
    END {printf "cache_hits=%.0f cache_misses=%.0f cache_bytes=%.0f cache_capacity_bytes=%.0f", h, m, b, c}'
}

# The source file lives in memory (tmpfs), like the read sink: the disk holds only the servers'
# data (tidepool's device file, allocated whole, and Ganesha's copy).
SRC=${SRC:-/dev/shm/tidepool-bench-nfs-src-${SIZE_MIB}MiB.bin}
[ -s "$SRC" ] || { log "making $SRC"; SRC_MADE=1; head -c $((SIZE_MIB << 20)) /dev/urandom >"$SRC"; }

drop() { if [ "$DROP_CACHES" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }
secs() { local t0=$1; python3 -c "import time; print(f'{time.time()-$t0:.3f}')"; }
now() { python3 -c 'import time; print(time.time())'; }

RES=$OUT/results.txt
: >"$RES"
wait_quiet 600
# Each case runs on both servers back to back (the order alternates by round), so the two
# figures of a pair see the same machine; the load is recorded before each pair.
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then ORDER="tidepool ganesha"; else ORDER="ganesha tidepool"; fi
  pair_start() { wait_quiet 60; echo "round=$r op=load case=$1 load1=$(cut -d' ' -f1 /proc/loadavg)" >>"$RES"; }
  if want seq_write; then
    pair_start seq_write
    for s in $ORDER; do
      log "round $r $s: nfs-cp write ${SIZE_MIB} MiB"
      drop; t=$(now); nfs-cp "$SRC" "$(url $s big-$r.bin)" >/dev/null; w=$(secs "$t")
      echo "round=$r server=$s op=seq_write mib_per_sec=$(python3 -c "print(f'{$SIZE_MIB/$w:.0f}')") secs=$w" | tee -a "$RES"
    done
  else
    for s in $ORDER; do log "round $r $s: nfs-cp write ${SIZE_MIB} MiB (untimed)"; nfs-cp "$SRC" "$(url $s big-$r.bin)" >/dev/null; done
  fi
  if want seq_read; then
    pair_start seq_read
    for s in $ORDER; do
      log "round $r $s: nfs-cp read"
      drop; t=$(now); nfs-cp "$(url $s big-$r.bin)" "$SINK" >/dev/null; rd=$(secs "$t"); rm -f "$SINK"
      echo "round=$r server=$s op=seq_read mib_per_sec=$(python3 -c "print(f'{$SIZE_MIB/$rd:.0f}')") secs=$rd" | tee -a "$RES"
    done
  fi
  if want small; then
    pair_start small
    for s in $ORDER; do
      log "round $r $s: $FILES small files"
      echo "round=$r server=$s $("$CLIENT" small 127.0.0.1 "${PORT[$s]}" "${MNT[$s]}" "${EXP[$s]}" "small-$r" "$FILES" "$FILE_BYTES" "$CONNS")" | tee -a "$RES"
    done
  fi
  if want randread; then
    pair_start randread
    for s in $ORDER; do
      log "round $r $s: random 4 KiB reads"
      [ "$s" = tidepool ] && [ "$DROP_CACHES" = 1 ] && restart_tp
      drop
      line="round=$r server=$s $("$CLIENT" randread 127.0.0.1 "${PORT[$s]}" "${MNT[$s]}" "${EXP[$s]}" "big-$r.bin" "$READ_SECS" 4096 "$CONNS")"
      [ "$s" = tidepool ] && line="$line $(cache_metrics)"
      echo "$line" | tee -a "$RES"
    done
  fi
  for s in $ORDER; do "$CLIENT" rm 127.0.0.1 "${PORT[$s]}" "${MNT[$s]}" "${EXP[$s]}" "big-$r.bin"; done   # disk space
done

# ---------- table: median of the rounds ----------
python3 - "$RES" "$SIZE_MIB" "$FILES" "$CONNS" <<'EOF'
import sys, statistics, collections
res, size, files, conns = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
v = collections.defaultdict(list)
for line in open(res):
    kv = dict(f.split("=", 1) for f in line.split())
    if kv["op"] == "load":
        continue
    key = {"seq_write": "mib_per_sec", "seq_read": "mib_per_sec", "small": "files_per_sec", "randread": "iops"}[kv["op"]]
    v[(kv["op"], kv["server"])].append(float(kv[key]))
    if kv["op"] == "randread":
        v[("randread_p99", kv["server"])].append(float(kv["p99_ms"]))
rows = [("seq_write", f"sequential write {size} MiB, nfs-cp (MiB/s)"),
        ("seq_read", f"sequential read {size} MiB, nfs-cp (MiB/s)"),
        ("small", f"create {files} x 4 KiB files, nfs3_client x{conns} (files/s)"),
        ("randread", f"random 4 KiB reads, nfs3_client x{conns} (IOPS)"),
        ("randread_p99", "  p99 latency of those reads (ms)")]
print(f"\n| case | tidepool | NFS-Ganesha 4 (VFS) | tidepool / Ganesha |\n|---|---:|---:|---:|")
for op, label in rows:
    t, g = v.get((op, "tidepool")), v.get((op, "ganesha"))
    if not t or not g:
        continue
    mt, mg = statistics.median(t), statistics.median(g)
    fmt = (lambda x: f"{x:.2f}") if op == "randread_p99" else (lambda x: f"{x:.0f}")
    ratio = f"{mt / mg:.2f}" if mg else "-"
    print(f"| {label} | {fmt(mt)} | {fmt(mg)} | {ratio} |")
rounds = max((len(x) for x in v.values()), default=0)
print(f"\n(median of {rounds} rounds; every figure in {res})")
EOF
