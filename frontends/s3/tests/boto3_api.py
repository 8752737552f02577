"""S3 API checks with boto3 (the real client) against a tidepool S3 endpoint.

usage: boto3_api.py ENDPOINT ACCESS_KEY SECRET_KEY
Prints one line per check; exits non-zero at the first failure.
"""

import hashlib
import sys
import time

import boto3
import botocore
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, access, secret = sys.argv[1:4]


def client(secret_key=secret, **cfg):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", retries={"max_attempts": 1}, s3={"addressing_style": "path"}, **cfg),
    )


s3 = client()


def anon_client():
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(signature_version=botocore.UNSIGNED, s3={"addressing_style": "path"}))


def err(fn, **kw):
    try:
        fn(**kw)
    except ClientError as e:
        print(f"  ({fn.__name__}: {e.response['Error'].get('Code')} {e.response['ResponseMetadata']['HTTPStatusCode']})")
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    raise AssertionError(f"{fn.__name__}({kw}) succeeded; an error was expected")


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}")
        sys.exit(1)
    print(f"ok {name}")


# Buckets
s3.create_bucket(Bucket="data")
check("create existing bucket", err(s3.create_bucket, Bucket="data") == ("BucketAlreadyOwnedByYou", 409))
s3.head_bucket(Bucket="data")
check("head missing bucket", err(s3.head_bucket, Bucket="nope")[1] == 404)
names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
check("list buckets hides .tidepool", names == ["data"], names)

# PUT / GET, metadata, ETag
body = bytes(range(256)) * 1000  # 256 KB: several 64 KiB blocks
r = s3.put_object(
    Bucket="data", Key="dir/sub/obj.bin", Body=body, ContentType="application/x-test",
    Metadata={"Owner": "alice", "k2": "v2"}, CacheControl="max-age=60", ContentDisposition="inline",
)
md5 = hashlib.md5(body).hexdigest()
check("put etag is md5", r["ETag"] == f'"{md5}"', r["ETag"])
g = s3.get_object(Bucket="data", Key="dir/sub/obj.bin")
check("get body", g["Body"].read() == body)
check("get metadata", g["Metadata"] == {"owner": "alice", "k2": "v2"}, g["Metadata"])
check("get content-type", g["ContentType"] == "application/x-test")
check("get cache-control", g["CacheControl"] == "max-age=60")
h = s3.head_object(Bucket="data", Key="dir/sub/obj.bin")
check("head size and etag", h["ContentLength"] == len(body) and h["ETag"] == f'"{md5}"')

# Ranges
g = s3.get_object(Bucket="data", Key="dir/sub/obj.bin", Range="bytes=65530-65545")
check("range body", g["Body"].read() == body[65530:65546])
check("range header", g["ContentRange"] == f"bytes 65530-65545/{len(body)}", g["ContentRange"])
g = s3.get_object(Bucket="data", Key="dir/sub/obj.bin", Range="bytes=-10")
check("suffix range", g["Body"].read() == body[-10:])
check("unsatisfiable range", err(s3.get_object, Bucket="data", Key="dir/sub/obj.bin", Range="bytes=999999999-") == ("InvalidRange", 416))

# Conditionals
etag = f'"{md5}"'
check("if-match ok", s3.get_object(Bucket="data", Key="dir/sub/obj.bin", IfMatch=etag)["ETag"] == etag)
check("if-match fails", err(s3.get_object, Bucket="data", Key="dir/sub/obj.bin", IfMatch='"00"')[1] == 412)
check("if-none-match 304", err(s3.get_object, Bucket="data", Key="dir/sub/obj.bin", IfNoneMatch=etag)[1] == 304)
check("head if-none-match 304", err(s3.head_object, Bucket="data", Key="dir/sub/obj.bin", IfNoneMatch=etag)[1] == 304)
future = h["LastModified"].timestamp() + 3600
past = h["LastModified"].timestamp() - 3600
check("if-modified-since 304", err(s3.get_object, Bucket="data", Key="dir/sub/obj.bin", IfModifiedSince=future)[1] == 304)
s3.get_object(Bucket="data", Key="dir/sub/obj.bin", IfModifiedSince=past)
check("if-unmodified-since 412", err(s3.get_object, Bucket="data", Key="dir/sub/obj.bin", IfUnmodifiedSince=past)[1] == 412)
check("put if-none-match * on existing", err(s3.put_object, Bucket="data", Key="dir/sub/obj.bin", Body=b"x", IfNoneMatch="*")[1] == 412)

