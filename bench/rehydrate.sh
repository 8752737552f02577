#!/usr/bin/env bash
# Spin-down and rehydrate, side by side with rclone (see BENCHMARKS.md, "Spin-down and
# rehydrate"). One local S3 server (bench/s3s-fs-server on loopback, which counts requests
# by S3 operation) holds three buckets, prepared once (untimed) and kept while their
# parameters stay the same:
#
#   tp-tree  a tidepool bucket: a mixed tree (LARGE_FILES x LARGE_SIZE, MEDIUM_FILES files of
#            1-10 MiB, SMALL_BYTES of SMALL_MIN..SMALL_MAX-byte files; fixed seed) written
#            into a node through its S3 front end, then `tidepool spin-down`;
#   plain    the same tree as plain objects (rclone copy from the local folder);
#   tp-ns    a tidepool bucket holding NS_DIRS x NS_FILES files of NS_SIZE bytes, spun down.
#
# Each round then measures, on a quiet machine (see QUIET_*):
#   1. `tidepool up --from s3://tp-tree/tp` (fresh data folder, default eager rehydration),
#      from process start until `tidepool rehydrate status --json` (polled every 100 ms)
#      says finished with bytes_done == bytes_total; versus `rclone copy plain: -> local
#      folder` (RCLONE_FLAGS, default --transfers 4 = rclone's default). GETs from the server.
#   2. during 1, TTFB_AT s after start (once rehydration has begun), the time to first byte
#      of two files rehydration has not reached (the last large and the last small file in
#      ino order: loaded last, so last in the queue), through tidepool's S3 front end: a GET
#      of a presigned URL, timed to the headers and to the first body byte;
#   3. `tidepool up --from s3://tp-ns/ns --rehydrate lazy`: time to the "loaded manifest"
#      line and to the first successful ListObjectsV2 of one folder (retried every 50 ms).
#
#   bench/rehydrate.sh                         # ROUNDS=3; the table at the end
#   ROUNDS=1 bench/rehydrate.sh
#   TIDEPOOL_REHYDRATE_PARALLELISM=16 bench/rehydrate.sh   # any TIDEPOOL_* reaches the measured nodes
#   RCLONE_FLAGS="--transfers 16" bench/rehydrate.sh
#   PARTS="eager ns" SIDES="tidepool rclone" bench/rehydrate.sh
#   SMALL=1 bench/rehydrate.sh                 # a quick smoke run of the harness (tiny data)
#
# Needs: rclone (apt-get install rclone if missing), python3, curl, cargo. Takes the
# s3s-fs-server that bench/tier.sh builds (builds it if missing) and builds
# target/release/tidepool (or takes TP_BIN). Everything lives under OUT (default
# target/bench-rehydrate): the server's data (kept: the prepared buckets), node data folders
# and rclone's destination (deleted after each run), logs, result.txt and runs.jsonl.
# Servers are stopped by their own pids on exit; every step runs under `timeout`.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/bench-rehydrate}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-eager ns}
SIDES=${SIDES:-tidepool rclone}
LARGE_FILES=${LARGE_FILES:-24}
LARGE_SIZE=${LARGE_SIZE:-128MiB}
MEDIUM_FILES=${MEDIUM_FILES:-8}
SMALL_BYTES=${SMALL_BYTES:-1GiB}
SMALL_MIN=${SMALL_MIN:-1024}
SMALL_MAX=${SMALL_MAX:-65536}
NS_DIRS=${NS_DIRS:-100}
NS_FILES=${NS_FILES:-1000}
NS_SIZE=${NS_SIZE:-100}
SEED=${SEED:-20261122}
DEVICE_SIZE=${DEVICE_SIZE:-6GiB}            # the rehydrating node's device: eager stops at evict_low = 80 % (4.9 GB here)
PREP_DEVICE_SIZE=${PREP_DEVICE_SIZE:-6GiB}  # the node that loads the tree before spin-down
NS_DEVICE_SIZE=${NS_DEVICE_SIZE:-2GiB}
RCLONE_FLAGS=${RCLONE_FLAGS:---transfers 4}
TTFB_AT=${TTFB_AT:-1.0}
QUIET_LOAD=${QUIET_LOAD:-1.5}               # wait for a 1-minute load under this ...
QUIET_WAIT=${QUIET_WAIT:-900}               # ... and no other bench script, at most this long before the first run
QUIET_WAIT_RUN=${QUIET_WAIT_RUN:-300}       # ... and before each later one
TIMEOUT=${TIMEOUT:-1800}                    # seconds any one step may take
TP=${TP_BIN:-}
KEY=BENCHACCESSKEY0001                      # the s3s-fs server's key
SECRET=benchsecretkey0123456789abcdefghijklmn
TPKEY=BENCHTIDEPOOLKEY0001                  # the tidepool nodes' S3 key
TPSECRET=benchtidepoolsecret0123456789abcdefghij
if [ "${SMALL:-0}" = 1 ]; then
  LARGE_FILES=3; LARGE_SIZE=16MiB; MEDIUM_FILES=2; SMALL_BYTES=8MiB; NS_DIRS=10; NS_FILES=100
  DEVICE_SIZE=2GiB; PREP_DEVICE_SIZE=2GiB; NS_DEVICE_SIZE=1GiB; ROUNDS=${SMALL_ROUNDS:-1}; QUIET_WAIT=0; QUIET_WAIT_RUN=0
  OUT=${OUT%/}-small
fi
SFS_DATA=$OUT/s3s-fs            # the server's data: the prepared buckets, kept between runs
TREE=$OUT/tree                  # the local tree (only while buckets are prepared)
NODE=$OUT/node                  # node data folders (deleted after each run)
DST=$OUT/rclone-dst             # rclone's destination (deleted after each run)
H="python3 $OUT/helper.py"
mkdir -p "$OUT/logs" "$OUT/buckets" "$SFS_DATA"
: >"$OUT/runs.jsonl"
log() { echo "[$(date +%T)] $*" >&2; }
bytes_of() { numfmt --from=iec-i "${1%B}"; }
calc() { awk "BEGIN {printf \"%.3f\", $1}"; }
load1() { cut -d' ' -f1 /proc/loadavg; }
jget() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1"; }

