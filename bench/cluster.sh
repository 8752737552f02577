#!/usr/bin/env bash
# A 3-node loopback cluster (deploy/local/cluster.sh 3) beside one node alone
# (deploy/local/cluster.sh 1): same binary, same settings, one after the other in each round
# (who goes first swaps each round). See BENCHMARKS.md, "Cluster (issue 7)".
#
#   1. metadata commit latency and creates/s: NFS CREATE (GUARDED) of empty files with
#      bench/nfs-client (`small ... SIZE=0`: no WRITE is sent), CONNS=1 (latency: p50, p99)
#      and CONNS_RATE connections (creates/s), through a follower and through the leader of
#      the cluster, and through the node alone;
#   2. aggregate read MB/s: OBJECTS x OBJ_MIB MiB objects PUT with fio's http engine (S3),
#      then read back LOOPS times by OBJECTS concurrent fio jobs, one object each: spread over
#      the three nodes' S3 endpoints, or all on the node alone. The peer share of the reads
#      comes from each node's /status (`ops.peer_read_bytes` over `ops.bytes_read`).
#
#   bench/cluster.sh                 # 3 rounds, median
#   ROUNDS=1 OBJECTS=3 bench/cluster.sh
#   SMALL=1 bench/cluster.sh         # a quick smoke run of the harness
#   TP_BIN=target/release/tidepool bench/cluster.sh   # an existing binary, no build
#
# Builds target/release/tidepool (shared target dir) and bench/nfs-client (own target dir,
# OUT/client-target); fio with the http engine via ../shared/tools/build-fio.sh if missing.
# Nodes bind 127.0.0.1..3 on ports chosen free on all three addresses (the defaults 7100/9000/
# ... may be taken by tests). Each side starts fresh each round with its data under OUT
# (default target/bench-cluster) and is stopped and removed at once after it (and on exit).
# Cold tier held back (TIDEPOOL_TIER_AFTER_SECS=86400, dirty_high near the device size) so
# reads come from NVMe.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
FILES_LAT=${FILES_LAT:-2000}        # creates at CONNS=1 (latency)
FILES_RATE=${FILES_RATE:-10000}     # creates at CONNS_RATE (rate)
CONNS_RATE=${CONNS_RATE:-16}
OBJECTS=${OBJECTS:-6}               # objects = read jobs (a multiple of 3 spreads evenly)
OBJ_MIB=${OBJ_MIB:-128}
LOOPS=${LOOPS:-4}                   # each job reads its object this many times
DEVICE_SIZE=${DEVICE_SIZE:-1GiB}    # per node (fallocated: 3 of them exist at once; the node alone holds every object)
QUIET_LOAD=${QUIET_LOAD:-1.5}
QUIET_START=${QUIET_START:-600}     # seconds to wait for a quiet machine at start
QUIET_RUN=${QUIET_RUN:-60}          # ... and before each side of each round
OUT=${OUT:-$ROOT/target/bench-cluster}
FIO=${FIO:-$ROOT/.tools/fio/bin/fio}
KEY=BENCHCLUSTERKEY00001
SECRET=benchclustersecret0123456789abcdefghij
if [ "${SMALL:-0}" = 1 ]; then
  ROUNDS=1; FILES_LAT=100; FILES_RATE=400; OBJECTS=3; OBJ_MIB=16; LOOPS=1; QUIET_START=0; QUIET_RUN=0
fi

mkdir -p "$OUT/runs"
log() { echo "[$(date +%T)] $*" >&2; }
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
set -E

# ---------- disk ----------
dev_gib=$(numfmt --from=iec "${DEVICE_SIZE%iB}" | awk '{print int($1 / 1073741824)}')   # 2GiB -> 2
need_gib=$(( 3 * dev_gib + 2 ))
avail_gib=$(( $(df --output=avail -k "$OUT" | tail -1) / 1048576 ))
if [ "$avail_gib" -lt "$need_gib" ]; then
  log "only $avail_gib GiB free under $OUT, need about $need_gib GiB (3 x $DEVICE_SIZE devices, 2 GiB spare)"; exit 1
