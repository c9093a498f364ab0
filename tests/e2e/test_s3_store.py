"""A store directly on S3 (an ODS), through the CLI, against a real S3 HTTP server."""
from __future__ import annotations

import json
import subprocess


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def test_backup_restore_verify_on_s3(alike, corpus, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    store = f"s3://{bucket}/ods"
    e = ["--endpoint", endpoint]
    alike.json("init", "--store", store, *e)
    web = alike.json("backup", "--store", store, *e, f"image:{corpus['web']}", "--name", "web")
    assert web["new_blocks"] > 0
    again = alike.json("backup", "--store", store, *e, f"image:{corpus['web_day2']}", "--name", "web")
    assert again["cache_hits"] > 0
    vers = alike.json("versions", "--store", store, *e)["versions"]
    assert len(vers) == 2
    alike.json("restore", "--store", store, *e, f"web@{web['version']}", "--to", tmp_path / "w1.raw")
    assert same(tmp_path / "w1.raw", corpus["web"])
    alike.json("restore", "--store", store, *e, "web", "--to", tmp_path / "w2.raw")
    assert same(tmp_path / "w2.raw", corpus["web_day2"])
    assert alike.json("verify", "--store", store, *e)["ok"]
    s = alike.json("stats", "--store", store, *e)
    assert s["versions"] == 2 and s["stored_bytes"] > 0
    # the endpoint may also come from boto3's own environment variable
    p = alike("versions", "--store", store, "--json", env={"AWS_ENDPOINT_URL": endpoint})
    assert p.returncode == 0 and len(json.loads(p.stdout)["versions"]) == 2
    # secrets never show
    for p in (alike("stats", "--store", store, *e, "--json"), alike("versions", "--store", store, *e)):
        assert "alike-test-secret" not in p.stdout + p.stderr


def test_s3_bad_input(alike, s3_bucket, s3_server, tmp_path):
    endpoint, bucket = s3_bucket
    e = ["--endpoint", endpoint]
    cases = [
        (["versions", "--store", f"s3://no-such-bucket-x1/p", *e], "does not exist"),
        (["versions", "--store", f"s3://{bucket}/not-a-store", *e], "not an alike store"),
        (["versions", "--store", f"s3://{bucket}/p", "--endpoint", "http://127.0.0.1:9"], "cannot reach"),
        (["init", "--store", "s3:///p", *e], "no bucket"),
        (["versions", "--store", f"s3://{bucket}/p", *e, "--profile", "nosuchprofile"], "profile"),
    ]
    for argv, words in cases:
        p = alike(*argv, timeout=600)
        assert p.returncode == 2, (argv, p.stderr)
        assert "Traceback" not in p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("alike: error:") and words in last, (argv, p.stderr)
        assert "alike-test-secret" not in p.stderr