# ---------- the Python helper (tree generation, SigV4 client, timed runs) ----------
cat >"$OUT/helper.py" <<'PYEOF'
import datetime, hashlib, hmac, http.client, json, os, random, signal, subprocess, sys, threading, time
import urllib.parse
import xml.etree.ElementTree as ET

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
REGION = "us-east-1"


def q(s):
    return urllib.parse.quote(s, safe="-_.~")


def skey(secret, day):
    k = hmac.new(("AWS4" + secret).encode(), day.encode(), hashlib.sha256).digest()
    for part in (REGION, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


def s3_request(endpoint, key, secret, method, path, query=(), timeout=30):
    """One signed request on a new connection: (status, body)."""
    u = urllib.parse.urlparse(endpoint)
    now = datetime.datetime.now(datetime.timezone.utc)
    amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    cpath = "/".join(q(s) for s in path.split("/"))
    cq = "&".join(f"{q(k)}={q(v)}" for k, v in sorted(query))
    hdr = {"host": u.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz}
    signed = ";".join(sorted(hdr))
    creq = "\n".join([method, cpath, cq] + [f"{h}:{hdr[h]}" for h in sorted(hdr)] + ["", signed, payload])
    scope = f"{day}/{REGION}/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
    sig = hmac.new(skey(secret, day), sts.encode(), hashlib.sha256).hexdigest()
    hdr["authorization"] = f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={signed}, Signature={sig}"
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request(method, cpath + ("?" + cq if cq else ""), headers=hdr)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def presign(endpoint, key, secret, bucket, obj, expires=3600):
    u = urllib.parse.urlparse(endpoint)
    now = datetime.datetime.now(datetime.timezone.utc)
    amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/{REGION}/s3/aws4_request"
    path = "/" + bucket + "/" + obj
    cpath = "/".join(q(s) for s in path.split("/"))
    qs = [("X-Amz-Algorithm", "AWS4-HMAC-SHA256"), ("X-Amz-Credential", f"{key}/{scope}"),
          ("X-Amz-Date", amz), ("X-Amz-Expires", str(expires)), ("X-Amz-SignedHeaders", "host")]
    cq = "&".join(f"{q(k)}={q(v)}" for k, v in sorted(qs))
    creq = "\n".join(["GET", cpath, cq, f"host:{u.netloc}", "", "host", "UNSIGNED-PAYLOAD"])
    sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
    sig = hmac.new(skey(secret, day), sts.encode(), hashlib.sha256).hexdigest()
    return f"{endpoint}{cpath}?{cq}&X-Amz-Signature={sig}"


def list_keys(endpoint, key, secret, bucket, prefix, timeout=30):
    """One ListObjectsV2 page (delimiter /, 1000 keys): (status, keys)."""
    st, body = s3_request(endpoint, key, secret, "GET", "/" + bucket,
                          [("list-type", "2"), ("prefix", prefix), ("delimiter", "/"), ("max-keys", "1000")], timeout)
    if st != 200:
        return st, -1
    return st, sum(1 for _ in ET.fromstring(body).iter(NS + "Contents"))


def walk(endpoint, key, secret, bucket):
    """Every key of a bucket, pages of 1000: (seconds, keys)."""
    t0, n, token = time.monotonic(), 0, None
    while True:
        qq = [("list-type", "2"), ("max-keys", "1000")] + ([("continuation-token", token)] if token else [])
        st, body = s3_request(endpoint, key, secret, "GET", "/" + bucket, qq, 120)
        if st != 200:
            raise SystemExit(f"walk: ListObjectsV2 answered {st}: {body[:300]!r}")
        root = ET.fromstring(body)
        n += sum(1 for _ in root.iter(NS + "Contents"))
        token = root.findtext(NS + "NextContinuationToken") if root.findtext(NS + "IsTruncated") == "true" else None
        if not token:
            return time.monotonic() - t0, n


def gentree(tree, nl, ls, nm, small_bytes, lo, hi, seed):
    """The mixed tree; prints JSON: files, bytes, the two files loaded last and their md5."""
    r = random.Random(seed)
    os.makedirs(f"{tree}/large")
    os.makedirs(f"{tree}/medium")
    def write(path, n):
        h = hashlib.md5()
        with open(path, "wb") as f:
            while n:
                b = r.randbytes(min(n, 16 << 20)); f.write(b); h.update(b); n -= len(b)
        return h.hexdigest()
    md5 = {}
    for i in range(nl):
        md5[f"large/f{i:03}.bin"] = write(f"{tree}/large/f{i:03}.bin", ls)
    for i in range(nm):
        write(f"{tree}/medium/m{i:03}.bin", r.randint(1 << 20, 10 << 20))
    i = total = 0
    while total < small_bytes:
        d = f"{tree}/small/d{i // 100:03}"
        os.makedirs(d, exist_ok=True)
        n = min(r.randint(lo, hi), small_bytes - total)
        md5[f"small/d{i // 100:03}/f{i:05}.bin"] = write(f"{d}/f{i:05}.bin", n)
        total += n; i += 1
    last_large, last_small = f"large/f{nl - 1:03}.bin", f"small/d{(i - 1) // 100:03}/f{i - 1:05}.bin"
    files = nl + nm + i
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(tree) for f in fs)
    print(json.dumps({"files": files, "bytes": size, "small_files": i,
                      "cold": {last_large: md5[last_large], last_small: md5[last_small]}}))


def gen_ns(d, dirs, files, size):
    body = b"x" * size
    for i in range(dirs):
        os.makedirs(f"{d}/d{i:03}", exist_ok=True)
        for j in range(files):
            with open(f"{d}/d{i:03}/f{j:04}.txt", "wb") as f:
                f.write(body)


