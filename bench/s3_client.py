#!/usr/bin/env python3
"""Small SigV4 S3 client for bench/s3.sh (standard library only, boto3 optional).

    s3_client.py ENDPOINT KEY SECRET mb BUCKET
    s3_client.py ENDPOINT KEY SECRET count BUCKET PREFIX            -> number of keys
    s3_client.py ENDPOINT KEY SECRET walk BUCKET PREFIX [--page N] [--timeout S]
    s3_client.py ENDPOINT KEY SECRET walk-boto3 BUCKET PREFIX [--page N] [--timeout S]

`walk` lists every key under PREFIX with ListObjectsV2 pages of --page keys over one
keep-alive HTTP/1.1 connection, one page after the other (each page needs the previous
page's continuation token), and prints one JSON line: seconds, pages, keys, keys_per_sec,
client_cpu_seconds (time this process spent signing and parsing, part of `seconds`).
`walk-boto3` does the same walk with boto3's paginator (what a Python user sees).
"""
import argparse
import datetime
import hashlib
import hmac
import http.client
import json
import sys
import time
import urllib.parse
import xml.etree.ElementTree as ET

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
EMPTY_SHA = hashlib.sha256(b"").hexdigest()
REGION = "us-east-1"


def quote(s):
    return urllib.parse.quote(s, safe="-_.~")


class Client:
    def __init__(self, endpoint, key, secret):
        u = urllib.parse.urlparse(endpoint)
        self.host = u.netloc
        self.key, self.secret = key, secret
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        self._kdate = None

    def _signing_key(self, day):
        if self._kdate != day:
            k = hmac.new(("AWS4" + self.secret).encode(), day.encode(), hashlib.sha256).digest()
            for part in (REGION, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._kdate, self._kkey = day, k
        return self._kkey

    def request(self, method, path, query=(), body=b""):
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA
        canon_path = "/".join(quote(seg) for seg in path.split("/"))
        canon_query = "&".join(f"{quote(k)}={quote(v)}" for k, v in sorted(query))
        headers = {"host": self.host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
        signed = ";".join(sorted(headers))
        creq = "\n".join([method, canon_path, canon_query]
                         + [f"{h}:{headers[h]}" for h in sorted(headers)] + ["", signed, payload])
        scope = f"{day}/{REGION}/s3/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
        sig = hmac.new(self._signing_key(day), sts.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        url = canon_path + ("?" + canon_query if canon_query else "")
        self.conn.request(method, url, body=body or None, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, data

    def list_page(self, bucket, prefix, page, token):
        q = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(page))]
        if token:
            q.append(("continuation-token", token))
        status, data = self.request("GET", "/" + bucket, q)
        if status != 200:
            raise SystemExit(f"ListObjectsV2 answered {status}: {data[:300]!r}")
        root = ET.fromstring(data)
        n = sum(1 for _ in root.iter(NS + "Contents"))
        truncated = root.findtext(NS + "IsTruncated") == "true"
        return n, (root.findtext(NS + "NextContinuationToken") if truncated else None)


def walk(c, bucket, prefix, page, timeout):
    t0, c0 = time.perf_counter(), time.process_time()
    keys = pages = 0
    token = None
    while True:
        n, token = c.list_page(bucket, prefix, page, token)
        keys += n
        pages += 1
        if token is None:
            break
        if time.perf_counter() - t0 > timeout:
            return {"seconds": None, "timed_out_after": timeout, "pages": pages, "keys": keys}
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 3), "pages": pages, "keys": keys, "keys_per_sec": round(keys / dt),
            "client_cpu_seconds": round(time.process_time() - c0, 3)}


def walk_boto3(endpoint, key, secret, bucket, prefix, page, timeout):
    import boto3
    from botocore.config import Config
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=key,
                      aws_secret_access_key=secret,
                      config=Config(signature_version="s3v4", read_timeout=600, retries={"max_attempts": 1}))
    t0, c0 = time.perf_counter(), time.process_time()
    keys = pages = 0
    for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                         PaginationConfig={"PageSize": page}):
        keys += p.get("KeyCount", 0)
        pages += 1
        if time.perf_counter() - t0 > timeout:
            return {"seconds": None, "timed_out_after": timeout, "pages": pages, "keys": keys}
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 3), "pages": pages, "keys": keys, "keys_per_sec": round(keys / dt),
            "client_cpu_seconds": round(time.process_time() - c0, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("key")
    ap.add_argument("secret")
    ap.add_argument("cmd", choices=["mb", "count", "walk", "walk-boto3"])
    ap.add_argument("bucket")
    ap.add_argument("prefix", nargs="?", default="")
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    if a.cmd == "walk-boto3":
        print(json.dumps(walk_boto3(a.endpoint, a.key, a.secret, a.bucket, a.prefix, a.page, a.timeout)))
        return
    c = Client(a.endpoint, a.key, a.secret)
    if a.cmd == "mb":
        status, data = c.request("PUT", "/" + a.bucket)
        if status not in (200, 409):
            raise SystemExit(f"CreateBucket answered {status}: {data[:300]!r}")
    elif a.cmd == "count":
        print(walk(c, a.bucket, a.prefix, 1000, a.timeout)["keys"])
    else:
        print(json.dumps(walk(c, a.bucket, a.prefix, a.page, a.timeout)))


if __name__ == "__main__":
    sys.exit(main())