# Overwrite replaces whole object
s3.put_object(Bucket="data", Key="dir/sub/obj.bin", Body=b"small")
check("overwrite", s3.get_object(Bucket="data", Key="dir/sub/obj.bin")["Body"].read() == b"small")
check("overwrite drops old metadata", s3.head_object(Bucket="data", Key="dir/sub/obj.bin")["Metadata"] == {})

# Empty object and folder marker
s3.put_object(Bucket="data", Key="empty", Body=b"")
check("empty object", s3.get_object(Bucket="data", Key="empty")["Body"].read() == b"")
s3.put_object(Bucket="data", Key="folder/", Body=b"")
check("folder marker head", s3.head_object(Bucket="data", Key="folder/")["ContentLength"] == 0)
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="data")["Contents"]]
check("folder marker listed", keys == ["dir/sub/obj.bin", "empty", "folder/"], keys)

# Names
check("file where a folder is needed", err(s3.put_object, Bucket="data", Key="empty/x", Body=b"1") == ("KeyConflict", 409))
check("folder where a file is", err(s3.put_object, Bucket="data", Key="dir/sub", Body=b"1") == ("KeyConflict", 409))
check("empty segment", err(s3.put_object, Bucket="data", Key="a//b", Body=b"1") == ("InvalidArgument", 400))
check("dot segment", err(s3.put_object, Bucket="data", Key="a/./b", Body=b"1") == ("InvalidArgument", 400))
check("long segment", err(s3.put_object, Bucket="data", Key="x" * 300, Body=b"1")[0] == "KeyTooLongError")
check("long key", err(s3.put_object, Bucket="data", Key="a/" * 600, Body=b"1")[0] in ("KeyTooLongError", "InvalidURI"))
check("missing key", err(s3.get_object, Bucket="data", Key="nope") == ("NoSuchKey", 404))
check("missing bucket", err(s3.get_object, Bucket="nobucket", Key="x") == ("NoSuchBucket", 404))
s3.put_object(Bucket="data", Key="unicode/ä b+c%d", Body=b"u")
check("odd characters", s3.get_object(Bucket="data", Key="unicode/ä b+c%d")["Body"].read() == b"u")

# Copy
s3.put_object(Bucket="data", Key="src", Body=b"copy me", Metadata={"m": "1"}, ContentType="text/plain")
s3.create_bucket(Bucket="other")
r = s3.copy_object(Bucket="other", Key="c/dst", CopySource={"Bucket": "data", "Key": "src"})
check("copy etag", r["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"copy me").hexdigest()}"')
h = s3.head_object(Bucket="other", Key="c/dst")
check("copy keeps metadata", h["Metadata"] == {"m": "1"} and h["ContentType"] == "text/plain", h)
s3.copy_object(Bucket="data", Key="src2", CopySource="data/src", MetadataDirective="REPLACE", Metadata={"n": "2"}, ContentType="a/b")
h = s3.head_object(Bucket="data", Key="src2")
check("copy replace metadata", h["Metadata"] == {"n": "2"} and h["ContentType"] == "a/b", h)
check("copy onto itself", err(s3.copy_object, Bucket="data", Key="src", CopySource="data/src") == ("InvalidRequest", 400))
s3.copy_object(Bucket="data", Key="src", CopySource="data/src", MetadataDirective="REPLACE", Metadata={"x": "y"})
check("copy onto itself with replace", s3.head_object(Bucket="data", Key="src")["Metadata"] == {"x": "y"})
check("copy missing source", err(s3.copy_object, Bucket="data", Key="x", CopySource="data/none")[0] == "NoSuchKey")

# Listing: prefix, delimiter, paging, url encoding
for i in range(25):
    s3.put_object(Bucket="other", Key=f"p/{i:03d}", Body=b"")
s3.put_object(Bucket="other", Key="p-x", Body=b"")
s3.put_object(Bucket="other", Key="p0", Body=b"")
r = s3.list_objects_v2(Bucket="other", Delimiter="/")
check("delimiter", [c["Prefix"] for c in r["CommonPrefixes"]] == ["c/", "p/"] and [o["Key"] for o in r["Contents"]] == ["p-x", "p0"], r)
keys, token, pages = [], None, 0
while True:
    kw = {"ContinuationToken": token} if token else {}
    r = s3.list_objects_v2(Bucket="other", Prefix="p/", MaxKeys=10, **kw)
    keys += [o["Key"] for o in r["Contents"]]
    pages += 1
    check(f"page {pages} key count", r["KeyCount"] == len(r["Contents"]))
    if not r["IsTruncated"]:
        break
    token = r["NextContinuationToken"]
check("paging", keys == [f"p/{i:03d}" for i in range(25)] and pages == 3, (keys, pages))
r = s3.list_objects_v2(Bucket="other", StartAfter="p/020")
check("start-after", [o["Key"] for o in r["Contents"]] == ["p/021", "p/022", "p/023", "p/024", "p0"])
r = s3.list_objects(Bucket="other", Delimiter="/", MaxKeys=1)
check("v1 next marker", r["IsTruncated"] and r["NextMarker"] == "c/", r)
r = s3.list_objects(Bucket="other", Delimiter="/", Marker="c/")
check("v1 after marker", [c["Prefix"] for c in r["CommonPrefixes"]] == ["p/"], r)
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="unicode/")["Contents"]]
check("url-encoded keys decoded by boto3", keys == ["unicode/ä b+c%d"], keys)
check("bad continuation token", err(s3.list_objects_v2, Bucket="data", ContinuationToken="zz")[0] == "InvalidArgument")