class Node:
    """`tidepool up ...` started now; stdout lines timestamped (seconds since start)."""

    def __init__(self, argv, cwd, log):
        self.ev, self.log = {}, open(log, "w")
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def t(self):
        return time.monotonic() - self.t0

    def _read(self):
        for line in self.p.stdout:
            t = self.t()
            self.log.write(f"[{t:9.3f}] {line}"); self.log.flush()
            if "loaded manifest epoch" in line and "manifest" not in self.ev:
                self.ev["manifest"] = t
            if " is up (" in line and "up" not in self.ev:
                self.ev["up"] = t

    def cpu(self):
        try:
            f = open(f"/proc/{self.p.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return None

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill(); self.p.wait()
        self.log.close()


def get_ttfb(url):
    """GET url: seconds to the response headers and to the first BODY byte (curl's
    time_starttransfer stops at the headers, which tidepool sends before it has fetched any
    data), the whole body, its md5."""
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    c.connect()
    t_conn = time.perf_counter()
    c.request("GET", u.path + "?" + u.query)
    r = c.getresponse()
    t_hdr = time.perf_counter()
    h = hashlib.md5()
    first = r.read(1)
    t_first = time.perf_counter()
    h.update(first)
    n = len(first)
    while b := r.read(1 << 20):
        h.update(b)
        n += len(b)
    t_end = time.perf_counter()
    c.close()
    return {"http": r.status, "connect_s": t_conn - t0, "headers_s": t_hdr - t0, "ttfb_s": t_first - t0,
            "total_s": t_end - t0, "bytes": n, "md5": h.hexdigest()}


def eager(a):
    """Part 1 (+ 3): up --from, poll rehydrate status every 100 ms until finished; TTFB."""
    env_cli = dict(os.environ, TIDEPOOL_HTTP_LISTEN=a["http"])
    status_cmd = [a["tp"], "--data-dir", a["data"], "rehydrate", "status", "--json"]
    node = Node([a["tp"], "--data-dir", a["data"], "up", "--from", a["from"]] + a.get("up_args", []),
                a["cwd"], a["log"])
    samples, last, res = [], {}, {"ttfb": []}
    slog = open(a["status_log"], "w")
    started = threading.Event()

    def ttfb():
        started.wait(a["timeout"])
        while node.t() < a["ttfb_at"]:
            time.sleep(0.01)
        for name, url, md5 in a["ttfb"]:
            at, before = node.t(), dict(last)
            r = get_ttfb(url)
            r.update(file=name, at_s=round(at, 3), md5_ok=r["md5"] == md5,
                     bytes_done_before=before.get("bytes_done"), bytes_total=before.get("bytes_total"),
                     files_done_before=before.get("files_done"))
            res["ttfb"].append(r)

    th = threading.Thread(target=ttfb, daemon=True)
    th.start()
    done = None
    try:
        while node.t() < a["timeout"]:
            tick = node.t()
            if node.p.poll() is not None:
                raise SystemExit(f"tidepool exited with {node.p.returncode}; see {a['log']}")
            r = subprocess.run(status_cmd, env=env_cli, capture_output=True, text=True, timeout=10)
            t = node.t()
            if r.returncode == 0:
                st = json.loads(r.stdout)
                last.clear(); last.update(st)
                slog.write(json.dumps({"t": round(t, 3), **st}) + "\n")
                samples.append(t)
                if st["bytes_done"] > 0 or st["finished"]:
                    started.set()
                if st["finished"] and st["bytes_done"] == st["bytes_total"]:
                    done = t
                    break
                if not st["active"] and st.get("stopped_reason"):
                    raise SystemExit(f"rehydration stopped: {st['stopped_reason']}")
            time.sleep(max(0.0, a["poll"] - (node.t() - tick)))
        if done is None:
            raise SystemExit(f"rehydration not finished after {a['timeout']} s")
        th.join(a["timeout"])
        cpu = node.cpu()
    finally:
        node.stop()
        slog.close()
    res.update(wall=round(done, 3), manifest_s=node.ev.get("manifest"), up_s=node.ev.get("up"),
               first_status_s=round(samples[0], 3) if samples else None, polls=len(samples),
               bytes_total=last["bytes_total"], bytes_done=last["bytes_done"], files_total=last["files_total"],
               files_done=last["files_done"], node_reported_secs=last["elapsed_secs"], node_cpu_s=cpu)
    print(json.dumps(res))


def ns(a):
    """Part 2: up --from --rehydrate lazy; time to the manifest line and to the first listing."""
    node = Node([a["tp"], "--data-dir", a["data"], "up", "--from", a["from"], "--rehydrate", "lazy"],
                a["cwd"], a["log"])
    tries, errors, ok = 0, {}, None
    try:
        while node.t() < a["timeout"]:
            tick = node.t()
            if node.p.poll() is not None:
                raise SystemExit(f"tidepool exited with {node.p.returncode}; see {a['log']}")
            tries += 1
            try:
                st, n = list_keys(a["s3"], a["key"], a["secret"], a["bucket"], a["prefix"], 10)
                if st == 200 and n == a["expect"]:
                    ok = node.t()
                    break
                errors[f"{st} ({n} keys)"] = errors.get(f"{st} ({n} keys)", 0) + 1
            except OSError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            time.sleep(max(0.0, 0.05 - (node.t() - tick)))
        if ok is None:
            raise SystemExit(f"no listing after {a['timeout']} s: {errors}")
        walk_s, keys = walk(a["s3"], a["key"], a["secret"], a["bucket"])
        cpu = node.cpu()
    finally:
        node.stop()
    import re
    gc = sum(int(m) for m in re.findall(r"rewritten_objects: (\d+)", open(a["log"], errors="replace").read()))
    print(json.dumps({"gc_rewritten_objects": gc, "stop_s": round(node.t() - ok, 3) if ok else None,
                      "manifest_s": node.ev.get("manifest"), "up_s": node.ev.get("up"), "ls_s": round(ok, 3),
                      "ls_after_manifest_s": round(ok - node.ev["manifest"], 3), "tries": tries,
                      "failed_tries": errors, "walk_s": round(walk_s, 3), "walk_keys": keys, "node_cpu_s": cpu}))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "gentree":
        gentree(args[0], *map(int, args[1:]))
    elif cmd == "gen-ns":
        gen_ns(args[0], *map(int, args[1:]))
    elif cmd == "mb":  # ENDPOINT KEY SECRET BUCKET [WAIT_S]: retried until the server answers
        end = time.monotonic() + float(args[4] if len(args) > 4 else 30)
        while True:
            try:
                st, body = s3_request(*args[:3], "PUT", "/" + args[3])
                if st in (200, 409):
                    return
                raise SystemExit(f"CreateBucket answered {st}: {body[:300]!r}")
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
    elif cmd == "presign":  # ENDPOINT KEY SECRET BUCKET OBJECT
        print(presign(*args))
    elif cmd in ("eager", "ns"):
        globals()[cmd](json.loads(args[0]))
    elif cmd == "report":
        report(args[0])


def report(path):
    import statistics
    runs = [json.loads(l) for l in open(path) if l.strip()]
    med = statistics.median
    def gets(c):
        return c.get("GetObject", {}).get("n", 0)
    rows = []
    res = {}
    for side in ("tidepool", "rclone"):
        rs = [r for r in runs if r["part"] == "eager" and r["side"] == side]
        if not rs:
            continue
        wall = med([r["wall"] for r in rs]); b = rs[0]["bytes"]
        res[side] = wall
        rows.append(("tidepool up --from (eager)" if side == "tidepool" else "rclone copy " + rs[0]["rclone_flags"],
                     f"{wall:.2f}", f"{b / 1e6 / wall:.0f}", f"{med([gets(r['counts']) for r in rs]):.0f}",
                     f"{med([sum(v['n'] for k, v in r['counts'].items() if k != 'GetObject') for r in rs]):.0f}",
                     f"{med([r['client_cpu'] for r in rs]) * 100 / wall:.0f} / {med([r['server_cpu'] for r in rs]) * 100 / wall:.0f}",
                     ", ".join(f"{r['wall']:.2f}" for r in rs),
                     ", ".join(f"{r['load']:.2f}-{r.get('load_end', r['load']):.2f}" for r in rs),
                     ", ".join("%.0f-%.0f" % tuple(r.get("cached_pct", [0, 0])) for r in rs)))
    hdr = ("side", "wall s", "MB/s", "GETs", "other reqs", "cpu % client / server", "rounds (wall s)", "load (1 min, start-end)",
           "bucket % in page cache (start-end)")
    if rows:
        r0 = [r for r in runs if r["part"] == "eager"][0]
        print(f"tree: {r0['files']} files, {r0['bytes']} bytes ({r0['bytes'] / 1e6:.0f} MB); median of {max(len([r for r in runs if r['part'] == 'eager' and r['side'] == s]) for s in ('tidepool', 'rclone'))} round(s)")
        w = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(len(hdr))]
        for x in [hdr, tuple("-" * n for n in w)] + rows:
            print("| " + " | ".join(str(v).ljust(n) for v, n in zip(x, w)) + " |")
        if len(res) == 2:
            s = res["rclone"] / res["tidepool"]
            print(f"goal: tidepool at least 2x rclone: {s:.2f}x -> {'met' if s >= 2 else 'MISSED'}")
        for r in [r for r in runs if r["part"] == "eager" and r["side"] == "tidepool"]:
            print(f"  round {r['round']} tidepool: manifest loaded at {r['manifest_s']:.3f} s, node up at {r['up_s']:.3f} s, "
                  f"rehydrated {r['files_done']}/{r['files_total']} files, {r['bytes_done']}/{r['bytes_total']} bytes; "
                  f"node's own rehydrate time {r['node_reported_secs']:.2f} s")
        for r in [r for r in runs if r["part"] == "eager" and r["side"] == "rclone"]:
            print(f"  round {r['round']} rclone: {r['wall']:.2f} s, then `sync -f` of the destination {r['sync_s']:.2f} s")
        print("(GETs = GetObject at the server; other reqs: List/Head/...; cpu: client = the tidepool node or rclone, "
              "server = s3s-fs, in % of one core over the wall time)")
        print()
    for r in [r for r in runs if r["part"] == "eager" and r["side"] == "tidepool"]:
        for t in r["ttfb"]:
            print(f"TTFB round {r['round']}: {t['file']} ({t['bytes']} B) fired at {t['at_s']:.2f} s after start "
                  f"(rehydrated then: {t['bytes_done_before']}/{t['bytes_total']} B): first body byte {t['ttfb_s'] * 1000:.1f} ms "
                  f"(headers {t['headers_s'] * 1000:.1f} ms), whole file {t['total_s'] * 1000:.0f} ms, HTTP {t['http']}, "
                  f"md5 {'ok' if t['md5_ok'] else 'WRONG'}")
    for r in [r for r in runs if r["part"] == "ttfb-ref"]:
        for t in r["ttfb"]:
            print(f"TTFB reference (same object straight from s3s-fs, bucket plain): {t['file']}: first body byte "
                  f"{t['ttfb_s'] * 1000:.1f} ms (headers {t['headers_s'] * 1000:.1f} ms), whole file {t['total_s'] * 1000:.0f} ms")
    nsr = [r for r in runs if r["part"] == "ns"]
    if nsr:
        print()
        print(f"namespace of {nsr[0]['files']} files (up --from --rehydrate lazy; median of {len(nsr)}):")
        m, l = med([r["manifest_s"] for r in nsr]), med([r["ls_s"] for r in nsr])
        d = med([r["ls_after_manifest_s"] for r in nsr])
        print(f"  manifest downloaded and loaded: {m:.3f} s after start; first successful listing: {l:.3f} s; "
              f"difference {d:.3f} s (goal < 2 s: {'met' if d < 2 else 'MISSED'})")
        for r in nsr:
            print(f"  round {r['round']}: manifest {r['manifest_s']:.3f} s, node up {r['up_s']:.3f} s, ls {r['ls_s']:.3f} s "
                  f"({r['tries']} tries), walk of all {r['walk_keys']} keys {r['walk_s']:.2f} s, "
                  f"GETs {gets(r['counts'])} (GC rewrote {r.get('gc_rewritten_objects', '?')} objects meanwhile), load {r['load']:.2f}")


