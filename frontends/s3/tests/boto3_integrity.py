"""boto3 against the in-process S3 service: the region of signatures, stable bucket creation
dates, GET / HEAD by partNumber, and additional checksums (x-amz-checksum-*, in headers and in
aws-chunked trailers, single PUTs and multipart uploads).

usage: boto3_integrity.py ENDPOINT ACCESS_KEY SECRET_KEY
Prints `all checks passed` at the end.
"""

import base64
import hashlib
import http.client
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

endpoint, access, secret = sys.argv[1:4]


def client(region="us-east-1"):
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
        region_name=region, config=Config(signature_version="s3v4", retries={"max_attempts": 1}),
    )


def fails(code, status, f, *a, **kw):
    try:
        f(*a, **kw)
    except ClientError as e:
        got = (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
        assert got == (code, status), (got, e.response)
        return e.response
    raise AssertionError(f"expected {code} from {f.__name__}")


def b64(b):
    return base64.b64encode(b).decode()


def crc32(data):
    return zlib.crc32(data).to_bytes(4, "big")


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return (crc ^ 0xFFFFFFFF).to_bytes(4, "big")


s3 = client()

# --- 1. The region of the signature must be the endpoint's (us-east-1 here). ---
s3.create_bucket(Bucket="integ")
wrong = client("eu-west-1")
r = fails("AuthorizationHeaderMalformed", 400, wrong.list_buckets)
assert "the region 'eu-west-1' is wrong; expecting 'us-east-1'" in r["Error"]["Message"], r
fails("AuthorizationHeaderMalformed", 400, wrong.put_object, Bucket="integ", Key="nope", Body=b"x")
fails("NoSuchKey", 404, s3.get_object, Bucket="integ", Key="nope")
s3.put_object(Bucket="integ", Key="small", Body=b"hello")
url = wrong.generate_presigned_url("get_object", Params={"Bucket": "integ", "Key": "small"}, ExpiresIn=300)
try:
    urllib.request.urlopen(url)
    raise AssertionError("a presigned URL for another region was accepted")
except urllib.error.HTTPError as e:
    body = e.read().decode()
    assert e.code == 400 and "AuthorizationQueryParametersError" in body and "eu-west-1" in body, (e.code, body)
good = s3.generate_presigned_url("get_object", Params={"Bucket": "integ", "Key": "small"}, ExpiresIn=300)
assert urllib.request.urlopen(good).read() == b"hello"

# --- 2. CreationDate does not move when the bucket's folder changes. ---
def created(name):
    return {b["Name"]: b["CreationDate"] for b in s3.list_buckets()["Buckets"]}[name]


before = {n: created(n) for n in ("integ", "nfsmade")}
time.sleep(1.2)
for n in ("integ", "nfsmade"):
    for i in range(3):
        s3.put_object(Bucket=n, Key=f"later/{i}", Body=b"x")
    s3.delete_object(Bucket=n, Key="later/0")
after = {n: created(n) for n in ("integ", "nfsmade")}
assert before == after, (before, after)

# --- 3. partNumber. ---
MiB = 1 << 20
parts = [bytes([i]) * (5 * MiB) for i in (1, 2)] + [b"tail" * (MiB // 4)]
whole = b"".join(parts)
up = s3.create_multipart_upload(Bucket="integ", Key="mp")["UploadId"]
done = []
for n, p in enumerate(parts, 1):
    done.append({"PartNumber": n, "ETag": s3.upload_part(Bucket="integ", Key="mp", UploadId=up, PartNumber=n, Body=p)["ETag"]})
s3.complete_multipart_upload(Bucket="integ", Key="mp", UploadId=up, MultipartUpload={"Parts": done})
for n, p in enumerate(parts, 1):
    g = s3.get_object(Bucket="integ", Key="mp", PartNumber=n)
    start = sum(len(q) for q in parts[: n - 1])
    assert g["ResponseMetadata"]["HTTPStatusCode"] == 206, g
    assert g["Body"].read() == p and g["PartsCount"] == 3 and g["ContentLength"] == len(p), g
    assert g["ContentRange"] == f"bytes {start}-{start + len(p) - 1}/{len(whole)}", g
    h = s3.head_object(Bucket="integ", Key="mp", PartNumber=n)
    assert h["ResponseMetadata"]["HTTPStatusCode"] == 206 and h["ContentLength"] == len(p) and h["PartsCount"] == 3, h
assert "PartsCount" not in s3.head_object(Bucket="integ", Key="mp"), "only with partNumber, as S3"
fails("InvalidPartNumber", 416, s3.get_object, Bucket="integ", Key="mp", PartNumber=4)
fails("416", 416, s3.head_object, Bucket="integ", Key="mp", PartNumber=4)  # a HEAD error has no body
fails("InvalidRequest", 400, s3.get_object, Bucket="integ", Key="mp", PartNumber=1, Range="bytes=0-1")
fails("InvalidArgument", 400, s3.get_object, Bucket="integ", Key="mp", PartNumber=10001)
g = s3.get_object(Bucket="integ", Key="small", PartNumber=1)
assert g["ResponseMetadata"]["HTTPStatusCode"] == 206 and g["Body"].read() == b"hello", g
assert g["ContentRange"] == "bytes 0-4/5" and "PartsCount" not in g, g
fails("InvalidPartNumber", 416, s3.get_object, Bucket="integ", Key="small", PartNumber=2)
# A HEAD with a range is 206 too.
h = s3.head_object(Bucket="integ", Key="small", Range="bytes=1-2")
assert h["ResponseMetadata"]["HTTPStatusCode"] == 206 and h["ContentLength"] == 2, h
# A copy is a single-part object.
s3.copy_object(Bucket="integ", Key="mp-copy", CopySource={"Bucket": "integ", "Key": "mp"})
assert s3.get_object(Bucket="integ", Key="mp-copy", PartNumber=1)["ContentLength"] == len(whole)
fails("InvalidPartNumber", 416, s3.get_object, Bucket="integ", Key="mp-copy", PartNumber=2)

# --- 4. Additional checksums. ---
body = b"checksummed body\n" * 1000
sha = b64(hashlib.sha256(body).digest())
r = s3.put_object(Bucket="integ", Key="ck/sha", Body=body, ChecksumAlgorithm="SHA256")
assert r["ChecksumSHA256"] == sha and r["ChecksumType"] == "FULL_OBJECT", r
g = s3.get_object(Bucket="integ", Key="ck/sha", ChecksumMode="ENABLED")
assert g["ChecksumSHA256"] == sha and g["ChecksumType"] == "FULL_OBJECT" and g["Body"].read() == body, g
h = s3.head_object(Bucket="integ", Key="ck/sha", ChecksumMode="ENABLED")
assert h["ChecksumSHA256"] == sha, h
assert "ChecksumSHA256" not in s3.head_object(Bucket="integ", Key="ck/sha"), "only with x-amz-checksum-mode"
r = s3.get_object(Bucket="integ", Key="ck/sha", ChecksumMode="ENABLED", Range="bytes=0-9")
assert "ChecksumSHA256" not in r, "no whole-object checksum for a range"

c = b64(crc32c(body))
r = s3.put_object(Bucket="integ", Key="ck/crc32c", Body=body, ChecksumCRC32C=c)
assert r["ChecksumCRC32C"] == c, r
assert s3.head_object(Bucket="integ", Key="ck/crc32c", ChecksumMode="ENABLED")["ChecksumCRC32C"] == c

# A wrong value is refused and nothing is stored.
fails("BadDigest", 400, s3.put_object, Bucket="integ", Key="ck/bad", Body=body, ChecksumSHA256=b64(b"\0" * 32))
fails("BadDigest", 400, s3.put_object, Bucket="integ", Key="ck/bad", Body=body, ChecksumCRC32C=b64(crc32c(b"other")))
fails("InvalidRequest", 400, s3.put_object, Bucket="integ", Key="ck/bad", Body=body, ChecksumSHA256="not-base64")
fails("NoSuchKey", 404, s3.get_object, Bucket="integ", Key="ck/bad")

# The checksum as an aws-chunked trailer (botocore sends trailers only over TLS: moved here).
def trailer(params, context, **kw):
    alg = context.get("checksum", {}).get("request_algorithm")
    if isinstance(alg, dict):
        alg["in"] = "trailer"


tc = client()
tc.meta.events.register("before-call.s3.PutObject", trailer)
tc.meta.events.register("before-call.s3.UploadPart", trailer)
r = tc.put_object(Bucket="integ", Key="ck/trailer", Body=body, ChecksumAlgorithm="CRC32")
assert r["ChecksumCRC32"] == b64(crc32(body)), r
g = s3.get_object(Bucket="integ", Key="ck/trailer", ChecksumMode="ENABLED")
assert g["Body"].read() == body and g["ChecksumCRC32"] == b64(crc32(body)), g
assert "ContentEncoding" not in g, ("aws-chunked is not kept", g)


# A wrong trailer, sent by hand: STREAMING-UNSIGNED-PAYLOAD-TRAILER signed with botocore's signer.
def chunked_put(key, data, trailer_value):
    u = urllib.parse.urlparse(f"{endpoint}/integ/{key}")
    headers = {
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "content-encoding": "aws-chunked",
        "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-decoded-content-length": str(len(data)),
    }
    req = AWSRequest(method="PUT", url=u.geturl(), headers=headers)
    req.context["checksum"] = {"request_algorithm": {"in": "trailer"}}  # signs STREAMING-UNSIGNED-PAYLOAD-TRAILER
    S3SigV4Auth(Credentials(access, secret), "s3", "us-east-1").add_auth(req)
    payload = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n" + f"x-amz-checksum-crc32:{trailer_value}\r\n\r\n".encode()
    conn = http.client.HTTPConnection(u.hostname, u.port)
    hdrs = dict(req.headers.items())
    hdrs["Content-Length"] = str(len(payload))
    conn.request("PUT", u.path, body=payload, headers=hdrs)
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


status, text = chunked_put("ck/trailer-bad", body, b64(crc32(b"not the body")))
assert status == 400 and "BadDigest" in text, (status, text)
fails("NoSuchKey", 404, s3.get_object, Bucket="integ", Key="ck/trailer-bad")
status, text = chunked_put("ck/trailer-good", body, b64(crc32(body)))
assert status == 200, (status, text)

# Multipart, COMPOSITE (SHA256): the hash of the parts' hashes, "-N".
ps = [b"a" * (5 * MiB), b"b" * 1000]
up = s3.create_multipart_upload(Bucket="integ", Key="ck/mp-sha", ChecksumAlgorithm="SHA256")
assert up["ChecksumAlgorithm"] == "SHA256" and up["ChecksumType"] == "COMPOSITE", up
done = []
for n, p in enumerate(ps, 1):
    r = s3.upload_part(Bucket="integ", Key="ck/mp-sha", UploadId=up["UploadId"], PartNumber=n, Body=p, ChecksumAlgorithm="SHA256")
    assert r["ChecksumSHA256"] == b64(hashlib.sha256(p).digest()), r
    done.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]})
