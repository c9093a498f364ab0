"""bench.py's floor of a restore from S3 (s3_get_floor): it fetches, from a real S3 server over
HTTP, the pack ranges that hold the latest version's blocks, and no fewer bytes than those
blocks take in the store."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import bench  # noqa: E402


class _Server:
    """What s3_get_floor uses of bench.S3Server: the endpoint and a client of it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=bench.S3_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=bench.S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=bench.S3_ENV["AWS_SECRET_ACCESS_KEY"])


def test_s3_get_floor_fetches_the_blocks_of_the_latest_version(alike, corpus, s3_bucket):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/floor"
    alike.json("init", "--store", url, "--endpoint", endpoint)
    alike.json("backup", "--store", url, "--endpoint", endpoint, f"image:{corpus['web']}", "--name", "web")
    day2 = alike.json("backup", "--store", url, "--endpoint", endpoint, f"image:{corpus['web_day2']}", "--name", "web")
    stored = _Server(endpoint).client().list_objects_v2(Bucket=bucket, Prefix="floor/packs/")
    pack_bytes = sum(o["Size"] for o in stored.get("Contents", []))

    got = bench.s3_get_floor(_Server(endpoint), bucket, "floor", "web")
    assert got["s3_get_threads"] in bench.S3_GET_THREADS and got["s3_get_seconds"] > 0
    assert got["s3_get_requests"] >= 1
    # every byte of the version's blocks, at most the packs' bytes (ranges may span small gaps)
    assert 0 < got["block_bytes"] <= got["s3_get_bytes"] <= pack_bytes
    # the day-later version holds more than its own new blocks: the first version's too
    assert got["block_bytes"] > day2["stored_bytes"]