if __name__ == "__main__":
    main()
PYEOF

# ---------- install and build ----------
if ! command -v rclone >/dev/null; then
  log "installing rclone (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null
fi
S3SFS=$ROOT/target/bench-s3/s3s-fs-server-target/release/s3s-fs-server
if [ ! -x "$S3SFS" ]; then
  log "building bench/s3s-fs-server (own target dir)"
  (cd bench/s3s-fs-server && CARGO_TARGET_DIR=$ROOT/target/bench-s3/s3s-fs-server-target \
    timeout "$TIMEOUT" cargo build --release --locked 2>&1 | tail -1)
fi
if [ -z "$TP" ]; then
  log "building tidepool (cargo build --release -p tidepool)"
  if timeout 3600 cargo build --release -p tidepool >"$OUT/logs/tidepool-build.log" 2>&1; then
    TP=$ROOT/target/release/tidepool
    TP_COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench' ':!tests' || echo '+uncommitted changes')"
  else
    # The shared working tree can hold someone's half-done edit: build the last commit instead.
    log "the working tree does not build (see $OUT/logs/tidepool-build.log): building HEAD from git archive"
    rm -rf "$OUT/src" && mkdir -p "$OUT/src" && git archive HEAD | tar -x -C "$OUT/src"
    (cd "$OUT/src" && CARGO_TARGET_DIR=$ROOT/target/bench-s3/tp-target timeout 3600 cargo build --release -p tidepool 2>&1 | tail -1)
    TP=$ROOT/target/bench-s3/tp-target/release/tidepool
    TP_COMMIT=$(git rev-parse --short HEAD)
  fi
