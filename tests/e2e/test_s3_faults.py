"""An S3 store that misbehaves: dropped connections, slow answers, 500/503 errors, a store that
dies in the middle of a run, and wrong credentials. Through the CLI, against a real S3 HTTP
server (moto) behind `tests.faultproxy.FaultProxy`.

Wrong credentials need a server that checks signatures: moto's server does when started with
INITIAL_NO_AUTH_ACTION_COUNT=N (the first N requests are let through unchecked, which is how the
test creates an IAM user with an access key and the bucket; every later request must be signed
with a key that exists, else 403 InvalidAccessKeyId or SignatureDoesNotMatch). It runs as its
own process (`python -m moto.server`) so that this setting does not touch the session's server.
A limit of this moto version (5.2.1): its signature check rejects, even with the right keys, a
ListObjectsV2 whose prefix holds a '/' (e.g. `prefix=versions%2F`: SignatureDoesNotMatch), so
with the right keys only commands that list no folder work there. The test therefore shows the
right keys accepted with `alike init` of a store at the bucket's root (it lists prefix ''), and
the wrong keys refused by every command's first request (the GET of config.json or the HEAD of
the bucket), which is what a real S3 does too.
"""
from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid

import boto3
import pytest

from storage.store import FORMAT

from tests.faultproxy import FaultProxy


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def is_pack_put(method, path, hdrs):
    return method == "PUT" and "/packs/" in path


def is_ranged_get(method, path, hdrs):
    return method == "GET" and any(k.lower() == "range" for k, _ in hdrs)


def is_list(method, path, hdrs):
    return method == "GET" and "list-type=2" in path