fi

# ---------- install / build ----------
if ! { [ -x "$FIO" ] && "$FIO" --enghelp 2>/dev/null | grep -qw http; }; then
  log "building fio with the http engine (../shared/tools/build-fio.sh)"
  /work/shared/tools/build-fio.sh "$(dirname "$(dirname "$FIO")")" >"$OUT/fio-build.log" 2>&1 \
    || { tail -20 "$OUT/fio-build.log"; exit 1; }
fi
command -v curl >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
TP=${TP_BIN:-}
if [ -z "$TP" ]; then
  log "building target/release/tidepool"
  # The shared working tree can hold someone's half-done edit: then say so and stop (TP_BIN=...
  # runs an existing binary).
  cargo build --release -p tidepool >"$OUT/tidepool-build.log" 2>&1 \
    || { tail -n 20 "$OUT/tidepool-build.log"; log "the working tree does not build: fix it, or TP_BIN=path/to/tidepool"; exit 1; }
  TP=$ROOT/target/release/tidepool
  TP_COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench' ':!BENCHMARKS.md' || echo '+uncommitted changes')"
fi
TP_COMMIT=${TP_COMMIT:-"$TP (built $(date -u -r "$TP" +%FT%TZ))"}
log "building bench/nfs-client (nfs3_client; own target dir)"
(cd bench/nfs-client && CARGO_TARGET_DIR=$OUT/client-target cargo build --release 2>&1 | tail -1)
CLIENT=$OUT/client-target/release/nfs-bench-client

# ---------- ports free on 127.0.0.1..3 ----------
read -r CLUSTER_PORT S3_PORT NFS_PORT HTTP_PORT < <(python3 - <<'EOF'
import socket
got = []
while len(got) < 4:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    ok = True
    for ip in ("127.0.0.2", "127.0.0.3"):
        t = socket.socket()
        try: t.bind((ip, p))
        except OSError: ok = False
        t.close()
    s.close()
    if ok and p not in got: got.append(p)
print(*got)
EOF
)
export CLUSTER_PORT S3_PORT NFS_PORT HTTP_PORT
log "ports: cluster $CLUSTER_PORT, S3 $S3_PORT, NFS $NFS_PORT, http $HTTP_PORT"