# Delete: missing key is success, parents pruned, DeleteObjects
s3.delete_object(Bucket="data", Key="never-existed")
s3.delete_object(Bucket="data", Key="dir/sub/obj.bin")
r = s3.list_objects_v2(Bucket="data", Delimiter="/")
check("empty parents pruned", "dir/" not in [c["Prefix"] for c in r.get("CommonPrefixes", [])], r)
r = s3.delete_objects(Bucket="other", Delete={"Objects": [{"Key": f"p/{i:03d}"} for i in range(25)] + [{"Key": "zz"}]})
check("delete objects", len(r["Deleted"]) == 26 and "Errors" not in r, r)
r = s3.delete_objects(Bucket="other", Delete={"Objects": [{"Key": "p-x"}, {"Key": "p0"}], "Quiet": True})
check("delete objects quiet", not r.get("Deleted"), r)
check("delete non-empty bucket", err(s3.delete_bucket, Bucket="other") == ("BucketNotEmpty", 409))
s3.delete_object(Bucket="other", Key="c/dst")
s3.delete_bucket(Bucket="other")
check("bucket deleted", err(s3.head_bucket, Bucket="other")[1] == 404)
s3.delete_object(Bucket="data", Key="folder/")
check("folder marker deleted", err(s3.head_object, Bucket="data", Key="folder/")[1] == 404)

# Multipart upload
MiB = 1 << 20


def pattern(seed, n):
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def md5hex(b):
    return hashlib.md5(b).hexdigest()


def mp_etag(parts):
    return f'"{hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()}-{len(parts)}"'


src6 = pattern(3, 6 * MiB)
s3.put_object(Bucket="data", Key="mp-src", Body=src6)
r = s3.create_multipart_upload(Bucket="data", Key="mp/big.bin", ContentType="application/x-mp", Metadata={"stage": "mp"})
uid = r["UploadId"]
check("create multipart", r["Key"] == "mp/big.bin" and uid.isalnum(), r)
ups = s3.list_multipart_uploads(Bucket="data")
check("list uploads", [(u["Key"], u["UploadId"]) for u in ups.get("Uploads", [])] == [("mp/big.bin", uid)], ups)
ups = s3.list_multipart_uploads(Bucket="data", Delimiter="/")
check("list uploads delimiter", [c["Prefix"] for c in ups.get("CommonPrefixes", [])] == ["mp/"] and not ups.get("Uploads"), ups)
p1 = pattern(1, 5 * MiB)
r = s3.upload_part(Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=1, Body=p1)
check("upload part etag is md5", r["ETag"] == f'"{md5hex(p1)}"', r)
s3.upload_part(Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=2, Body=b"replaced below")
r = s3.upload_part_copy(Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=2,
                        CopySource={"Bucket": "data", "Key": "mp-src"}, CopySourceRange=f"bytes=1000-{1000 + 5 * MiB - 1}")
