#!/usr/bin/env bash
# S3 front end side by side with s3s-fs, one load generator (fio's http engine) for both,
# plus iperf3 over loopback and a 100,000-key ListObjectsV2 walk (see BENCHMARKS.md,
# "S3 front end").
#
#   bench/s3.sh                                  # everything, 3 rounds
#   ROUNDS=5 RUNTIME=15 bench/s3.sh
#   SKIP_LIST=1 bench/s3.sh                      # PUT/GET and iperf3 only
#   SKIP_OBJ=1 bench/s3.sh                       # listing only
#   SMALL=1 bench/s3.sh                          # a quick smoke run of the harness (tiny sizes)
#   CASES="64m-c1 64m-c32" SKIP_LIST=1 ROUNDS=1 bench/s3.sh   # only the large PUT/GET cases
#   TP_ENV="TIDEPOOL_READ_CACHE_BYTES=4GiB" bench/s3.sh      # extra settings for tidepool (say so
#                                                # with the figures: the default run sets none)
#
# Installs what it needs: fio with the http engine (../shared/tools/build-fio.sh, into
# .tools/fio), iperf3 (apt-get), s3s-fs 0.14.1 (cargo install into target/bench-s3/s3s-fs-bin
# with its own target dir, so it never takes the workspace's build lock), and builds
# target/release/tidepool. Both servers listen on free 127.0.0.1 ports with their data
# under DATA (default target/bench-s3/data, i.e. the same disk), start fresh each round,
# and are stopped (SIGTERM to their own pids) on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}            # each case runs ROUNDS times per server; the table shows the median
ROUND_FROM=${ROUND_FROM:-1}    # ROUND_FROM=3 ROUNDS=3 SKIP_LIST=1: add a third round to an earlier run
RUNTIME=${RUNTIME:-10}         # seconds of each time-based GET run
KEYS=${KEYS:-100000}           # keys of the listing walk
WALKS=${WALKS:-3}              # walks of tidepool (median reported)
PEER_WALKS=${PEER_WALKS:-1}    # walks of s3s-fs (each page re-reads the whole bucket: minutes per walk)
WALK_TIMEOUT=${WALK_TIMEOUT:-300}
OUT=${OUT:-$ROOT/target/bench-s3}
DATA=${DATA:-$OUT/data}
FIO=${FIO:-$ROOT/.tools/fio/bin/fio}
PEER=${PEER:-nodelay}           # nodelay: bench/s3s-fs-server (s3s-fs 0.14.1 + TCP_NODELAY); shipped: s3s-fs's own binary
TP=${TP_BIN:-}                 # a tidepool binary to use as is (default: built here, see below)
CASES=${CASES:-4k-c1 4k-c32 64m-c1 64m-c32}   # which PUT/GET cases run (size-clients)
TP_ENV=${TP_ENV:-}             # extra VAR=value settings for tidepool (none by default)
KEY=BENCHACCESSKEY0001
SECRET=benchsecretkey0123456789abcdefghijklmn
PY="python3 $ROOT/bench/s3_client.py"

# Objects per job of each PUT (the GETs read them back). Sized so that each PUT run lasts
# a few seconds; every PUT run is also capped at PUT_CAP seconds.
N4K_C1=${N4K_C1:-3000}; N4K_C32=${N4K_C32:-400}
N64M_C1=${N64M_C1:-16}; N64M_C32=${N64M_C32:-2}
PUT_CAP=${PUT_CAP:-120}
if [ "${SMALL:-0}" = 1 ]; then
  ROUNDS=1; RUNTIME=3; KEYS=3200; WALKS=1
  N4K_C1=200; N4K_C32=10; N64M_C1=2; N64M_C32=1
fi

# Start from an empty runs/: the report reads every JSON there, and a figure left by an
# earlier run with other CASES would be shown as this run's.
rm -rf "$OUT/runs"
mkdir -p "$OUT/runs"
log() { echo "[$(date +%T)] $*" >&2; }

