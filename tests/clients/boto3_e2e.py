"""boto3 against a running `tidepool up`: put, list, get, metadata, and a presigned GET URL.

usage: boto3_e2e.py ENDPOINT ACCESS_KEY SECRET_KEY
Prints `presigned <url>` for the test to fetch with curl, then `boto3 ok`.
"""

import hashlib
import sys

import boto3
from botocore.config import Config

endpoint, access, secret = sys.argv[1:4]
s3 = boto3.client(
    "s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1",
    config=Config(signature_version="s3v4", retries={"max_attempts": 1}),
)
s3.create_bucket(Bucket="boto")
body = b"tidepool via boto3\n" * 1000
r = s3.put_object(Bucket="boto", Key="deep/path/to/obj.txt", Body=body, Metadata={"who": "boto3"})
assert r["ETag"] == f'"{hashlib.md5(body).hexdigest()}"', r
g = s3.get_object(Bucket="boto", Key="deep/path/to/obj.txt")
assert g["Body"].read() == body and g["Metadata"] == {"who": "boto3"}, g
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="boto")["Contents"]]
assert keys == ["deep/path/to/obj.txt"], keys
# boto3 presigns with SigV2 unless the client says s3v4 (it does, above).
url = s3.generate_presigned_url("get_object", Params={"Bucket": "boto", "Key": "deep/path/to/obj.txt"}, ExpiresIn=300)
assert "X-Amz-Signature" in url, url
print("presigned", url)
print("boto3 ok")
