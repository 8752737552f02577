#!/usr/bin/env bash
# An N-node tidepool cluster on this machine, for tests, demos and benchmarks.
#
#   deploy/local/cluster.sh N [DIR]     start N nodes (1..254) under DIR (default ./tidepool-cluster),
#                                       print their endpoints, stop them all on Ctrl-C
#   deploy/local/cluster.sh stop DIR    stop a cluster started in the background (DETACH=1)
#
# Node i binds its own loopback address 127.0.0.i (on Linux all of 127/8 is local), so every
# node uses the same ports: transport 7100, S3 9000, NFS 11111, http 9100 (override with
# CLUSTER_PORT, S3_PORT, NFS_PORT, HTTP_PORT). All nodes tier to one local-folder bucket,
# file://DIR/bucket. Node 1 starts the cluster and prints an S3 key (pass
# TIDEPOOL_S3_ACCESS_KEY_ID / TIDEPOOL_S3_SECRET_ACCESS_KEY to choose it); nodes 2..N join it
# with the token node 1 wrote to DIR/node1/cluster.token. Any TIDEPOOL_* setting in the
# environment applies to every node (defaults here: TIDEPOOL_DEVICE_SIZE=1GiB,
# TIDEPOOL_SEGMENT_SIZE=64MiB). Each node's log is DIR/nodeI.log.
#
# The binary: $TIDEPOOL_BIN, else the newer of target/{release,debug}/tidepool, else `tidepool` on PATH.
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${TIDEPOOL_BIN:-}"
if [[ -z "$bin" ]]; then
  # The newer of this workspace's builds, else the one on PATH.
  for b in "$here/target/release/tidepool" "$here/target/debug/tidepool"; do
    [[ -x "$b" && ( -z "$bin" || "$b" -nt "$bin" ) ]] && bin="$b"
  done
  [[ -z "$bin" ]] && bin="$(command -v tidepool || true)"
  [[ -z "$bin" ]] && { echo "no tidepool binary: cargo build -p tidepool, or set TIDEPOOL_BIN" >&2; exit 2; }
fi

stop_dir() {
  local dir="$1" pid
  [[ -f "$dir/pids" ]] || { echo "no cluster running under $dir (no $dir/pids)" >&2; return 1; }
  while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$dir/pids"
  while read -r pid; do
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done <"$dir/pids"
  rm -f "$dir/pids"
  echo "stopped the cluster under $dir"
}

if [[ "${1:-}" == "stop" ]]; then
  stop_dir "${2:?usage: cluster.sh stop DIR}"
  exit
fi

n="${1:?usage: cluster.sh N [DIR] | cluster.sh stop DIR}"
[[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 254 ]] || { echo "N must be 1..254" >&2; exit 2; }
dir="$(mkdir -p "${2:-./tidepool-cluster}" && cd "${2:-./tidepool-cluster}" && pwd)"
[[ -f "$dir/pids" ]] && { echo "a cluster may be running under $dir: cluster.sh stop $dir first" >&2; exit 1; }
mkdir -p "$dir/bucket"
: "${TIDEPOOL_DEVICE_SIZE:=1GiB}" "${TIDEPOOL_SEGMENT_SIZE:=64MiB}"
export TIDEPOOL_DEVICE_SIZE TIDEPOOL_SEGMENT_SIZE
export TIDEPOOL_BUCKET="file://$dir/bucket"

start_node() {
  local i="$1"; shift
  local ip="127.0.0.$i" log="$dir/node$i.log"
  TIDEPOOL_CLUSTER_LISTEN="$ip:${CLUSTER_PORT:-7100}" TIDEPOOL_S3_LISTEN="$ip:${S3_PORT:-9000}" \
  TIDEPOOL_NFS_LISTEN="$ip:${NFS_PORT:-11111}" TIDEPOOL_HTTP_LISTEN="$ip:${HTTP_PORT:-9100}" \
    "$bin" --data-dir "$dir/node$i" up "$@" >"$log" 2>&1 &
  echo $! >>"$dir/pids"
  for _ in $(seq 1 600); do
    grep -q '^Ctrl-C to stop' "$log" && return 0
    kill -0 "$!" 2>/dev/null || { echo "node $i did not start:" >&2; cat "$log" >&2; return 1; }
    sleep 0.1
  done
  echo "node $i did not start within 60 s (see $log)" >&2
  return 1
}

trap 'stop_dir "$dir"; exit 0' INT TERM
start_node 1 || { stop_dir "$dir"; exit 1; }
token="$(cat "$dir/node1/cluster.token")"
for i in $(seq 2 "$n"); do
  start_node "$i" --join "127.0.0.1:${CLUSTER_PORT:-7100}" --token "$token" || { stop_dir "$dir"; exit 1; }
done

echo "tidepool cluster of $n nodes under $dir (bucket file://$dir/bucket)"
for i in $(seq 1 "$n"); do
  echo "  node $i  S3 http://127.0.0.$i:${S3_PORT:-9000}  NFS nfs://127.0.0.$i:${NFS_PORT:-11111}/  status http://127.0.0.$i:${HTTP_PORT:-9100}/status  log $dir/node$i.log"
done
grep -E '^  (S3 key|try) ' "$dir/node1.log" | sed 's/^/  /' || true
echo "  nodes         TIDEPOOL_HTTP_LISTEN=127.0.0.1:${HTTP_PORT:-9100} $bin --data-dir $dir/node1 node list"
if [[ -n "${DETACH:-}" ]]; then
  echo "running in the background: cluster.sh stop $dir"
  trap - INT TERM
  exit 0
fi
echo "Ctrl-C stops every node."
while true; do sleep 3600 & wait $! || true; done