fi
TP_COMMIT=${TP_COMMIT:-$("$TP" --version)}

# ---------- the server (its data is kept: the prepared buckets) ----------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SF_PID=""; TP_PID=""
stop_pid() {
  [ -n "$1" ] || return 0
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$1" 2>/dev/null || true
}
cleanup() { stop_pid "$TP_PID"; stop_pid "$SF_PID"; rm -rf "$NODE" "$DST" "$TREE" "$OUT/ns-tree"; }
trap cleanup EXIT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
counts() { curl -sf "http://127.0.0.1:$SF_CNT/$1"; }
free_bytes() { df --output=avail -B1 "$OUT" | tail -1; }
need_free() { # bytes what: waits (up to QUIET_WAIT s) for the space, since others' benchmarks come and go
  local have t0=$SECONDS
  while have=$(free_bytes); [ "$have" -lt "$1" ]; do
    if [ $((SECONDS - t0)) -ge "$QUIET_WAIT" ]; then
      log "ERROR: $2 needs $(numfmt --to=iec-i "$1")B free under $OUT, there are $(numfmt --to=iec-i "$have")B"; exit 1
    fi
    log "$2 needs $(numfmt --to=iec-i "$1")B free under $OUT, there are $(numfmt --to=iec-i "$have")B: waiting"
    sleep 15
  done
}

SF_PORT=$(free_port); SF_CNT=$(free_port)
"$S3SFS" 127.0.0.1:"$SF_PORT" "$SFS_DATA" $KEY $SECRET 127.0.0.1:"$SF_CNT" >"$OUT/logs/s3s-fs.log" 2>&1 &
SF_PID=$!
for _ in $(seq 1 100); do counts counts >/dev/null 2>&1 && break; sleep 0.1; done
SF_URL=http://127.0.0.1:$SF_PORT
log "s3s-fs-server pid $SF_PID on $SF_URL (counts on :$SF_CNT), data under $SFS_DATA"
export RCLONE_CONFIG_SF_TYPE=s3 RCLONE_CONFIG_SF_PROVIDER=Other RCLONE_CONFIG_SF_ENDPOINT=$SF_URL \
  RCLONE_CONFIG_SF_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_SF_SECRET_ACCESS_KEY=$SECRET \
  RCLONE_CONFIG_SF_FORCE_PATH_STYLE=true RCLONE_CONFIG_SF_REGION=us-east-1
rclone_() { env -u AWS_CA_BUNDLE timeout "$TIMEOUT" rclone "$@"; }

b64() { python3 -c 'import base64,sys; print(base64.urlsafe_b64encode(sys.argv[1].encode()).decode().rstrip("="))' "$1"; }
drop_bucket() { # name: its folder and s3s-fs's per-object files (.bucket-<base64 name>.* at the root)
  rm -rf "${SFS_DATA:?}/$1" "$OUT/buckets/$1.params"
  find "$SFS_DATA" -maxdepth 1 -name ".bucket-$(b64 "$1").*" -delete
}
fresh_bucket() { drop_bucket "$1"; $H mb "$SF_URL" $KEY $SECRET "$1"; }
bucket_bytes() { du -sb "$SFS_DATA/$1" | cut -f1; }
warm() { # read a bucket's files once, so that both sides are served from the page cache
  find "$SFS_DATA/$1" -type f -print0 | xargs -0 -r cat >/dev/null
  find "$SFS_DATA" -maxdepth 1 -name ".bucket-$(b64 "$1").*" -print0 | xargs -0 -r cat >/dev/null
}
resident() { # % of a bucket's bytes in the page cache (others' work on this machine can evict them)
  find "$SFS_DATA/$1" -type f -print0 | xargs -0 -r fincore -b -n -o RES,SIZE 2>/dev/null \
    | awk '{r += $1; s += $2} END {printf "%.1f", s ? 100 * r / s : 0}'
}

# node_env PREFIX: the settings of every node (ports chosen here); any TIDEPOOL_* of the caller
# is passed on by the environment.
node_ports() { TP_S3=$(free_port); TP_HTTP=$(free_port); TP_NFS=$(free_port); }
node_env() { # device_size
  echo env TIDEPOOL_S3_ACCESS_KEY_ID=$TPKEY TIDEPOOL_S3_SECRET_ACCESS_KEY=$TPSECRET \
    TIDEPOOL_S3_LISTEN=127.0.0.1:$TP_S3 TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP \
    TIDEPOOL_NFS_LISTEN=127.0.0.1:$TP_NFS TIDEPOOL_DEVICE_SIZE=$1 TIDEPOOL_BUCKET_ENDPOINT=$SF_URL \
    AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=us-east-1
}

