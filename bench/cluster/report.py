"""Table of bench/cluster.sh: median over the rounds of every figure, each round shown.

    python3 bench/cluster/report.py RESULTS OBJECTS OBJ_MIB LOOPS CONNS_RATE
"""
import collections
import statistics
import sys

res, objects, obj_mib, loops, conns_rate = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
v = collections.defaultdict(list)   # (row, column) -> per-round values
loads = collections.defaultdict(list)
for line in open(res):
    kv = dict(f.split("=", 1) for f in line.split())
    side = kv["side"]
    if kv["op"] == "load":
        loads[side].append(kv["load1"])
        continue
    if kv["op"] == "small":
        col = {"follower": "cluster, via a follower", "leader": "cluster, via the leader", "alone": "one node alone"}[kv["via"]]
        c = kv["conns"]
        v[(f"create p50 ms, {c} conn", col)].append(float(kv["p50_ms"]))
        v[(f"create p99 ms, {c} conn", col)].append(float(kv["p99_ms"]))
        v[(f"creates/s, {c} conn", col)].append(float(kv["files_per_sec"]))
    else:
        col = "cluster, 3 nodes" if side == "cluster" else "one node alone"
        v[(f"{kv['op'].upper()} MB/s aggregate", col)].append(float(kv["mb_per_sec"]))
        if kv["op"] == "get":
            v[("share of GET bytes read from a peer", col)].append(float(kv["peer_share"]))
            v[("bucket read counters (should be 0)", col)].append(float(kv["bucket_read_counters"]))

def fmt(x, row):
    if "share" in row:
        return f"{100 * x:.0f} %"
    if "ms" in row:
        return f"{x:.2f}"
    return f"{x:.0f}"

def table(rows, cols, ref):
    print("\n| figure | " + " | ".join(cols) + f" | ratio to {ref} | rounds |")
    print("|---|" + "---:|" * len(cols) + "---:|---|")
    for row in rows:
        cells, meds = [], {}
        for c in cols:
            xs = v.get((row, c))
            if xs:
                meds[c] = statistics.median(xs)
                cells.append(fmt(meds[c], row))
            else:
                cells.append("-")
        ratio = "-"
        if ref in meds and meds[ref] and len(meds) > 1 and "share" not in row and "bucket" not in row:
            ratio = " / ".join(f"{meds[c] / meds[ref]:.2f}" for c in cols if c != ref and c in meds)
        rounds = "; ".join(", ".join(fmt(x, row) for x in v.get((row, c), [])) for c in cols)
        print(f"| {row} | " + " | ".join(cells) + f" | {ratio} | {rounds} |")

one = "one node alone"
table([f"create p50 ms, 1 conn", f"create p99 ms, 1 conn", f"creates/s, 1 conn",
       f"creates/s, {conns_rate} conn", f"create p50 ms, {conns_rate} conn", f"create p99 ms, {conns_rate} conn"],
      ["cluster, via a follower", "cluster, via the leader", one], one)
print(f"\n(NFS CREATE GUARDED of empty files, no WRITE; ratios: follower / leader over alone)")
table(["PUT MB/s aggregate", "GET MB/s aggregate", "share of GET bytes read from a peer", "bucket read counters (should be 0)"],
      ["cluster, 3 nodes", one], one)
print(f"\n({objects} objects x {obj_mib} MiB, {objects} fio jobs (one object each), GET {loops} loops; "
      f"cluster: job k on node k mod 3 + 1)")
print(f"\nmedian of {max(len(x) for x in v.values())} rounds; 1-minute load at each run start: "
      + "; ".join(f"{s} " + ", ".join(l) for s, l in loads.items()) + f"; every run in {res}")