# Room for the run: tidepool's device file (DEVICE_SIZE, allocated in full), its write-back
# bucket and s3s-fs's files (~5 GiB each in the full run). Short of it, s3s-fs answers 500
# mid-run and the figures mean nothing: refuse up front instead.
if [ "${SMALL:-0}" != 1 ] && [ "${SKIP_OBJ:-0}" != 1 ]; then
  mkdir -p "$DATA"
  ds=${DEVICE_SIZE:-16GiB}; ds=${ds%iB}; ds=${ds%B}   # 16GiB -> 16G, as numfmt reads it
  need=$(( $(numfmt --from=iec "$ds") / 1073741824 + 12 ))
  have=$(( $(df -P -k "$DATA" | awk 'NR == 2 {print $4}') / 1048576 ))
  if [ "$have" -lt "$need" ]; then
    log "ERROR: $have GiB free under $DATA; this run needs ~$need GiB (DEVICE_SIZE=${DEVICE_SIZE:-16GiB} + 12). Free some, or set a smaller DEVICE_SIZE."
    exit 1
  fi
fi

# ---------- install ----------
if ! command -v iperf3 >/dev/null; then
  log "installing iperf3"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
fi
if ! { [ -x "$FIO" ] && "$FIO" --enghelp 2>/dev/null | grep -qw http; }; then
  log "building fio with the http engine (../shared/tools/build-fio.sh)"
  /work/shared/tools/build-fio.sh "$(dirname "$(dirname "$FIO")")" >"$OUT/fio-build.log" 2>&1 \
    || { tail -20 "$OUT/fio-build.log"; exit 1; }
fi
if [ "$PEER" = shipped ]; then
  S3SFS=$OUT/s3s-fs-bin/bin/s3s-fs
  if [ ! -x "$S3SFS" ]; then
    log "installing s3s-fs 0.14.1 (cargo install --locked, own target dir)"
    CARGO_TARGET_DIR=$OUT/s3s-fs-build cargo install s3s-fs@0.14.1 --features binary --locked \
      --root "$OUT/s3s-fs-bin" >"$OUT/s3s-fs-install.log" 2>&1 \
      || { tail -20 "$OUT/s3s-fs-install.log"; exit 1; }
  fi
else
  log "building bench/s3s-fs-server (s3s-fs 0.14.1 library + TCP_NODELAY; own target dir)"
  (cd bench/s3s-fs-server && CARGO_TARGET_DIR=$OUT/s3s-fs-server-target cargo build --release --locked 2>&1 | tail -1)
  S3SFS=$OUT/s3s-fs-server-target/release/s3s-fs-server
fi
if [ -z "$TP" ]; then
  log "building tidepool (cargo build --release -p tidepool)"
  if cargo build --release -p tidepool >"$OUT/tidepool-build.log" 2>&1; then
    TP=$ROOT/target/release/tidepool
    TP_COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench' || echo '+uncommitted changes')"
  else
    # The shared working tree can hold someone's half-done edit: build the last commit instead.
    log "the working tree does not build (see $OUT/tidepool-build.log): building HEAD from git archive"
    rm -rf "$OUT/src" && mkdir -p "$OUT/src" && git archive HEAD | tar -x -C "$OUT/src"
    (cd "$OUT/src" && CARGO_TARGET_DIR=$OUT/tp-target cargo build --release -p tidepool 2>&1 | tail -1)
    TP=$OUT/tp-target/release/tidepool
    TP_COMMIT=$(git rev-parse --short HEAD)
  fi
fi
TP_COMMIT=${TP_COMMIT:-$("$TP" --version)}