p2 = src6[1000:1000 + 5 * MiB]
check("upload part copy with range", r["CopyPartResult"]["ETag"] == f'"{md5hex(p2)}"', r)
p3 = pattern(5, 100_000)
e3 = s3.upload_part(Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=3, Body=p3)["ETag"]
check("parts invisible before complete", err(s3.head_object, Bucket="data", Key="mp/big.bin")[1] == 404)
check("parts not listed", "Contents" not in s3.list_objects_v2(Bucket="data", Prefix="mp/"), "")
lp = s3.list_parts(Bucket="data", Key="mp/big.bin", UploadId=uid)
check("list parts", [(p["PartNumber"], p["Size"], p["ETag"]) for p in lp["Parts"]]
      == [(1, 5 * MiB, f'"{md5hex(p1)}"'), (2, 5 * MiB, f'"{md5hex(p2)}"'), (3, 100_000, e3)], lp["Parts"])
lp = s3.list_parts(Bucket="data", Key="mp/big.bin", UploadId=uid, MaxParts=2)
check("list parts paged", lp["IsTruncated"] and lp["NextPartNumberMarker"] == 2 and len(lp["Parts"]) == 2, lp)
lp = s3.list_parts(Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumberMarker=2)
check("list parts after marker", [p["PartNumber"] for p in lp["Parts"]] == [3] and not lp["IsTruncated"], lp)

# Multipart errors
parts = [{"PartNumber": 1, "ETag": f'"{md5hex(p1)}"'}, {"PartNumber": 2, "ETag": f'"{md5hex(p2)}"'}, {"PartNumber": 3, "ETag": e3}]
bad_id = "0" * 32
check("upload part unknown upload", err(s3.upload_part, Bucket="data", Key="mp/big.bin", UploadId=bad_id, PartNumber=1, Body=b"x") == ("NoSuchUpload", 404))
check("upload part other key", err(s3.upload_part, Bucket="data", Key="mp/other", UploadId=uid, PartNumber=1, Body=b"x")[0] == "NoSuchUpload")
check("part number 0", err(s3.upload_part, Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=0, Body=b"x")[0] == "InvalidArgument")
check("part number 10001", err(s3.upload_part, Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=10001, Body=b"x")[0] == "InvalidArgument")
check("copy range outside source", err(s3.upload_part_copy, Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=4,
      CopySource="data/mp-src", CopySourceRange=f"bytes=0-{6 * MiB}")[0] == "InvalidRange")
check("copy missing source", err(s3.upload_part_copy, Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=4, CopySource="data/none")[0] == "NoSuchKey")
check("copy source condition", err(s3.upload_part_copy, Bucket="data", Key="mp/big.bin", UploadId=uid, PartNumber=4,
      CopySource="data/mp-src", CopySourceIfMatch='"00"')[1] == 412)
check("complete wrong etag", err(s3.complete_multipart_upload, Bucket="data", Key="mp/big.bin", UploadId=uid,
      MultipartUpload={"Parts": [parts[0], {"PartNumber": 2, "ETag": '"00000000000000000000000000000000"'}, parts[2]]})[0] == "InvalidPart")
check("complete missing part", err(s3.complete_multipart_upload, Bucket="data", Key="mp/big.bin", UploadId=uid,
      MultipartUpload={"Parts": [parts[0], {"PartNumber": 7, "ETag": e3}]})[0] == "InvalidPart")
check("complete out of order", err(s3.complete_multipart_upload, Bucket="data", Key="mp/big.bin", UploadId=uid,
      MultipartUpload={"Parts": [parts[1], parts[0], parts[2]]})[0] == "InvalidPartOrder")
check("complete unknown upload", err(s3.complete_multipart_upload, Bucket="data", Key="mp/big.bin", UploadId=bad_id,
      MultipartUpload={"Parts": parts})[0] == "NoSuchUpload")
check("failed completes keep the upload", len(s3.list_parts(Bucket="data", Key="mp/big.bin", UploadId=uid)["Parts"]) == 3)

