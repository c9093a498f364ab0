"""Backup jobs (TOML files) on image sources: selection by keyword and tags, simultaneous VMs,
run history on the store, and clear errors for bad job files."""
from __future__ import annotations

import json
import subprocess

import pytest


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def fleet(corpus, tmp_path):
    """Five VMs: web1, web2, db1 (tag prod), cache (tag prod), scratch."""
    imgs = {}
    for name, src in (("web1", "web"), ("web2", "web_day2"), ("db1", "db"), ("cache", "web"), ("scratch", "web")):
        dst = tmp_path / f"{name}.img"
        subprocess.run(["cp", "--sparse=always", corpus[src], dst], check=True)
        imgs[name] = dst
    return imgs


def job_text(store, fleet, select, options='parallel = 2'):
    srcs = ",\n  ".join(
        f'{{uri = "image:{p}", name = "{n}"' + (', tags = ["prod"]' if n in ("db1", "cache") else "") + "}"
        for n, p in fleet.items())
    return f'name = "nightly"\nstore = "{store}"\nsources = [\n  {srcs}\n]\n\n[select]\n{select}\n\n[options]\n{options}\n'


def test_job_keyword_tags_parallel_and_history(alike, fleet, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    job = write(tmp_path / "nightly.toml", job_text(store, fleet, 'keyword = "web"\ntags = ["prod"]'))
    pre = alike.json("job", "preview", job)
    assert sorted(v["vm"] for v in pre["vms"]) == ["cache", "db1", "web1", "web2"]
    p = alike("job", "run", job, "--json")
    assert p.returncode == 0, p.stderr
    run = json.loads(p.stdout)
    assert run["status"] == "ok" and sorted(v["vm"] for v in run["vms"]) == ["cache", "db1", "web1", "web2"]
    for phase in ("snapshot", "data acquisition", "metadata commit"):
        assert f"web1: {phase}" in p.stderr  # one progress line per VM and phase
    assert all(v["read_bytes"] > 0 for v in run["vms"])
    hist = alike.json("job", "history", "--store", store)["runs"]
    assert len(hist) == 1 and hist[0]["run_id"] == run["run_id"] and hist[0]["status"] == "ok"
    assert {v["vm"]: v["version"] for v in hist[0]["vms"]} == {v["vm"]: v["version"] for v in run["vms"]}
    assert sum(v["new_blocks"] for v in hist[0]["vms"]) == alike.json("stats", "--store", store)["unique_blocks"]
    vers = alike.json("versions", "--store", store)["versions"]
    assert sorted(v["vm"] for v in vers) == ["cache", "db1", "web1", "web2"]
    # a VM that disappeared fails alone; the others are backed up; the run's exit code says so
    fleet["web2"].unlink()
    job2 = write(tmp_path / "static.toml",
                 job_text(store, fleet, 'vms = ["web1", "ghost"]').replace('"nightly"', '"static"'))
    p = alike("job", "run", job2)
    assert p.returncode == 1 and "ghost" in p.stderr and "Traceback" not in p.stderr
    hist = alike.json("job", "history", "--store", store, "--job", "static")["runs"]
    res = {v["vm"]: v for v in hist[0]["vms"]}
    assert hist[0]["status"] == "failed" and "error" in res["ghost"] and "version" in res["web1"]
    assert "web2" not in res  # not selected by this job: its missing image does not matter
    # a selected VM whose image disappeared fails alone too
    job3 = write(tmp_path / "again.toml", job_text(store, fleet, 'keyword = "web"').replace('"nightly"', '"again"'))
    p = alike("job", "run", job3, "--json")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    res = {v["vm"]: v for v in json.loads(p.stdout)["vms"]}
    assert "does not exist" in res["web2"]["error"] and "version" in res["web1"]


BAD = [
    ("unknown key", 'name = "j"\nsources = ["image:/x"]\n[options]\nparalel = 2\n', "unknown key 'paralel' in [options]"),
    ("wrong type", 'name = "j"\nsources = ["image:/x"]\n[options]\nparallel = "two"\n', "parallel in [options] must be an integer"),
    ("toml syntax", 'name = "j"\nsources = [\n', "not valid TOML"),
    ("no name", 'sources = ["image:/x"]\n', "has no name"),
    ("no sources", 'name = "j"\n', "has no sources"),
    ("bad method", 'name = "j"\nsources = ["image:/x"]\n[options]\nmethod = "magic"\n', "not available"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_job_files(alike, tmp_path, case):
    _, text, words = case
    job = write(tmp_path / "bad.toml", text)
    p = alike("job", "preview", job)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("alike: error:") and str(job) in last and words in last, p.stderr


def test_selection_matching_nothing(alike, fleet, tmp_path):
    job = write(tmp_path / "none.toml", job_text(tmp_path / "ads", fleet, 'keyword = "nomatch"'))
    p = alike("job", "preview", job)
    assert p.returncode == 2 and "matches no VM" in p.stderr and "Traceback" not in p.stderr


def test_run_called_directly(ray_address, fleet, tmp_path):
    """jobs.run is what `alike server` and a scheduler call, without the CLI: it backs up, applies
    retention, records the run on the store, and returns that same record."""
    from alike_ray import jobs
    from pipelines.cluster import local_node_id
    from storage.store import Store

    store = tmp_path / "ads"
    Store.init(str(store))
    job = jobs.load(str(write(tmp_path / "direct.toml",
                              job_text(store, fleet, 'vms = ["web1"]').replace('"nightly"', '"direct"')
                              + "[retention.onsite]\nkeep_last = 1\n")))
    said = []
    runs = [jobs.run(job, jobs.store_for(job), node_id=local_node_id(), say=said.append) for _ in range(2)]
    assert [r.code for r in runs] == [0, 0]
    versions = [r.record["vms"][0]["version"] for r in runs]
    assert [v for _, v in Store.open(str(store)).list_versions("web1")] == [versions[1]]  # keep_last 1
    assert runs[1].record["retention"]["onsite"]["removed"] == [f"web1@{versions[0]}"]
    assert any(s.startswith("retention onsite: ") for s in said)  # progress for a log
    hist = jobs.history(Store.open(str(store)), "direct")
    assert [h["run_id"] for h in hist] == [r.record["run_id"] for r in reversed(runs)]
    assert hist[0] == runs[1].record