fails("BadDigest", 400, s3.upload_part, Bucket="integ", Key="ck/mp-sha", UploadId=up["UploadId"], PartNumber=3, Body=b"x", ChecksumSHA256=b64(b"\0" * 32))
fails("InvalidRequest", 400, s3.upload_part, Bucket="integ", Key="ck/mp-sha", UploadId=up["UploadId"], PartNumber=3, Body=b"x", ChecksumCRC32C=b64(crc32c(b"x")))
lp = s3.list_parts(Bucket="integ", Key="ck/mp-sha", UploadId=up["UploadId"])
assert [p["ChecksumSHA256"] for p in lp["Parts"]] == [d["ChecksumSHA256"] for d in done], lp
assert lp["ChecksumAlgorithm"] == "SHA256" and lp["ChecksumType"] == "COMPOSITE", lp
missing = [{"PartNumber": 1, "ETag": done[0]["ETag"]}, done[1]]
r = fails("InvalidRequest", 400, s3.complete_multipart_upload, Bucket="integ", Key="ck/mp-sha", UploadId=up["UploadId"], MultipartUpload={"Parts": missing})
assert "missing for part 1" in r["Error"]["Message"], r
bad = [dict(done[0], ChecksumSHA256=b64(b"\1" * 32)), done[1]]
fails("InvalidPart", 400, s3.complete_multipart_upload, Bucket="integ", Key="ck/mp-sha", UploadId=up["UploadId"], MultipartUpload={"Parts": bad})
r = s3.complete_multipart_upload(Bucket="integ", Key="ck/mp-sha", UploadId=up["UploadId"], MultipartUpload={"Parts": done})
want = b64(hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in ps)).digest()) + "-2"
assert r["ChecksumSHA256"] == want and r["ChecksumType"] == "COMPOSITE", r
h = s3.head_object(Bucket="integ", Key="ck/mp-sha", ChecksumMode="ENABLED")
assert h["ChecksumSHA256"] == want and h["ChecksumType"] == "COMPOSITE", h
g = s3.get_object(Bucket="integ", Key="ck/mp-sha", ChecksumMode="ENABLED")
assert g["Body"].read() == b"".join(ps)