# ---------- servers ----------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TP_PID=""; SF_PID=""; IP_PID=""
stop_servers() {
  for p in $TP_PID $SF_PID $IP_PID; do kill "$p" 2>/dev/null || true; done
  for p in $TP_PID $SF_PID $IP_PID; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  TP_PID=""; SF_PID=""; IP_PID=""
}
# The servers' data (a 16 GiB device image, the local bucket, s3s-fs's files: ~27 GB after a
# full run) goes at exit; KEEP_DATA=1 keeps it for a look.
IP_SERVER=""
on_exit() { stop_servers; [ -n "$IP_SERVER" ] && kill "$IP_SERVER" 2>/dev/null; if [ "${KEEP_DATA:-0}" != 1 ]; then rm -rf "$DATA"; fi; }
trap on_exit EXIT

wait_s3() { # endpoint pid
  for _ in $(seq 1 300); do
    kill -0 "$2" 2>/dev/null || { log "server $2 for $1 exited; see $OUT/*.log"; return 1; }
    if $PY "$1" $KEY $SECRET mb bench 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  log "server at $1 did not come up"; return 1
}

start_servers() { # tag
  stop_servers
  rm -rf "$DATA"; mkdir -p "$DATA/tidepool" "$DATA/s3s-fs"
  TP_PORT=$(free_port); TP_HTTP=$(free_port); SF_PORT=$(free_port)
  (cd "$DATA" && exec env TIDEPOOL_S3_ACCESS_KEY_ID=$KEY TIDEPOOL_S3_SECRET_ACCESS_KEY=$SECRET \
    TIDEPOOL_S3_LISTEN=127.0.0.1:$TP_PORT TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP \
    TIDEPOOL_DEVICE_SIZE=${DEVICE_SIZE:-16GiB} $TP_ENV "$TP" --data-dir "$DATA/tidepool" up) >"$OUT/tidepool-$1.log" 2>&1 &
  TP_PID=$!
  if [ "$PEER" = shipped ]; then
    "$S3SFS" --host 127.0.0.1 --port "$SF_PORT" --access-key $KEY --secret-key $SECRET "$DATA/s3s-fs" \
      >"$OUT/s3s-fs-$1.log" 2>&1 &
  else
    "$S3SFS" 127.0.0.1:"$SF_PORT" "$DATA/s3s-fs" $KEY $SECRET >"$OUT/s3s-fs-$1.log" 2>&1 &
  fi
  SF_PID=$!
  wait_s3 "http://127.0.0.1:$TP_PORT" "$TP_PID"; wait_s3 "http://127.0.0.1:$SF_PORT" "$SF_PID"
  log "tidepool pid $TP_PID on 127.0.0.1:$TP_PORT, s3s-fs pid $SF_PID on 127.0.0.1:$SF_PORT, data under $DATA"
}
port_of() { if [ "$1" = tidepool ]; then echo "$TP_PORT"; else echo "$SF_PORT"; fi; }
pid_of() { if [ "$1" = tidepool ]; then echo "$TP_PID"; else echo "$SF_PID"; fi; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# fio_run NAME SERVER RW BS NJOBS OBJS_PER_JOB [time]  -> JSON in $OUT/runs/NAME.json
fio_run() {
  local name=$1 server=$2 rw=$3 bs=$4 nj=$5 objs=$6 timed=${7:-}
  local bsb; bsb=$(numfmt --from=iec "${bs^^}")
  local per=$((bsb * objs)) pid; pid=$(pid_of "$server")
  local args=(--name="$name" --ioengine=http --http_mode=s3 --http_host=127.0.0.1:"$(port_of "$server")"
    --http_s3_keyid=$KEY --http_s3_key=$SECRET --http_s3_region=us-east-1
    --filename="/bench/$4-c$5/o" --rw="$rw" --bs="$bs" --size=$per --offset_increment=$per
    --numjobs="$nj" --group_reporting --output-format=json)
  if [ -n "$timed" ]; then args+=(--time_based --runtime="$RUNTIME"); else args+=(--runtime="$PUT_CAP"); fi
  # The machine is shared: the load average at the start of every run goes with its figures.
  echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/runs/$name.load"
  local t0 c0; c0=$(cpu_ticks "$pid"); t0=$(date +%s.%N)
  "$FIO" "${args[@]}" >"$OUT/runs/$name.json" 2>"$OUT/runs/$name.err" || { cat "$OUT/runs/$name.err" >&2; return 1; }
  local t1 c1; t1=$(date +%s.%N); c1=$(cpu_ticks "$pid")
  echo "{\"server_cpu_pct\": $(echo "($c1 - $c0) * 100 / $(getconf CLK_TCK) / ($t1 - $t0)" | bc -l)}" >"$OUT/runs/$name.cpu"
  echo "${args[*]}" >"$OUT/runs/$name.cmd"
  sync
}

# Before a GET run, each server's PUT backlog is drained, so the GET does not share the CPU
# with it: s3s-fs's dirty page cache by the `sync` after every run (fio_run), tidepool's
# write-back to its bucket by waiting until /metrics shows no dirty bytes (at most
# SETTLE_CAP seconds; how long it took goes to runs/r*-tidepool-settle-*.json), then `sync` for
# the bucket files the write-back itself wrote.
SETTLE_CAP=${SETTLE_CAP:-300}
settle() { # server
  [ "$1" = tidepool ] || return 0
  local t0 d; t0=$(date +%s.%N)
  for _ in $(seq 1 $((SETTLE_CAP * 5))); do
    d=$(curl -s "http://127.0.0.1:$TP_HTTP/metrics" | awk '$1 == "tidepool_dirty_bytes" {print $2}')
    [ "${d:-1}" = 0 ] && break
    sleep 0.2
  done
  echo "{\"settle_secs\": $(echo "$(date +%s.%N) - $t0" | bc -l), \"dirty_bytes\": ${d:-null}}" >"$OUT/runs/r$r-tidepool-settle-$bs-c$nj.json"
  log "tidepool: write-back settled in $(echo "$(date +%s.%N) - $t0" | bc -l | cut -c1-5) s (dirty bytes ${d:-?})"
  sync
}

count_keys() { $PY "http://127.0.0.1:$(port_of "$1")" $KEY $SECRET count bench "$2" --timeout 600; }

# ---------- PUT / GET, and iperf3 ----------
# iperf3 runs in every round, right after that round's cases (servers stopped): loopback
# throughput here swings by 25 % within a minute, so a reference taken only at the end of
# the run compared moments as much as servers.
iperf3_round() { # round
  for p in 1 32; do
    log "iperf3 round $1, $p streams"
    iperf3 -c 127.0.0.1 -p "$IP_PORT" -t "$RUNTIME" -P "$p" -J >"$OUT/runs/r$1-iperf3-P$p.json"
  done
}
if [ "${SKIP_OBJ:-0}" != 1 ]; then
  IP_PORT=$(free_port)
  iperf3 -s -B 127.0.0.1 -p "$IP_PORT" >"$OUT/iperf3-server.log" 2>&1 &
  IP_SERVER=$!
  for r in $(seq "$ROUND_FROM" "$ROUNDS"); do
    start_servers "r$r"
    if [ $((r % 2)) = 1 ]; then order="tidepool s3s-fs"; else order="s3s-fs tidepool"; fi
    for spec in "4k 1 $N4K_C1" "4k 32 $N4K_C32" "64m 1 $N64M_C1" "64m 32 $N64M_C32"; do
      set -- $spec; bs=$1; nj=$2; objs=$3
      case " $CASES " in *" $bs-c$nj "*) ;; *) continue ;; esac
      for s in $order; do
        log "round $r $s: PUT $bs x $((nj * objs)) objects, $nj clients"
        fio_run "r$r-$s-put-$bs-c$nj" "$s" write "$bs" "$nj" "$objs"
        got=$(count_keys "$s" "$bs-c$nj/")
        if [ "$got" != $((nj * objs)) ]; then
          log "ERROR: $s holds $got of $((nj * objs)) objects after the PUT run (fio would read 404s as zeros)"; exit 1
        fi
        settle "$s"
        log "round $r $s: GET $bs, $nj clients, ${RUNTIME}s"
        fio_run "r$r-$s-get-$bs-c$nj" "$s" randread "$bs" "$nj" "$objs" time
      done
    done
    du -sh "$DATA/tidepool" "$DATA/s3s-fs" >&2
    stop_servers
    iperf3_round "$r"
  done
  kill "$IP_SERVER" 2>/dev/null || true; IP_SERVER=""