# Complete: the parts joined in order, metadata from Create, the multipart ETag
r = s3.complete_multipart_upload(Bucket="data", Key="mp/big.bin", UploadId=uid, MultipartUpload={"Parts": parts})
check("complete etag", r["ETag"] == mp_etag([p1, p2, p3]), r)
g = s3.get_object(Bucket="data", Key="mp/big.bin")
check("completed body", g["Body"].read() == p1 + p2 + p3)
check("completed metadata", g["Metadata"] == {"stage": "mp"} and g["ContentType"] == "application/x-mp", g)
check("completed etag on get", g["ETag"] == mp_etag([p1, p2, p3]))
g = s3.get_object(Bucket="data", Key="mp/big.bin", Range=f"bytes={5 * MiB - 3}-{5 * MiB + 2}")
check("range across parts", g["Body"].read() == (p1 + p2)[5 * MiB - 3:5 * MiB + 3])
check("complete twice", err(s3.complete_multipart_upload, Bucket="data", Key="mp/big.bin", UploadId=uid,
      MultipartUpload={"Parts": parts})[0] == "NoSuchUpload")
check("no upload left", not s3.list_multipart_uploads(Bucket="data").get("Uploads"))

# EntityTooSmall: a part under 5 MiB that is not the last
uid = s3.create_multipart_upload(Bucket="data", Key="mp/small")["UploadId"]
sp = [{"PartNumber": n, "ETag": s3.upload_part(Bucket="data", Key="mp/small", UploadId=uid, PartNumber=n, Body=b"tiny")["ETag"]} for n in (1, 2)]
check("entity too small", err(s3.complete_multipart_upload, Bucket="data", Key="mp/small", UploadId=uid, MultipartUpload={"Parts": sp})[0] == "EntityTooSmall")
r = s3.complete_multipart_upload(Bucket="data", Key="mp/small", UploadId=uid, MultipartUpload={"Parts": sp[1:]})
check("one small part is fine; unlisted parts dropped", s3.get_object(Bucket="data", Key="mp/small")["Body"].read() == b"tiny" and r["ETag"] == mp_etag([b"tiny"]))

# Abort: nothing visible, the upload is gone
uid = s3.create_multipart_upload(Bucket="data", Key="mp/aborted")["UploadId"]
s3.upload_part(Bucket="data", Key="mp/aborted", UploadId=uid, PartNumber=1, Body=b"x" * 1000)
s3.abort_multipart_upload(Bucket="data", Key="mp/aborted", UploadId=uid)
check("aborted upload gone", err(s3.list_parts, Bucket="data", Key="mp/aborted", UploadId=uid)[0] == "NoSuchUpload")
check("abort twice", err(s3.abort_multipart_upload, Bucket="data", Key="mp/aborted", UploadId=uid)[0] == "NoSuchUpload")
check("aborted upload invisible", err(s3.head_object, Bucket="data", Key="mp/aborted")[1] == 404)

# Two concurrent Completes of one upload: one wins, the other finds no upload
import threading
uid = s3.create_multipart_upload(Bucket="data", Key="mp/race")["UploadId"]
e = s3.upload_part(Bucket="data", Key="mp/race", UploadId=uid, PartNumber=1, Body=b"race")["ETag"]
outcomes = []


def complete_once():
    try:
        s3.complete_multipart_upload(Bucket="data", Key="mp/race", UploadId=uid, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e}]})
        outcomes.append("ok")
    except ClientError as ex:
        outcomes.append(ex.response["Error"]["Code"])


threads = [threading.Thread(target=complete_once) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
check("concurrent completes", sorted(outcomes) in (["NoSuchUpload", "ok"], ["ok", "ok"]) and "ok" in outcomes, outcomes)
check("raced object whole", s3.get_object(Bucket="data", Key="mp/race")["Body"].read() == b"race")

# A never-completed upload stays out of listings (the test leaves none behind: abort it)
uid = s3.create_multipart_upload(Bucket="data", Key="mp/pending")["UploadId"]
s3.upload_part(Bucket="data", Key="mp/pending", UploadId=uid, PartNumber=1, Body=b"p")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="mp/")["Contents"]]
check("pending upload not listed", keys == ["mp/big.bin", "mp/race", "mp/small"], keys)
s3.abort_multipart_upload(Bucket="data", Key="mp/pending", UploadId=uid)

# The managed transfer (upload_file / download_file) uses multipart above its threshold
import io
from boto3.s3.transfer import TransferConfig
tc = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
big = pattern(9, 12 * MiB + 17)
s3.upload_fileobj(io.BytesIO(big), "data", "mp/managed.bin", Config=tc)
h = s3.head_object(Bucket="data", Key="mp/managed.bin")
check("managed upload is multipart", h["ContentLength"] == len(big) and h["ETag"].endswith('-3"'), h)
out = io.BytesIO()
s3.download_fileobj("data", "mp/managed.bin", out, Config=tc)
check("managed round trip", out.getvalue() == big)
for k in ("mp/big.bin", "mp/small", "mp/race", "mp/managed.bin", "mp-src"):
    s3.delete_object(Bucket="data", Key=k)