def new_bucket(endpoint: str, tag: str) -> str:
    name = f"{tag}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def one_error_line(p, *words):
    """The command failed with one clear line and no traceback; -> that line."""
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("alike: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    for w in words:
        assert w in errors[0], (w, p.stderr)
    return errors[0]


@pytest.fixture
def proxy(s3_server):
    px = FaultProxy(s3_server, rate=0.0, seed=20261125, delay=(0.2, 0.6)).start()
    yield px
    px.stop()


def test_backup_restore_vault_through_faults(alike, corpus, s3_server, proxy, tmp_path):
    """Backup straight to S3, restore and verify from it, and vault a local store to S3, all
    through a proxy that drops, delays or fails ~12% of requests at random, and that surely
    hits pack uploads, ranged reads and listings with each kind of failure: every command
    succeeds, restores are byte-identical to the sources, and the proxy did inject faults."""
    px = proxy
    px.set_rate(0.12)
    # at least these, whatever the dice say: a pack PUT whose answer is lost after the server
    # stored it, then a 503; a ranged GET cut in the middle of its body, then a 500; a listing
    # dropped before it reaches the server, then a slow one
    px.script(is_pack_put, "drop-after", "error:503")
    px.script(is_ranged_get, "drop-mid", "error:500")
    px.script(is_list, "drop-before", "delay:0.5")
    bucket = new_bucket(s3_server, "faults")
    store, e = f"s3://{bucket}/ods", ["--endpoint", px.endpoint]

    alike.json("init", "--store", store, *e)
    w = alike.json("backup", "--store", store, *e, f"image:{corpus['web']}", "--name", "web")
    assert w["new_blocks"] > 0 and w["packs"] >= 1
    alike.json("restore", "--store", store, *e, "web", "--to", tmp_path / "web.raw")
    assert same(tmp_path / "web.raw", corpus["web"])
    v = alike.json("verify", "--store", store, *e)
    assert v["ok"] and v["blocks_checked"] > 0, v
    after_direct = dict(px.counts)

    # vault: a local store (ADS) replicated to S3 through the proxy, then restored from the ODS alone
    px.script(is_pack_put, "drop-mid", "error:500", "delay:0.4")
    px.script(is_ranged_get, "drop-before", "error:503")
    ads, ods = tmp_path / "ads", f"s3://{bucket}/vault"
    alike.json("init", "--store", ads, "--block-size", "64K")
    db = alike.json("backup", "--store", ads, f"image:{corpus['db']}", "--name", "db")
    r = alike.json("vault", "--store", ads, "--to", ods, *e)
    assert r["versions_copied"] == 1 and r["blocks_copied"] == db["new_blocks"], r
    alike.json("restore", "--store", ods, *e, "db", "--to", tmp_path / "db.raw")
    assert same(tmp_path / "db.raw", corpus["db_raw"])
    assert alike.json("verify", "--store", ods, *e)["ok"]

    c = px.counts
    print("faults injected:", dict(c), "by method:", dict(px.by_method))
    for kind in ("drop", "delay", "error", "drop-before", "drop-after", "drop-mid"):
        assert c[kind] > 0, (kind, dict(c))
    assert px.faults() >= 0.05 * c["requests"], dict(c)
    assert sum(after_direct.get(k, 0) for k in ("drop", "delay", "error")) > 0
    faulted = [(m, p, rg, d) for m, p, rg, d in px.log if d]
    assert any(m == "PUT" and "/packs/" in p and not d.startswith("delay") for m, p, rg, d in faulted)
    assert any(m == "GET" and rg and not d.startswith("delay") for m, p, rg, d in faulted)
    assert any(m == "GET" and "list-type=2" in p and not d.startswith("delay") for m, p, rg, d in faulted)
    assert all(not faults for _, faults in px._script), px._script  # every scripted fault was used


def test_store_dies_mid_backup_then_recovers(alike, corpus, s3_server, proxy, tmp_path):
    """The S3 store starts answering 503 SlowDown to everything at the first pack upload of a
    backup: the backup gives up after botocore's retries with one `alike: error:` line naming
    the store, no traceback, in bounded time. A store that drops every connection is reported
    the same way. Once healthy, the store shows no partial version, verifies, and the same
    backup succeeds and restores byte-identical."""
    px = proxy
    bucket = new_bucket(s3_server, "dies")
    store, e = f"s3://{bucket}/ods", ["--endpoint", px.endpoint]
    alike.json("init", "--store", store, *e)
    w1 = alike.json("backup", "--store", store, *e, f"image:{corpus['web']}", "--name", "web")

    px.fail_all_after(0, "503", method="PUT", path_has="/packs/")
    t0 = time.monotonic()
    # 3 tries of a request, not the default 6: the read tasks (Ray workers) follow the command's
    # AWS_MAX_ATTEMPTS too (the default's retries are what test_backup_restore_vault_through_faults meets)
    p = alike("backup", "--store", store, *e, f"image:{corpus['web_day2']}", "--name", "web", "--json",
              env={"AWS_MAX_ATTEMPTS": "3"}, timeout=300)
    took = time.monotonic() - t0
    line = one_error_line(p, store)
    failed = [path for m, path, _, d in px.log if d]
    puts = [path for m, path, _, d in px.log if d and m == "PUT" and "/packs/" in path]
    assert puts and all(puts.count(k) <= 3 for k in puts), puts  # never more tries than AWS_MAX_ATTEMPTS
    # the request the error names was tried 3 times before the command gave up (which request
    # fails first is a race: the first pack upload, or another task reading config.json; the
    # command stops at the first error, so the other tasks' uploads may end before their third try)
    m = re.search(r"S3 \w+(?: \w+)? of (\S+) on ", line)
    assert m, line
    assert sum(path.endswith("/ods/" + m.group(1)) for path in failed) >= 3, (line, failed)
    assert took < 150, took
    assert "alike-test-secret" not in p.stdout + p.stderr
    # the claim of the VM and the writer's lock are removed hastily (two tries each) on a store
    # that failed: the run does not add minutes of retries after its error
    cleanup = [(m, path) for m, path, _, d in px.log if d and m == "DELETE" and "/locks/" in path]
    assert cleanup and all(cleanup.count(c) <= 2 for c in cleanup), cleanup

    px.fail_all("drop")
    n = px.counts["fail_all"]
    p = alike("versions", "--store", store, *e, env={"AWS_MAX_ATTEMPTS": "2"}, timeout=300)
    assert p.returncode == 2
    one_error_line(p, store, "cannot reach")
    assert px.counts["fail_all"] - n == 2, dict(px.counts)  # botocore's own setting is followed
    p = alike("verify", "--store", store, *e, env={"AWS_MAX_ATTEMPTS": "2"}, timeout=300)
    one_error_line(p, store)
    p = alike("versions", "--store", store, *e, env={"AWS_MAX_ATTEMPTS": "none"})
    one_error_line(p, "AWS_MAX_ATTEMPTS", "1 or more")

    px.heal()
    vers = alike.json("versions", "--store", store, *e)["versions"]
    assert [v["version"] for v in vers] == [w1["version"]], (line, vers)  # no partial version
    assert alike.json("verify", "--store", store, *e)["ok"]
    w2 = alike.json("backup", "--store", store, *e, f"image:{corpus['web_day2']}", "--name", "web")
    assert w2["version"] != w1["version"]
    alike.json("restore", "--store", store, *e, "web", "--to", tmp_path / "day2.raw")
    assert same(tmp_path / "day2.raw", corpus["web_day2"])
    assert len(alike.json("versions", "--store", store, *e)["versions"]) == 2


def test_store_dies_mid_restore_and_mid_vault(alike, corpus, s3_server, proxy, tmp_path):
    """The store drops every connection once a restore starts reading packs: the restore fails
    cleanly and leaves neither the target nor a temporary file. A vault to S3 whose store
    answers 500 to everything from its first pack upload fails cleanly and commits no version
    on the target; once healthy, the vault resumes and the ODS restores byte-identical."""
    px = proxy
    bucket = new_bucket(s3_server, "dies2")
    store, e = f"s3://{bucket}/ods", ["--endpoint", px.endpoint]
    alike.json("init", "--store", store, *e)
    alike.json("backup", "--store", store, *e, f"image:{corpus['db']}", "--name", "db")

    out = tmp_path / "restored"
    out.mkdir()
    px.fail_all_after(0, "drop", method="GET", path_has="/packs/")
    quick = {"AWS_MAX_ATTEMPTS": "2"}  # read by the restore's Ray tasks too (the job's environment)
    p = alike("restore", "--store", store, *e, "db", "--to", out / "db.raw", "--json", env=quick, timeout=300)
    one_error_line(p, store)
    assert px.counts["fail_all"] >= 1
    assert os.listdir(out) == [], os.listdir(out)  # no target, no temporary file
    px.heal()

    ads, ods = tmp_path / "ads", f"s3://{bucket}/vault"
    alike.json("init", "--store", ads, "--block-size", "64K")
    alike.json("backup", "--store", ads, f"image:{corpus['web']}", "--name", "web")
    px.fail_all_after(0, "500", method="PUT", path_has="/packs/")
    p = alike("vault", "--store", ads, "--to", ods, *e, "--json", env=quick, timeout=300)
    one_error_line(p, ods)
    puts = [path for m, path, _, d in px.log if d and m == "PUT" and "/packs/" in path]
    assert puts and all(puts.count(k) <= 2 for k in puts), puts
    px.heal()
    ods_keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=bucket, Prefix="vault/").get("Contents", [])]
    assert not [k for k in ods_keys if k.endswith("version.json")], ods_keys  # nothing committed
    assert alike.json("versions", "--store", ods, *e)["versions"] == []
    r = alike.json("vault", "--store", ads, "--to", ods, *e)
    assert r["versions_copied"] == 1
    alike.json("restore", "--store", ods, *e, "web", "--to", out / "web.raw")
    assert same(out / "web.raw", corpus["web"])
    assert alike.json("verify", "--store", ods, *e)["ok"]
    assert not glob.glob(str(out / ".*alike-*"))