# prep_node NAME BUCKET_URL DEVICE: a node that takes writes with tiering held back
prep_node() {
  rm -rf "$NODE"; mkdir -p "$NODE"
  node_ports
  # shellcheck disable=SC2046
  (cd "$NODE" && exec $(node_env "$3") TIDEPOOL_TIER_AFTER_SECS=360000 \
    TIDEPOOL_DIRTY_HIGH="$3" TIDEPOOL_DIRTY_LIMIT="$3" TIDEPOOL_SNAPSHOT_INTERVAL_SECS=0 \
    "$TP" --data-dir "$NODE/data" up --bucket "$2") >"$OUT/logs/prep-$1.log" 2>&1 &
  TP_PID=$!
  $H mb "http://127.0.0.1:$TP_S3" $TPKEY $TPSECRET "$4" 120 \
    || { log "the prep node did not come up; see $OUT/logs/prep-$1.log"; tail -5 "$OUT/logs/prep-$1.log"; exit 1; }
  export RCLONE_CONFIG_TP_TYPE=s3 RCLONE_CONFIG_TP_PROVIDER=Other RCLONE_CONFIG_TP_ENDPOINT=http://127.0.0.1:$TP_S3 \
    RCLONE_CONFIG_TP_ACCESS_KEY_ID=$TPKEY RCLONE_CONFIG_TP_SECRET_ACCESS_KEY=$TPSECRET \
    RCLONE_CONFIG_TP_FORCE_PATH_STYLE=true RCLONE_CONFIG_TP_REGION=us-east-1
}
spin_down() { # name bytes: check every byte is in, spin down, stop the node
  local st dirty
  st=$(TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP "$TP" --data-dir "$NODE/data" tier status / --json)
  dirty=$(echo "$st" | jget path.dirty_bytes)
  if [ "$dirty" != "$2" ]; then log "ERROR: the node holds $dirty dirty bytes after the load, not $2"; echo "$st" >&2; exit 1; fi
  log "prep $1: tidepool spin-down ($dirty dirty bytes)"
  local t0; t0=$(date +%s.%N)
  TIDEPOOL_HTTP_LISTEN=127.0.0.1:$TP_HTTP timeout "$TIMEOUT" "$TP" --data-dir "$NODE/data" spin-down \
    >"$OUT/logs/prep-$1-spin-down.out" 2>&1 || { log "spin-down failed"; cat "$OUT/logs/prep-$1-spin-down.out"; exit 1; }
  log "prep $1: $(grep -m1 '^uploaded' "$OUT/logs/prep-$1-spin-down.out") ($(calc "$(date +%s.%N) - $t0") s)"
  stop_pid "$TP_PID"; TP_PID=""; rm -rf "$NODE"
}

# ---------- prepare the buckets (untimed; kept while their parameters match) ----------
TREE_PARAMS="v2 large=$LARGE_FILES x $LARGE_SIZE medium=$MEDIUM_FILES x 1-10MiB small=$SMALL_BYTES of $SMALL_MIN..$SMALL_MAX seed=$SEED"
NS_PARAMS="ns=$NS_DIRS x $NS_FILES x $NS_SIZE B"
have_bucket() { [ "$(head -1 "$OUT/buckets/$1.params" 2>/dev/null)" = "$2" ] && [ -d "$SFS_DATA/$1" ]; }
case " $PARTS " in *" eager "*)
  if ! have_bucket tp-tree "$TREE_PARAMS" || ! have_bucket plain "$TREE_PARAMS"; then
    drop_bucket tp-tree; drop_bucket plain
    est=$(( LARGE_FILES * $(bytes_of "$LARGE_SIZE") + MEDIUM_FILES * (6 << 20) + $(bytes_of "$SMALL_BYTES") ))
    need_free $(( 2 * est + $(bytes_of "$PREP_DEVICE_SIZE") + (1 << 30) )) "preparing the tree buckets"
    log "writing the tree under $TREE ($TREE_PARAMS)"
    rm -rf "$TREE"
    python3 "$OUT/helper.py" gentree "$TREE" "$LARGE_FILES" "$(bytes_of "$LARGE_SIZE")" "$MEDIUM_FILES" \
      "$(bytes_of "$SMALL_BYTES")" "$SMALL_MIN" "$SMALL_MAX" "$SEED" >"$OUT/tree.json"
    log "tree: $(cat "$OUT/tree.json" | head -c 200)"
    TREE_BYTES=$(jget bytes <"$OUT/tree.json")
    mapfile -t COLD < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["cold"]))' "$OUT/tree.json")
    # tidepool: the tree through a node's S3 front end; the two "cold" files last (highest
    # inos: last in rehydration's queue), then spin-down.
    $H mb "$SF_URL" $KEY $SECRET tp-tree
    prep_node tree s3://tp-tree/tp "$PREP_DEVICE_SIZE" load
    log "prep tree: loading $TREE_BYTES bytes into the node through its S3 front end (rclone --transfers 8)"
    t0=$(date +%s.%N)
    rclone_ copy "$TREE" tp:load --transfers 8 --exclude "/${COLD[0]}" --exclude "/${COLD[1]}" >"$OUT/logs/prep-tree-load.out" 2>&1 \
      || { log "loading failed"; tail -20 "$OUT/logs/prep-tree-load.out"; exit 1; }
    for f in "${COLD[@]}"; do rclone_ copyto "$TREE/$f" "tp:load/$f" >>"$OUT/logs/prep-tree-load.out" 2>&1; done
    log "prep tree: loaded in $(calc "$(date +%s.%N) - $t0") s"
    spin_down tree "$TREE_BYTES"
    # the same tree as plain objects
    fresh_bucket plain
    log "prep plain: rclone copy of the tree into bucket plain"
    rclone_ copy "$TREE" sf:plain --transfers 8 >"$OUT/logs/prep-plain.out" 2>&1 \
      || { log "rclone into plain failed"; tail -20 "$OUT/logs/prep-plain.out"; exit 1; }
    for b in tp-tree plain; do { echo "$TREE_PARAMS"; cat "$OUT/tree.json"; } >"$OUT/buckets/$b.params"; done
    rm -rf "$TREE"
    counts reset >/dev/null
  fi
  TREE_BYTES=$(sed -n 2p "$OUT/buckets/tp-tree.params" | jget bytes)
  TREE_FILES=$(sed -n 2p "$OUT/buckets/tp-tree.params" | jget files)
  log "bucket tp-tree: $(bucket_bytes tp-tree) bytes; bucket plain: $(bucket_bytes plain) bytes; tree $TREE_FILES files, $TREE_BYTES bytes"