# Multipart, FULL_OBJECT (CRC32): the CRC of the whole object, from the parts' CRCs.
up = s3.create_multipart_upload(Bucket="integ", Key="ck/mp-crc", ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
done = []
for n, p in enumerate(ps, 1):
    r = s3.upload_part(Bucket="integ", Key="ck/mp-crc", UploadId=up["UploadId"], PartNumber=n, Body=p, ChecksumAlgorithm="CRC32")
    done.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
r = s3.complete_multipart_upload(
    Bucket="integ", Key="ck/mp-crc", UploadId=up["UploadId"], MultipartUpload={"Parts": done},
    ChecksumCRC32=b64(crc32(b"".join(ps))), ChecksumType="FULL_OBJECT",
)
assert r["ChecksumCRC32"] == b64(crc32(b"".join(ps))) and r["ChecksumType"] == "FULL_OBJECT", r
# botocore checks the body against a FULL_OBJECT checksum it is given.
g = s3.get_object(Bucket="integ", Key="ck/mp-crc", ChecksumMode="ENABLED")
assert g["ChecksumCRC32"] == b64(crc32(b"".join(ps))) and g["Body"].read() == b"".join(ps), g
fails("InvalidRequest", 400, s3.create_multipart_upload, Bucket="integ", Key="x", ChecksumAlgorithm="SHA256", ChecksumType="FULL_OBJECT")

# CopyObject carries a checksum of the source's algorithm.
r = s3.copy_object(Bucket="integ", Key="ck/sha-copy", CopySource={"Bucket": "integ", "Key": "ck/sha"})
assert r["CopyObjectResult"]["ChecksumSHA256"] == sha, r
print("all checks passed")