# -- wrong credentials ---------------------------------------------------------------------------
WRONG_SECRET = "wrong-secret-3f9a1c77-must-never-be-printed"


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A moto server that checks signatures -> (endpoint, bucket, good access key id, good secret)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
    log = open(tmp_path_factory.mktemp("moto-auth") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        boot = dict(endpoint_url=endpoint, region_name="us-east-1",
                    aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="bootstrap")
        iam = boto3.client("iam", **boot)                                       # 4 unchecked actions:
        iam.create_user(UserName="alike")                                       # 1
        iam.put_user_policy(UserName="alike", PolicyName="s3", PolicyDocument=json.dumps({  # 2
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="alike")["AccessKey"]             # 3
        good = dict(endpoint_url=endpoint, region_name="us-east-1",
                    aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        bucket = "auth-" + uuid.uuid4().hex[:8]
        boto3.client("s3", **good).create_bucket(Bucket=bucket)                 # 4
        # from here on signatures are checked: a wrong secret is refused
        with pytest.raises(Exception) as ei:
            boto3.client("s3", **dict(good, aws_secret_access_key="nope")).list_objects_v2(Bucket=bucket)
        assert "SignatureDoesNotMatch" in str(ei.value)
        yield endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_wrong_credentials(alike, auth_s3):
    """With the right keys `alike init` works against a server that checks signatures; with a
    wrong secret, or an access key id that does not exist, `versions`, `stats` and `init` exit 2
    with one line that names the store and says to check the credentials, no traceback, quickly
    (a refusal is not retried), and neither the wrong nor the right secret is ever printed."""
    endpoint, bucket, key_id, secret = auth_s3
    store, e = f"s3://{bucket}", ["--endpoint", endpoint]
    good = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                          aws_secret_access_key=secret)
    outputs = []
    p = alike("init", "--store", store, *e, "--json", env=good)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["store"] == store
    assert json.loads(client.get_object(Bucket=bucket, Key="config.json")["Body"].read())["format"] == FORMAT
    outputs.append(p)

    wrong_secret = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    no_such_key = {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    for env, code in ((wrong_secret, "SignatureDoesNotMatch"), (no_such_key, "InvalidAccessKeyId")):
        for argv in (["versions", "--store", store], ["stats", "--store", store],
                     ["init", "--store", f"s3://{bucket}/other"]):
            t0 = time.monotonic()
            p = alike(*argv, *e, env=env, timeout=300)
            assert p.returncode == 2, (argv, p.returncode, p.stderr)
            line = one_error_line(p, f"s3://{bucket}", "was refused", "check the credentials")
            if argv[0] != "init":  # a GET names the reason; the HEAD of init has only its status
                assert code in line, line
            assert time.monotonic() - t0 < 60  # a refusal is not retried
            outputs.append(p)
    for p in outputs:
        assert WRONG_SECRET not in p.stdout + p.stderr
        assert secret not in p.stdout + p.stderr
    # the refused init created nothing (listed without a prefix: see the module's docstring)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["config.json"], keys