;; esac
case " $PARTS " in *" ns "*)
  if ! have_bucket tp-ns "$NS_PARAMS"; then
    drop_bucket tp-ns
    log "writing $NS_PARAMS under $OUT/ns-tree"
    rm -rf "$OUT/ns-tree"; python3 "$OUT/helper.py" gen-ns "$OUT/ns-tree" "$NS_DIRS" "$NS_FILES" "$NS_SIZE"
    $H mb "$SF_URL" $KEY $SECRET tp-ns
    prep_node ns s3://tp-ns/ns "$NS_DEVICE_SIZE" names
    log "prep ns: loading $((NS_DIRS * NS_FILES)) files through the node's S3 front end (rclone --transfers 16)"
    t0=$(date +%s.%N)
    rclone_ copy "$OUT/ns-tree" tp:names --transfers 16 --checkers 16 >"$OUT/logs/prep-ns-load.out" 2>&1 \
      || { log "loading failed"; tail -20 "$OUT/logs/prep-ns-load.out"; exit 1; }
    log "prep ns: loaded in $(calc "$(date +%s.%N) - $t0") s"
    spin_down ns $((NS_DIRS * NS_FILES * NS_SIZE))
    echo "$NS_PARAMS" >"$OUT/buckets/tp-ns.params"
    rm -rf "$OUT/ns-tree"
    counts reset >/dev/null
  fi
;; esac

# ---------- measured runs ----------
QUIET_FIRST=1
wait_quiet() {
  local t0=$SECONDS others l limit=$QUIET_WAIT
  [ "$QUIET_FIRST" = 1 ] || limit=$QUIET_WAIT_RUN
  QUIET_FIRST=0
  while :; do
    others=$(pgrep -af 'bench/(tier|s3|device)\.sh' || true); l=$(load1)
    if [ -z "$others" ] && awk "BEGIN {exit !($l < $QUIET_LOAD)}"; then return 0; fi
    if [ $((SECONDS - t0)) -ge "$limit" ]; then
      log "not quiet after ${limit}s (load $l${others:+; running: $others}): running anyway"; return 0
    fi
    log "waiting for a quiet machine (load $l${others:+; running: $(echo "$others" | cut -c1-80 | tr '\n' ' ')})"
    sleep 15
  done
}
snapshot_top() { top -bn1 -w 200 | head -15 >"$OUT/logs/$1.top"; }

record() { # json: one line into runs.jsonl
  echo "$1" >>"$OUT/runs.jsonl"
}

run_tidepool() { # round
  local r=$1 tag=r$1-tidepool
  need_free $(( $(bytes_of "$DEVICE_SIZE") + (1 << 30) )) "the rehydrating node"
  rm -rf "$NODE"; mkdir -p "$NODE"; node_ports
  local urls; urls=$(python3 - "$OUT/buckets/tp-tree.params" "http://127.0.0.1:$TP_S3" <<EOF
import json, subprocess, sys
cold = json.loads(open(sys.argv[1]).read().split("\n", 1)[1])["cold"]
print(json.dumps([[f, subprocess.check_output(["python3", "$OUT/helper.py", "presign", sys.argv[2], "$TPKEY", "$TPSECRET", "load", f], text=True).strip(), m]
                  for f, m in sorted(cold.items(), key=lambda kv: kv[0].startswith("large"))]))
EOF
)
  wait_quiet; sync; warm tp-tree; snapshot_top "$tag"
  local l; l=$(load1)
  local res0; res0=$(resident tp-tree)
  counts reset >/dev/null
  local c0; c0=$(cpu_ticks "$SF_PID")
  log "round $r tidepool: up --from s3://tp-tree/tp (eager), device $DEVICE_SIZE, load $l, bucket $res0 % in the page cache"
  local cfg; cfg=$(python3 -c 'import json,sys; print(json.dumps(dict(tp=sys.argv[1], data=sys.argv[2]+"/data", cwd=sys.argv[2], http=sys.argv[3],
      **{"from": "s3://tp-tree/tp"}, log=sys.argv[4], status_log=sys.argv[5], ttfb_at=float(sys.argv[6]), ttfb=json.loads(sys.argv[7]),
      timeout=float(sys.argv[8]), poll=0.1)))' \
      "$TP" "$NODE" "127.0.0.1:$TP_HTTP" "$OUT/logs/$tag.log" "$OUT/logs/$tag-status.jsonl" "$TTFB_AT" "$urls" "$TIMEOUT")
  local res
  # shellcheck disable=SC2046
  res=$(exec $(node_env "$DEVICE_SIZE") timeout $((TIMEOUT + 120)) python3 "$OUT/helper.py" eager "$cfg") \
    || { log "round $r tidepool failed; see $OUT/logs/$tag.log"; tail -5 "$OUT/logs/$tag.log"; exit 1; }
  local c1; c1=$(cpu_ticks "$SF_PID")
  local cnt; cnt=$(counts reset)
  local le; le=$(load1)
  local res1; res1=$(resident tp-tree)
  rm -rf "$NODE"
  record "$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(part="eager", side="tidepool", round=int(sys.argv[2]),
      bytes=int(sys.argv[3]), files=int(sys.argv[4]), counts=json.loads(sys.argv[5]), server_cpu=float(sys.argv[6]),
      client_cpu=d["node_cpu_s"], load=float(sys.argv[7]), load_end=float(sys.argv[8]),
      cached_pct=[float(sys.argv[9]), float(sys.argv[10])]); print(json.dumps(d))' \
      "$res" "$r" "$TREE_BYTES" "$TREE_FILES" "$cnt" "$(calc "($c1 - $c0) / $(getconf CLK_TCK)")" "$l" "$le" "$res0" "$res1")"
  log "round $r tidepool: $(echo "$res" | python3 -c 'import json,sys; d=json.load(sys.stdin); ts="; ".join("TTFB %s %.1f ms" % (t["file"], t["ttfb_s"]*1000) for t in d["ttfb"]); print("%s s, %s/%s B; %s" % (d["wall"], d["bytes_done"], d["bytes_total"], ts))')"
}