# RenameObject (S3 Express One Zone): within a bucket, conditions on both ends
if hasattr(s3, "rename_object"):
    s3.put_object(Bucket="data", Key="ren/a/src", Body=b"rename me", Metadata={"r": "1"})
    etag_src = s3.head_object(Bucket="data", Key="ren/a/src")["ETag"]
    s3.rename_object(Bucket="data", Key="ren/b/dst", RenameSource="data/ren/a/src")
    h = s3.head_object(Bucket="data", Key="ren/b/dst")
    check("rename keeps body, etag, metadata", s3.get_object(Bucket="data", Key="ren/b/dst")["Body"].read() == b"rename me"
          and h["ETag"] == etag_src and h["Metadata"] == {"r": "1"}, h)
    check("rename source gone", err(s3.head_object, Bucket="data", Key="ren/a/src")[1] == 404)
    keys = [c["Prefix"] for c in s3.list_objects_v2(Bucket="data", Prefix="ren/", Delimiter="/").get("CommonPrefixes", [])]
    check("rename prunes source folders", keys == ["ren/b/"], keys)
    check("rename missing source", err(s3.rename_object, Bucket="data", Key="ren/x", RenameSource="data/ren/none")[0] == "NoSuchKey")
    s3.put_object(Bucket="data", Key="ren/c", Body=b"c")
    check("rename if-none-match on existing destination", err(s3.rename_object, Bucket="data", Key="ren/c",
          RenameSource="data/ren/b/dst", DestinationIfNoneMatch="*")[1] == 412)
    check("rename source if-match", err(s3.rename_object, Bucket="data", Key="ren/d",
          RenameSource="data/ren/b/dst", SourceIfMatch='"00"')[1] == 412)
    check("rename across buckets", err(s3.rename_object, Bucket="data", Key="ren/d", RenameSource="other2/ren/b/dst")[0] == "InvalidRequest")
    s3.rename_object(Bucket="data", Key="ren/c", RenameSource="/data/ren/b/dst", SourceIfMatch=etag_src)
    check("rename over an existing object", s3.get_object(Bucket="data", Key="ren/c")["Body"].read() == b"rename me")
    check("rename anonymous", err(anon_client().rename_object, Bucket="data", Key="ren/e", RenameSource="data/ren/c")[1] == 403)
    s3.delete_object(Bucket="data", Key="ren/c")

# Auth
bad = client(secret_key="wrong-secret")
check("wrong secret", err(bad.list_objects_v2, Bucket="data")[0] == "SignatureDoesNotMatch")
unknown = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="NOSUCHKEY", aws_secret_access_key="x",
                       region_name="us-east-1", config=Config(signature_version="s3v4"))
check("unknown key", err(unknown.list_buckets)[1] == 403)
anon = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                    config=Config(signature_version=botocore.UNSIGNED))
check("anonymous", err(anon.list_objects_v2, Bucket="data") == ("AccessDenied", 403))
url = s3.generate_presigned_url("get_object", Params={"Bucket": "data", "Key": "src"}, ExpiresIn=60)
import urllib.request
check("presigned url", urllib.request.urlopen(url).read() == b"copy me")

# An upload cut off mid-body leaves nothing visible (the test then checks the staging folder).
import socket
from urllib.parse import urlparse
put_url = urlparse(s3.generate_presigned_url("put_object", Params={"Bucket": "data", "Key": "cut/off"}, ExpiresIn=60))
sock = socket.create_connection((put_url.hostname, put_url.port))
sock.sendall(f"PUT {put_url.path}?{put_url.query} HTTP/1.1\r\nhost: {put_url.netloc}\r\ncontent-length: 1000000\r\n\r\n".encode() + b"x" * 200000)
sock.close()
time.sleep(0.5)
check("aborted upload invisible", err(s3.head_object, Bucket="data", Key="cut/off")[1] == 404)
check("aborted upload made no folder", "cut/" not in [c["Prefix"] for c in s3.list_objects_v2(Bucket="data", Delimiter="/").get("CommonPrefixes", [])])
print("all checks passed")