fi

# ---------- listing at scale ----------
if [ "${SKIP_LIST:-0}" != 1 ]; then
  start_servers list
  per=$((KEYS / 32))
  for s in tidepool s3s-fs; do
    log "$s: loading $KEYS keys of 1 byte under walk/ (32 fio clients)"
    pid=$(pid_of "$s"); c0=$(cpu_ticks "$pid"); t0=$(date +%s.%N)
    "$FIO" --name=load --ioengine=http --http_mode=s3 --http_host=127.0.0.1:"$(port_of "$s")" \
      --http_s3_keyid=$KEY --http_s3_key=$SECRET --http_s3_region=us-east-1 \
      --filename=/bench/walk/k --rw=write --bs=1 --size=$per --offset_increment=$per --numjobs=32 \
      --runtime=1800 --group_reporting --output-format=json >"$OUT/runs/list-$s-load.json"
    t1=$(date +%s.%N); c1=$(cpu_ticks "$pid")
    echo "{\"server_cpu_pct\": $(echo "($c1 - $c0) * 100 / $(getconf CLK_TCK) / ($t1 - $t0)" | bc -l)}" >"$OUT/runs/list-$s-load.cpu"
    sync
  done
  for w in $(seq 1 "$WALKS"); do
    for s in tidepool s3s-fs; do
      if [ "$s" = s3s-fs ] && [ "$w" -gt "$PEER_WALKS" ]; then continue; fi
      log "$s: walk $w (ListObjectsV2, pages of 1000)"
      $PY "http://127.0.0.1:$(port_of "$s")" $KEY $SECRET walk bench walk/ --page 1000 \
        --timeout "$WALK_TIMEOUT" >"$OUT/runs/list-$s-walk$w.json"
      cat "$OUT/runs/list-$s-walk$w.json" >&2
    done
  done
  if python3 -c 'import boto3' 2>/dev/null; then
    for s in tidepool; do   # s3s-fs's walk is server-bound (see above): boto3 adds nothing there
      log "$s: walk with boto3's paginator"
      $PY "http://127.0.0.1:$(port_of "$s")" $KEY $SECRET walk-boto3 bench walk/ --page 1000 \
        --timeout "$WALK_TIMEOUT" >"$OUT/runs/list-$s-boto3.json"
      cat "$OUT/runs/list-$s-boto3.json" >&2
    done
  fi
  stop_servers
fi

{
  echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); data on $(findmnt -no FSTYPE -T "$OUT") ($(df --output=source "$OUT" | tail -1)); $("$FIO" --version), $(iperf3 --version | head -1), s3s-fs 0.14.1 ($PEER), tidepool $TP_COMMIT"
  # The read cache's size is chosen from the machine's memory unless TP_ENV sets it: say which.
  rc=$(grep -ho "read cache: [^$(printf '\033')]*" "$OUT"/tidepool-*.log 2>/dev/null | sort -u | head -1 || true)
  [ -n "$rc" ] && echo "tidepool $rc${TP_ENV:+; TP_ENV: $TP_ENV}"
  python3 "$ROOT/bench/s3_report.py" "$OUT/runs" "$ROUNDS" "$WALKS"
} | tee "$OUT/result.txt"
echo "results: $OUT/result.txt (table), $OUT/runs/ (every fio / iperf3 / walk JSON)"