run_rclone() { # round
  local r=$1 tag=r$1-rclone
  need_free $(( TREE_BYTES * 11 / 10 + (1 << 30) )) "rclone's destination"
  rm -rf "$DST"; mkdir -p "$DST"
  wait_quiet; sync; warm plain; snapshot_top "$tag"
  local l; l=$(load1)
  local res0; res0=$(resident plain)
  counts reset >/dev/null
  local c0; c0=$(cpu_ticks "$SF_PID")
  log "round $r rclone: rclone copy sf:plain $DST $RCLONE_FLAGS, load $l, bucket $res0 % in the page cache"
  local t0 t1 t2
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  /usr/bin/time -f '%U %S' -o "$OUT/logs/$tag.time" env -u AWS_CA_BUNDLE timeout "$TIMEOUT" \
    rclone copy sf:plain "$DST" $RCLONE_FLAGS >"$OUT/logs/$tag.out" 2>&1 \
    || { log "rclone failed:"; tail -20 "$OUT/logs/$tag.out" >&2; exit 1; }
  t1=$(date +%s.%N)
  local c1; c1=$(cpu_ticks "$SF_PID")
  local cnt; cnt=$(counts reset)
  local le; le=$(load1)
  local res1; res1=$(resident plain)
  sync -f "$DST"; t2=$(date +%s.%N)
  local files bytes; files=$(find "$DST" -type f | wc -l); bytes=$(find "$DST" -type f -printf '%s\n' | paste -sd+ - | bc)
  if [ "$files" != "$TREE_FILES" ] || [ "$bytes" != "$TREE_BYTES" ]; then
    log "ERROR: rclone brought $files files, $bytes bytes; the tree has $TREE_FILES, $TREE_BYTES"; exit 1
  fi
  rm -rf "$DST"
  record "$(python3 -c 'import json,sys; print(json.dumps(dict(part="eager", side="rclone", round=int(sys.argv[1]), wall=float(sys.argv[2]),
      sync_s=float(sys.argv[3]), bytes=int(sys.argv[4]), files=int(sys.argv[5]), counts=json.loads(sys.argv[6]),
      server_cpu=float(sys.argv[7]), client_cpu=float(sys.argv[8]), load=float(sys.argv[9]), rclone_flags=sys.argv[10],
      load_end=float(sys.argv[11]), cached_pct=[float(sys.argv[12]), float(sys.argv[13])])))' \
      "$r" "$(calc "$t1 - $t0")" "$(calc "$t2 - $t1")" "$TREE_BYTES" "$TREE_FILES" "$cnt" \
      "$(calc "($c1 - $c0) / $(getconf CLK_TCK)")" "$(awk 'END {print $1 + $2}' "$OUT/logs/$tag.time")" "$l" "$RCLONE_FLAGS" "$le" "$res0" "$res1")"
  log "round $r rclone: $files files in $(calc "$t1 - $t0") s (+ sync $(calc "$t2 - $t1") s)"
}

ttfb_ref() { # the same cold files straight from s3s-fs (plain objects), for reference
  local urls; urls=$(python3 - "$OUT/buckets/plain.params" <<EOF
import json, subprocess, sys
cold = json.loads(open(sys.argv[1]).read().split("\n", 1)[1])["cold"]
print(json.dumps([[f, subprocess.check_output(["python3", "$OUT/helper.py", "presign", "$SF_URL", "$KEY", "$SECRET", "plain", f], text=True).strip(), m]
                  for f, m in sorted(cold.items(), key=lambda kv: kv[0].startswith("large"))]))
EOF
)
  record "$(python3 - "$urls" "$OUT/helper.py" <<'EOF'
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("h", sys.argv[2]); h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
res = []
for f, url, m in json.loads(sys.argv[1]):
    r = h.get_ttfb(url); r.update(file=f, md5_ok=r["md5"] == m); res.append(r)
print(json.dumps({"part": "ttfb-ref", "ttfb": res}))
EOF
)"
}

run_ns() { # round
  local r=$1 tag=r$1-ns
  need_free $(( $(bytes_of "$NS_DEVICE_SIZE") + (1 << 30) )) "the namespace node"
  rm -rf "$NODE"; mkdir -p "$NODE"; node_ports
  wait_quiet; sync; warm tp-ns
  local l; l=$(load1)
  counts reset >/dev/null
  log "round $r ns: up --from s3://tp-ns/ns --rehydrate lazy, then ListObjectsV2 names/d000/ every 50 ms, load $l"
  local cfg; cfg=$(python3 -c 'import json,sys; print(json.dumps(dict(tp=sys.argv[1], data=sys.argv[2]+"/data", cwd=sys.argv[2],
      **{"from": "s3://tp-ns/ns"}, log=sys.argv[3], s3=sys.argv[4], key=sys.argv[5], secret=sys.argv[6], bucket="names",
      prefix="d000/", expect=int(sys.argv[7]), timeout=float(sys.argv[8]))))' \
      "$TP" "$NODE" "$OUT/logs/$tag.log" "http://127.0.0.1:$TP_S3" $TPKEY $TPSECRET "$NS_FILES" "$TIMEOUT")
  local res
  # shellcheck disable=SC2046
  res=$(exec $(node_env "$NS_DEVICE_SIZE") timeout $((TIMEOUT + 120)) python3 "$OUT/helper.py" ns "$cfg") \
    || { log "round $r ns failed; see $OUT/logs/$tag.log"; tail -5 "$OUT/logs/$tag.log"; exit 1; }
  local cnt; cnt=$(counts reset)
  rm -rf "$NODE"
  record "$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(part="ns", round=int(sys.argv[2]), files=int(sys.argv[3]),
      counts=json.loads(sys.argv[4]), load=float(sys.argv[5])); print(json.dumps(d))' "$res" "$r" $((NS_DIRS * NS_FILES)) "$cnt" "$l")"
  log "round $r ns: $res"
}

for r in $(seq 1 "$ROUNDS"); do
  case " $PARTS " in *" eager "*)
    if [ $((r % 2)) = 1 ]; then order="tidepool rclone"; else order="rclone tidepool"; fi
    for side in $order; do case " $SIDES " in *" $side "*) "run_$side" "$r";; esac; done
  ;; esac
  case " $PARTS " in *" ns "*) run_ns "$r";; esac
done
case " $PARTS " in *" eager "*) ttfb_ref;; esac
stop_pid "$SF_PID"; SF_PID=""

{
  echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); data on $(findmnt -no FSTYPE -T "$OUT") ($(df --output=source "$OUT" | tail -1)); $(rclone version 2>/dev/null | head -1), s3s-fs 0.14.1 (bench/s3s-fs-server), tidepool $TP_COMMIT"
  echo "tree: $TREE_PARAMS; $NS_PARAMS; rclone: $RCLONE_FLAGS; node: device $DEVICE_SIZE$(env | grep -E '^TIDEPOOL_' | sort | sed 's/^/, /' | tr -d '\n')"
  python3 "$OUT/helper.py" report "$OUT/runs.jsonl"
} | tee "$OUT/result.txt"
echo "results: $OUT/result.txt (table), $OUT/runs.jsonl (every run, with all request counts), $OUT/logs/"
