#!/usr/bin/env python3
"""Side-by-side table of bench/s3.sh's runs: s3_report.py RUNS_DIR ROUNDS WALKS."""
import json
import os
import statistics
import sys

runs, rounds, walks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SERVERS = ("tidepool", "s3s-fs")


def load(name):
    p = os.path.join(runs, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def fio_measure(name, op):
    j = load(name + ".json")
    if j is None:
        return None
    d = j["jobs"][0]["write" if op == "put" else "read"]
    cpu = load(name + ".cpu") or {}
    job = j["jobs"][0]
    return {"iops": d["iops"], "mbps": d["bw_bytes"] / 1e6, "lat_ms": d["lat_ns"]["mean"] / 1e6,
            "p99_ms": d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6,
            "server_cpu": cpu.get("server_cpu_pct"), "fio_cpu": job["usr_cpu"] + job["sys_cpu"]}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, unit):
    if v is None:
        return "-"
    return f"{v:,.0f} ops/s".replace(",", " ") if unit == "ops" else f"{v:,.1f} MB/s".replace(",", " ")


cases = [("put", "4k", 1), ("get", "4k", 1), ("put", "4k", 32), ("get", "4k", 32),
         ("put", "64m", 1), ("get", "64m", 1), ("put", "64m", 32), ("get", "64m", 32)]
# Only the cases this run measured (bench/s3.sh CASES=...).
cases = [c for c in cases if load(f"r1-tidepool-{c[0]}-{c[1]}-c{c[2]}.json") is not None]
if cases:
    print(f"\nPUT / GET (fio http engine, median of {rounds} rounds; MB = 10^6 bytes)")
    print(f"{'case':<18} {'tidepool':>16} {'s3s-fs':>16} {'ratio':>7}  {'goal':<12} per round (tidepool / s3s-fs)")
    for op, bs, c in cases:
        unit = "ops" if bs == "4k" else "mbps"
        key = "iops" if unit == "ops" else "mbps"
        per = {s: [fio_measure(f"r{r}-{s}-{op}-{bs}-c{c}", op) for r in range(1, rounds + 1)] for s in SERVERS}
        m = {s: med([x[key] for x in per[s] if x]) for s in SERVERS}
        ratio = m["tidepool"] / m["s3s-fs"] if m["tidepool"] and m["s3s-fs"] else None
        if bs == "4k":
            goal = "met (>=1.5x)" if ratio and ratio >= 1.5 else "MISSED <1.5x"
        else:
            goal = "met (>=1x)" if ratio and ratio >= 1.0 else "MISSED <1x"
        rounds_s = "  ".join(
            f"{(a or {}).get(key, 0):.0f}/{(b or {}).get(key, 0):.0f}" for a, b in zip(per["tidepool"], per["s3s-fs"]))
        print(f"{op.upper() + ' ' + bs + ' c=' + str(c):<18} {fmt(m['tidepool'], unit):>16} {fmt(m['s3s-fs'], unit):>16} "
              f"{(f'{ratio:.2f}x' if ratio else '-'):>7}  {goal:<12} {rounds_s}")
    print("\nlatency and CPU (medians): mean latency ms, p99 ms, server CPU % of one core, fio CPU % per client")
    for op, bs, c in cases:
        cols = []
        for s in SERVERS:
            xs = [fio_measure(f"r{r}-{s}-{op}-{bs}-c{c}", op) for r in range(1, rounds + 1)]
            xs = [x for x in xs if x]
            cols.append(f"{s}: {med([x['lat_ms'] for x in xs]):8.2f} {med([x['p99_ms'] for x in xs]):8.2f} "
                        f"{med([x['server_cpu'] for x in xs]):5.0f} % {med([x['fio_cpu'] for x in xs]):5.0f} %")
        print(f"{op.upper() + ' ' + bs + ' c=' + str(c):<18} " + "   ".join(cols))

ip = {p: [] for p in (1, 32)}
for r in range(1, rounds + 1):
    for p in (1, 32):
        j = load(f"r{r}-iperf3-P{p}.json")
        if j:
            ip[p].append(j["end"]["sum_received"]["bits_per_second"] / 8 / 1e6)
if ip[1]:
    print("\niperf3 over loopback (median MB/s; run in every round after its cases): " + ", ".join(
        f"{p} stream{'s' if p > 1 else ''} {med(ip[p]):,.0f} MB/s".replace(",", " ") for p in (1, 32))
        + " (per round: " + "  ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(ip[1], ip[32])) + ")")
    ceiling = max(med(ip[1]), med(ip[32]))
    for c in (1, 32):
        ms = {s: med([(fio_measure(f"r{r}-{s}-get-64m-c{c}", 'get') or {}).get("mbps") for r in range(1, rounds + 1)])
              for s in SERVERS}
        if ms['tidepool'] is None or ms['s3s-fs'] is None:
            continue  # that case was not run (CASES=)
        print(f"  GET 64m c={c}: tidepool {100 * ms['tidepool'] / ceiling:.0f} %, s3s-fs {100 * ms['s3s-fs'] / ceiling:.0f} % "
              f"of iperf3's best ({ceiling:.0f} MB/s); goal tidepool >= 70 %: "
              f"{'met' if ms['tidepool'] >= 0.7 * ceiling else 'MISSED'}")

if load("list-tidepool-load.json") is not None:
    print("\nListing at scale: load then walk (ListObjectsV2, pages of 1000, one client)")
    for s in SERVERS:
        j = load(f"list-{s}-load.json")
        if j:
            w = j["jobs"][0]["write"]
            secs = w["runtime"] / 1000
            cpu = (load(f"list-{s}-load.cpu") or {}).get("server_cpu_pct") or 0
            print(f"  {s:<9} load: {w['total_ios']} PUTs of 1 byte by 32 fio clients in {secs:.1f} s "
                  f"({w['iops']:.0f} PUT/s, server CPU {cpu:.0f} %)")
    for s in SERVERS:
        ws = [load(f"list-{s}-walk{i}.json") for i in range(1, walks + 1)]
        ws = [w for w in ws if w]
        done = [w for w in ws if w.get("seconds") is not None]
        if done:
            m = med([w["seconds"] for w in done])
            print(f"  {s:<9} walk: {m:.2f} s median of {len(done)} ({', '.join(str(w['seconds']) for w in done)}), "
                  f"{done[0]['pages']} pages, {done[0]['keys']} keys, {done[0]['keys'] / m:,.0f} keys/s, "
                  f"client CPU {med([w['client_cpu_seconds'] for w in done]):.2f} s".replace(",", " ")
                  + ("  goal < 2 s: " + ("met" if m < 2 else "MISSED") if s == "tidepool" else ""))
        for w in ws:
            if w.get("seconds") is None:
                print(f"  {s:<9} walk: not finished after {w['timed_out_after']} s ({w['pages']} pages, {w['keys']} keys)")
        b = load(f"list-{s}-boto3.json")
        if b:
            if b.get("seconds") is not None:
                print(f"  {s:<9} boto3 paginator: {b['seconds']:.2f} s, {b['pages']} pages, {b['keys']} keys, "
                      f"client CPU {b['client_cpu_seconds']:.2f} s")
            else:
                print(f"  {s:<9} boto3 paginator: not finished after {b['timed_out_after']} s ({b['pages']} pages)")