# ---------- clusters ----------
DIRS=()
stop_side() { # dir
  [ -f "$1/pids" ] && deploy/local/cluster.sh stop "$1" >&2 || true
  [ "${KEEP_DATA:-0}" = 1 ] || rm -rf "$1"
}
cleanup() {
  for d in "${DIRS[@]}"; do stop_side "$d"; done
  rm -f "$OUT"/runs/*.fio
}
trap cleanup EXIT

status() { curl -sf --max-time 5 "http://127.0.0.$1:$HTTP_PORT/status"; }
s3() { # method path [curl args...]
  local m=$1 p=$2; shift 2
  # curl 7.88 signs but does not send x-amz-content-sha256, which the server requires: the
  # SHA-256 of an empty body.
  curl -sS --max-time 60 --aws-sigv4 "aws:amz:us-east-1:s3" --user "$KEY:$SECRET" -X "$m" \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" "$@" "http://127.0.0.1:$S3_PORT$p"
}

start_side() { # n dir
  local n=$1 dir=$2
  rm -rf "$dir"; DIRS+=("$dir")
  env DETACH=1 TIDEPOOL_BIN="$TP" TIDEPOOL_DEVICE_SIZE="$DEVICE_SIZE" \
    TIDEPOOL_TIER_AFTER_SECS=86400 TIDEPOOL_DIRTY_HIGH="$(( dev_gib * 1024 * 80 / 100 ))MiB" \
    TIDEPOOL_DIRTY_LIMIT="$(( dev_gib * 1024 * 90 / 100 ))MiB" \
    TIDEPOOL_S3_ACCESS_KEY_ID=$KEY TIDEPOOL_S3_SECRET_ACCESS_KEY=$SECRET \
    deploy/local/cluster.sh "$n" "$dir" >"$dir.start.log" 2>&1 || { cat "$dir.start.log" >&2; return 1; }
  # Ready: every node sees n voters and a leader, and S3 answers (bucket made).
  for _ in $(seq 1 300); do
    local ok=1
    for i in $(seq 1 "$n"); do
      status "$i" | python3 -c "import json,sys; m=json.load(sys.stdin)['meta']; sys.exit(not (m['leader_id'] and len(m['voters'])==$n))" 2>/dev/null || ok=0
    done
    [ "$ok" = 1 ] && s3 PUT /bench -o /dev/null -w '%{http_code}' 2>/dev/null | grep -qE '^(200|409)$' && return 0
    sleep 0.2
  done
  log "the $n-node cluster under $dir did not become ready"; tail -n 20 "$dir"/node*.log >&2; return 1
}
role_nodes() { # n -> "LEADER FOLLOWER" (node numbers)
  local leader="" follower=""
  for i in $(seq 1 "$1"); do
    case $(status "$i" | python3 -c "import json,sys; print(json.load(sys.stdin)['meta']['role'])") in
      leader) leader=$i ;; *) [ -z "$follower" ] && follower=$i ;;
    esac
  done
  echo "$leader ${follower:-none}"
}

wait_quiet() { # up to $1 seconds
  for _ in $(seq 1 $(( $1 / 10 ))); do
    awk -v q="$QUIET_LOAD" '{exit !($1 < q)}' /proc/loadavg && return 0
    sleep 10
  done
  [ "$1" -gt 0 ] || return 0
  awk -v q="$QUIET_LOAD" '{exit !($1 < q)}' /proc/loadavg || log "load still $(cut -d' ' -f1 /proc/loadavg) after $1 s: measuring anyway"
}

# ---------- cases ----------
RES=$OUT/results.txt
creates() { # round side via node conns files
  local r=$1 side=$2 via=$3 node=$4 conns=$5 files=$6
  log "round $r $side via $via (node $node): $files creates, $conns conns"
  echo "round=$r side=$side via=$via node=$node $("$CLIENT" small "127.0.0.$node" "$NFS_PORT" "$NFS_PORT" / "c-$via-$conns" "$files" 0 "$conns")" | tee -a "$RES"
}
fio_objects() { # name rw n_nodes  (job k: object k, through node (k mod n)+1)
  local name=$1 rw=$2 n=$3 jf=$OUT/runs/$1.fio
  {
    echo "[global]"
    echo "ioengine=http"; echo "http_mode=s3"; echo "http_s3_keyid=$KEY"; echo "http_s3_key=$SECRET"
    echo "http_s3_region=us-east-1"; echo "rw=$rw"; echo "bs=${OBJ_MIB}m"; echo "size=${OBJ_MIB}m"
    [ "$rw" = read ] && echo "loops=$LOOPS"
    for k in $(seq 0 $((OBJECTS - 1))); do
      echo "[obj$k]"; echo "http_host=127.0.0.$(( k % n + 1 )):$S3_PORT"; echo "filename=/bench/obj$k"
    done
  } >"$jf"
  "$FIO" --output-format=json "$jf" >"$OUT/runs/$name.json" 2>"$OUT/runs/$name.err" || { cat "$OUT/runs/$name.err" >&2; return 1; }
  python3 - "$OUT/runs/$name.json" <<'EOF'
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
d = "read" if jobs[0]["read"]["io_bytes"] else "write"
b = sum(j[d]["io_bytes"] for j in jobs)
ms = max(j[d]["runtime"] for j in jobs)
print(f"bytes={b} secs={ms/1000:.2f} mb_per_sec={b/1e6/(ms/1000):.0f}")
EOF
}
counters() { # n -> "bytes_read peer_read_bytes read_through" summed over nodes
  for i in $(seq 1 "$1"); do status "$i"; echo; done | python3 -c '
import json, sys
t = [0, 0, 0]
for line in sys.stdin:
    if not line.strip(): continue
    s = json.loads(line); o = s["ops"]
    t[0] += o["bytes_read"]; t[1] += o["peer_read_bytes"]
    t[2] += sum(v for k, v in s["object_store"]["counters"].items() if "read" in k or "fetch" in k)
print(*t)'
}
reads() { # round side n
  local r=$1 side=$2 n=$3 line c0 c1
  log "round $r $side: PUT $OBJECTS x $OBJ_MIB MiB through $n node(s)"
  line=$(fio_objects "r$r-$side-put" write "$n")
  echo "round=$r side=$side op=put $line" | tee -a "$RES"
  # fio reads a missing object as zeros: check every object is there, whole.
  local listing; listing=$(s3 GET "/bench?list-type=2")
  for k in $(seq 0 $((OBJECTS - 1))); do
    echo "$listing" | grep -q "<Key>obj${k}_0_$((OBJ_MIB << 20))</Key>" \
      || { log "ERROR: object obj${k}_0_$((OBJ_MIB << 20)) missing after the PUT run; listing: $listing"; exit 1; }
  done
  sync
  c0=$(counters "$n")
  log "round $r $side: GET $OBJECTS x $OBJ_MIB MiB x $LOOPS loops, $OBJECTS jobs over $n node(s)"
  line=$(fio_objects "r$r-$side-get" read "$n")
  c1=$(counters "$n")
  echo "round=$r side=$side op=get $line $(python3 -c "
a = [int(x) for x in '$c0'.split()]; b = [int(x) for x in '$c1'.split()]
d = [y - x for x, y in zip(a, b)]
print(f'fs_bytes_read={d[0]} peer_read_bytes={d[1]} peer_share={d[1] / d[0] if d[0] else 0:.3f} bucket_read_counters={d[2]}')")" | tee -a "$RES"
}

run_side() { # round side
  local r=$1 side=$2 n dir
  if [ "$side" = cluster ]; then n=3; else n=1; fi
  dir=$OUT/data-$side
  wait_quiet "$QUIET_RUN"
  echo "round=$r side=$side op=load load1=$(cut -d' ' -f1 /proc/loadavg) at=$(date -u +%H:%M:%S)" | tee -a "$RES"
  log "round $r: starting $side ($n node(s)) under $dir"
  start_side "$n" "$dir"
  if [ "$n" = 3 ]; then
    read -r leader follower < <(role_nodes 3)
    log "leader node $leader, follower node $follower"
    creates "$r" cluster follower "$follower" 1 "$FILES_LAT"
    creates "$r" cluster leader "$leader" 1 "$FILES_LAT"
    creates "$r" cluster follower "$follower" "$CONNS_RATE" "$FILES_RATE"
    creates "$r" cluster leader "$leader" "$CONNS_RATE" "$FILES_RATE"
  else
    creates "$r" single alone 1 1 "$FILES_LAT"
    creates "$r" single alone 1 "$CONNS_RATE" "$FILES_RATE"
  fi
  reads "$r" "$side" "$n"
  stop_side "$dir"
}

: >"$RES"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); data on $(findmnt -no FSTYPE -T "$OUT") ($(df --output=source "$OUT" | tail -1)); $("$FIO" --version); tidepool $TP_COMMIT; device $DEVICE_SIZE per node" >"$OUT/machine.txt"
wait_quiet "$QUIET_START"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="cluster single"; else order="single cluster"; fi
  for s in $order; do run_side "$r" "$s"; done
done

# ---------- table: median of the rounds ----------
{
  cat "$OUT/machine.txt"
  python3 "$ROOT/bench/cluster/report.py" "$RES" "$OBJECTS" "$OBJ_MIB" "$LOOPS" "$CONNS_RATE"
} | tee "$OUT/result.txt"
echo "results: $OUT/result.txt (table), $RES (every run), $OUT/runs/ (fio JSON)"
