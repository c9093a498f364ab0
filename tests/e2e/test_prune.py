"""Retention through the real CLI: `alike prune` (dry run and real), pins, job retention, bad input.

Real backups of the corpus images make the newest versions. The date-based rules need versions
from other days, months and years, which a test cannot wait for: those are made by copying a real
version folder (version.json and manifests, which reference blocks already in the store) to new
folders named with chosen version ids in the directory store. Such a copy is a valid version of
the same disk content, so it must restore byte-identical and pass `alike verify` like the original.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests import images
from tests.conftest import tree_digest


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def ids(alike, store, vm) -> list[str]:
    return [v["version"] for v in alike.json("versions", "--store", store, "--vm", vm)["versions"]]


# synthetic versions of web, all older than any real backup (made now), newest first
SYNTH = ["20210301-120000-000",  # 2021-03, 2021-W09 (Mon)
         "20210228-230000-000",  # 2021-02, Sunday: ISO week 2021-W08
         "20210228-080000-000",  # same day, older
         "20210222-080000-000",  # Monday of 2021-W08, so the week's older one
         "20210115-100000-000",  # 2021-01
         "20201231-235959-999",  # the year 2020's last, 2020-W53
         "20200601-000000-000"]  # 2020-06


def test_prune_dry_run_pins_policy_and_restore(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    first = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")["version"]
    newest = alike.json("backup", "--store", store, f"image:{corpus['web_day2']}", "--name", "web")["version"]
    db = alike.json("backup", "--store", store, f"image:{corpus['db']}", "--name", "db")["version"]
    for v in SYNTH:
        shutil.copytree(store / "versions" / "web" / first, store / "versions" / "web" / v)
    assert ids(alike, store, "web") == [newest, first] + SYNTH

    pin = alike.json("pin", "web@20200601", "--note", "before the migration", "--store", store)
    assert pin["version"] == "20200601-000000-000"
    pins = alike.json("pins", "--store", store)["pins"]
    assert [(p["vm"], p["version"], p["note"]) for p in pins] == [("web", "20200601-000000-000", "before the migration")]

    # dry run: every version with KEEP/REMOVE and why; nothing changes
    policy = ["--keep-last", "2", "--keep-weekly", "3", "--keep-yearly", "3"]
    before = tree_digest(store)
    p = alike("prune", "--store", store, "--vm", "web", *policy, "--dry-run")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert f"KEEP    web@{newest}  last 2, weekly" in lines[0] and "yearly" in lines[0]
    assert "REMOVE  web@20210228-080000-000" in lines and "REMOVE  web@20210115-100000-000" in lines
    assert any(x.startswith("KEEP    web@20200601-000000-000  pinned") for x in lines)
    assert "nothing was changed" in lines[-1]
    dry = alike.json("prune", "--store", store, "--vm", "web", *policy, "--dry-run")
    assert tree_digest(store) == before
    reasons = {d["version"]: d["reasons"] for d in dry["vms"][0]["versions"]}
    # weekly: the newest of the 3 most recent ISO weeks with versions (the real backups share one)
    week_of_now = [r for r in reasons[newest] if r.startswith("weekly")][0].split()[1]
    assert reasons == {
        newest: ["last 2", f"weekly {week_of_now}", f"yearly {newest[:4]}"],
        first: ["last 2"],
        "20210301-120000-000": ["weekly 2021-W09", "yearly 2021"],
        "20210228-230000-000": ["weekly 2021-W08"],
        "20210228-080000-000": [],
        "20210222-080000-000": [],
        "20210115-100000-000": [],
        "20201231-235959-999": ["yearly 2020"],
        "20200601-000000-000": ["pinned"],
    }
    expected_kept = [v for v, r in reasons.items() if r]
    assert sorted(dry["removed"]) == sorted(f"web@{v}" for v, r in reasons.items() if not r)

    # the real run removes exactly those; db is not touched (--vm web)
    real = alike("prune", "--store", store, "--vm", "web", *policy)
    assert real.returncode == 0, real.stderr
    assert "removed 3 version(s), kept 6" in real.stdout and "alike gc" in real.stdout
    assert ids(alike, store, "web") == expected_kept and ids(alike, store, "db") == [db]
    assert not list((store / "locks").glob("*.json"))  # the writer lock is released

    # every version kept still restores byte-identical, and the store verifies
    for v, src in ((newest, corpus["web_day2"]), ("20200601-000000-000", corpus["web"])):
        alike.json("restore", "--store", store, f"web@{v}", "--to", tmp_path / f"{v}.raw")
        assert same(tmp_path / f"{v}.raw", src), v
    ver = alike.json("verify", "--store", store)
    assert ver["ok"] and ver["versions"] == len(expected_kept) + 1

    # once unpinned, a prune of every VM may remove it; each VM keeps at least its newest
    alike.json("unpin", "web@20200601-000000-000", "--store", store)
    assert alike.json("pins", "--store", store)["pins"] == []
    rep = alike.json("prune", "--store", store, "--keep-last", "1")
    assert sorted(rep["removed"]) == sorted(f"web@{v}" for v in expected_kept if v != newest)
    assert ids(alike, store, "web") == [newest] and ids(alike, store, "db") == [db]


def test_job_retention_keeps_two_per_vm(alike, tmp_path):
    """Small random images: what is checked here is the retention, not the backup."""
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    web, db = images.random_image(tmp_path / "web.raw", 2), images.random_image(tmp_path / "db.raw", 1)
    job = tmp_path / "daily.toml"
    job.write_text(f'name = "daily"\nstore = "{store}"\n'
                   f'sources = [{{uri = "image:{web}", name = "web"}}, '
                   f'{{uri = "image:{db}", name = "db"}}]\n'
                   f'[options]\nparallel = 2\nvalidate = true\nvault_to = "{tmp_path / "ods"}"\n'
                   '[retention.onsite]\nkeep_last = 2\n[retention]\noffsite = 1\n')
    runs = []
    for _ in range(3):
        p = alike("job", "run", job, "--json")
        assert p.returncode == 0, p.stderr
        runs.append(json.loads(p.stdout))
    assert [r["retention"]["onsite"]["removed"] for r in runs[:2]] == [[], []]
    made = {vm: [v["version"] for r in runs for v in r["vms"] if v["vm"] == vm] for vm in ("web", "db")}
    assert sorted(runs[2]["retention"]["onsite"]["removed"]) == sorted([f"web@{made['web'][0]}",
                                                                         f"db@{made['db'][0]}"])
    assert all(r["validate"]["ok"] and r["validate"]["mode"] == "new" for r in runs)
    # validate = true reads the new data only: the same images again make no new packs
    assert runs[0]["validate"]["packs_checked"] >= 1
    assert [r["validate"]["packs_checked"] for r in runs[1:]] == [0, 0]
    for vm in ("web", "db"):
        assert ids(alike, store, vm) == made[vm][:0:-1]  # the two newest, newest first
    hist = alike.json("job", "history", "--store", store, "--job", "daily")["runs"]
    assert hist[0]["run_id"] == runs[2]["run_id"] and hist[0]["retention"]["onsite"]["kept"] == 4
    text = alike("job", "history", "--store", store).stdout
    assert "retention onsite: kept 4, removed 2: " in text and "validate: ok" in text
    # offsite retention (the old `offsite = N` shorthand) prunes the vault_to store
    assert [len(r["retention"]["offsite"]["removed"]) for r in runs] == [0, 2, 2]
    for vm in ("web", "db"):
        assert ids(alike, tmp_path / "ods", vm) == made[vm][-1:]

    # a prune that fails is reported, fails the run, and keeps what the run backed up
    (tmp_path / "not-a-store").write_text("x")
    job.write_text(job.read_text().replace(str(tmp_path / "ods"), str(tmp_path / "not-a-store")))
    p = alike("job", "run", job, "--json")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "alike: error: offsite retention failed (the backups are kept)" in p.stderr
    run = json.loads(p.stdout)
    assert run["status"] == "failed" and "error" in run["retention"]["offsite"]
    assert len(run["retention"]["onsite"]["removed"]) == 2  # onsite retention still ran
    for v in run["vms"]:
        assert ids(alike, store, v["vm"])[0] == v["version"]
    text = alike("job", "history", "--store", store).stdout
    assert "retention offsite: FAILED" in text


@pytest.fixture(scope="module")
def filled(tmp_path_factory, ray_address, corpus):
    from tests.conftest import CLI

    d = tmp_path_factory.mktemp("prunebad")
    alike = CLI(ray_address, d)
    alike.json("init", "--store", d / "ads")
    alike.json("backup", "--store", d / "ads", f"image:{corpus['web']}", "--name", "web")
    return d


BAD = [
    ("no keep option", ["prune", "--store", "{store}"], "at least one --keep-*"),
    ("only zeros", ["prune", "--store", "{store}", "--keep-last", "0", "--keep-daily", "0"], "at least one --keep-*"),
    ("negative number", ["prune", "--store", "{store}", "--keep-daily", "-3"], "--keep-daily '-3' is not allowed"),
    ("not a number", ["prune", "--store", "{store}", "--keep-last", "seven"], "--keep-last 'seven' is not allowed"),
    ("unknown store", ["prune", "--store", "{dir}/nostore", "--keep-last", "2"], "does not exist"),
    ("not a store", ["pins", "--store", "{dir}"], "not an alike store"),
    ("unknown vm", ["prune", "--store", "{store}", "--vm", "ghost", "--keep-last", "2"], "no VM named 'ghost'"),
    ("bad version", ["pin", "web@19990101", "--store", "{store}"], "no version '19990101' of web"),
    ("pin without version", ["pin", "web", "--store", "{store}"], "give VM@VERSION"),
    ("pin unknown vm", ["pin", "ghost@2026", "--store", "{store}"], "no VM named 'ghost'"),
    ("unpin not pinned", ["unpin", "web@2", "--store", "{store}"], "no pinned version '2' of web"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(alike, filled, case):
    _, argv, words = case
    store = filled / "ads"
    before = tree_digest(store)
    p = alike(*[a.format(store=store, dir=filled) for a in argv])
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("alike: error:")]
    assert len(errors) == 1 and words in errors[0], p.stderr
    assert tree_digest(store) == before


def test_job_validate_finds_damage_and_holds_back_retention(alike, tmp_path):
    """validate = true: damaged data makes the run exit 3 and onsite retention waits (an older
    version may be the intact copy)."""
    import os

    from storage.local import DirectoryBackend
    from storage.pack import read_footer

    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    web = images.random_image(tmp_path / "web.raw", 2)
    job = tmp_path / "j.toml"
    job.write_text(f'name = "checked"\nstore = "{store}"\nsources = [{{uri = "image:{web}", name = "web"}}]\n'
                   '[options]\nvalidate_all = true\n[retention]\nonsite = 1\n')
    first = alike.json("job", "run", job)
    assert first["validate"]["ok"] and first["retention"]["onsite"]["removed"] == []
    pack = next(os.path.join(r, f) for r, _, fs in os.walk(store / "packs") for f in fs)
    footer = read_footer(DirectoryBackend(str(store)), os.path.basename(pack))
    off = int(footer["offset"][0]) + int(footer["length"][0]) // 2
    with open(pack, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x5A]))
    p = alike("job", "run", job, "--json")
    assert p.returncode == 3 and "Traceback" not in p.stderr and "validation found damaged data" in p.stderr
    run = json.loads(p.stdout)
    assert run["status"] == "failed" and not run["validate"]["ok"] and run["validate"]["damaged"]
    assert "skipped" in run["retention"]["onsite"]
    assert len(ids(alike, store, "web")) == 2  # nothing pruned
    assert "validate: DAMAGED" in alike("job", "history", "--store", store).stdout
