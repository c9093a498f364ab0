"""The retention policy (pipelines/retention.py) on synthetic version ids: restic's `forget`
semantics, pins, gaps, and hour/day/ISO-week/month/year boundaries."""
from __future__ import annotations

import datetime as dt
import random

import pytest

from pipelines.retention import Policy, PolicyError, plan, version_time
from storage.store import new_version_id


def vid(text: str) -> str:
    """'2026-11-24 13:05:00' -> the version id storage.store would give a backup at that time (UTC)."""
    return new_version_id(dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc))


def kept(versions, pinned=(), created=None, **policy) -> list[str]:
    return [d.version for d in plan(versions, Policy(**policy), pinned, created) if d.keep]


def reasons(versions, pinned=(), **policy) -> dict:
    return {d.version: d.reasons for d in plan(versions, Policy(**policy), pinned)}


def daily_series(start: str, days: int, per_day=(3, 9, 21)) -> list[str]:
    t0 = dt.datetime.fromisoformat(start)
    return [vid(str(t0 + dt.timedelta(days=d, hours=h))) for d in range(days) for h in per_day]


def test_version_time_from_id_and_created():
    v = vid("2026-11-24 13:05:07.123000")
    assert v == "20261124-130507-123"
    assert version_time(v) == dt.datetime(2026, 11, 24, 13, 5, 7, 123000, tzinfo=dt.timezone.utc)
    assert version_time("oddname", "2026-01-02T03:04:05Z") == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert version_time("oddname", "2026-01-02T04:04:05+01:00").hour == 3  # converted to UTC
    assert version_time("oddname") is None and version_time("oddname", "yesterday") is None
    assert version_time("20261399-000000-000") is None  # looks like an id, is not a date


def test_decisions_are_newest_first_whatever_the_input_order():
    vs = daily_series("2026-01-01", 5)
    shuffled = vs[:]
    random.Random(1).shuffle(shuffled)
    assert [d.version for d in plan(shuffled, Policy(keep_last=1))] == sorted(vs, reverse=True)


def test_keep_last():
    vs = daily_series("2026-01-01", 4)  # 12 versions
    assert kept(vs, keep_last=5) == sorted(vs, reverse=True)[:5]
    assert kept(vs, keep_last=100) == sorted(vs, reverse=True)
    assert set(reasons(vs, keep_last=2)[max(vs)]) == {"last 2"}


def test_keep_daily_takes_the_newest_of_each_day():
    vs = daily_series("2026-03-01", 10)
    got = kept(vs, keep_daily=3)
    assert got == [vid("2026-03-10 21:00"), vid("2026-03-09 21:00"), vid("2026-03-08 21:00")]
    assert reasons(vs, keep_daily=3)[vid("2026-03-09 21:00")] == ["daily 2026-03-09"]


def test_days_without_versions_are_skipped_not_counted():
    vs = [vid("2026-03-10 08:00"), vid("2026-03-01 08:00"), vid("2026-02-20 08:00"), vid("2026-02-19 08:00")]
    assert kept(vs, keep_daily=3) == vs[:3]  # 3 most recent days that HAVE versions, over a gap of weeks


def test_rules_are_a_union_and_a_version_lists_every_reason():
    vs = daily_series("2026-03-01", 10)
    r = reasons(vs, keep_last=2, keep_daily=2)
    newest = vid("2026-03-10 21:00")
    assert r[newest] == ["last 2", "daily 2026-03-10"]
    assert r[vid("2026-03-10 09:00")] == ["last 2"]
    assert r[vid("2026-03-09 21:00")] == ["daily 2026-03-09"]
    assert sum(bool(x) for x in r.values()) == 3


def test_hourly():
    vs = [vid(f"2026-05-05 {h:02d}:{m:02d}") for h in (10, 11, 13) for m in (0, 30)]
    assert kept(vs, keep_hourly=2) == [vid("2026-05-05 13:30"), vid("2026-05-05 11:30")]
    assert reasons(vs, keep_hourly=1)[vid("2026-05-05 13:30")] == ["hourly 2026-05-05 13:00"]
    # an hour boundary across midnight
    vs = [vid("2026-05-05 23:59:59"), vid("2026-05-06 00:00:01")]
    assert kept(vs, keep_hourly=2) == sorted(vs, reverse=True)


def test_weekly_uses_iso_weeks_starting_monday():
    # 2026-11-22 is a Sunday (week 47), 2026-11-23 a Monday (week 48)
    vs = [vid("2026-11-16 09:00"), vid("2026-11-22 23:00"), vid("2026-11-23 01:00"), vid("2026-11-25 09:00")]
    r = reasons(vs, keep_weekly=2)
    assert r[vid("2026-11-25 09:00")] == ["weekly 2026-W48"]
    assert r[vid("2026-11-22 23:00")] == ["weekly 2026-W47"]
    assert r[vid("2026-11-23 01:00")] == [] and r[vid("2026-11-16 09:00")] == []


def test_weekly_across_the_year_end():
    # 2026-12-31 (Thu) and 2027-01-03 (Sun) are both ISO week 2026-W53; 2027-01-04 is 2027-W01
    vs = [vid("2026-12-28 10:00"), vid("2026-12-31 10:00"), vid("2027-01-03 10:00"), vid("2027-01-04 10:00")]
    r = reasons(vs, keep_weekly=5)
    assert r[vid("2027-01-04 10:00")] == ["weekly 2027-W01"]
    assert r[vid("2027-01-03 10:00")] == ["weekly 2026-W53"]
    assert r[vid("2026-12-31 10:00")] == [] and r[vid("2026-12-28 10:00")] == []
    # 2025-12-29 (Mon) starts ISO week 2026-W01: the ISO year is not the calendar year
    assert reasons([vid("2025-12-29 10:00")], keep_weekly=1)[vid("2025-12-29 10:00")] == ["weekly 2026-W01"]


def test_monthly_and_month_boundaries():
    vs = [vid("2026-01-31 23:59:59"), vid("2026-02-01 00:00:00"), vid("2026-02-28 12:00"), vid("2026-03-01 00:00"),
          vid("2024-02-29 12:00")]
    r = reasons(vs, keep_monthly=3)
    assert r[vid("2026-03-01 00:00")] == ["monthly 2026-03"]
    assert r[vid("2026-02-28 12:00")] == ["monthly 2026-02"]
    assert r[vid("2026-02-01 00:00:00")] == []
    assert r[vid("2026-01-31 23:59:59")] == ["monthly 2026-01"]
    assert r[vid("2024-02-29 12:00")] == []  # a 4th month: beyond N
    assert reasons(vs, keep_monthly=4)[vid("2024-02-29 12:00")] == ["monthly 2024-02"]


def test_yearly_and_year_boundaries():
    vs = [vid("2024-12-31 23:59:59"), vid("2025-01-01 00:00:00"), vid("2025-06-01 00:00"), vid("2023-03-03 03:03")]
    r = reasons(vs, keep_yearly=2)
    assert r[vid("2025-06-01 00:00")] == ["yearly 2025"]
    assert r[vid("2024-12-31 23:59:59")] == ["yearly 2024"]
    assert r[vid("2025-01-01 00:00:00")] == [] and r[vid("2023-03-03 03:03")] == []


def test_the_usual_admin_policy_over_two_years():
    vs = daily_series("2025-01-01", 730, per_day=(2,))
    got = kept(vs, keep_last=7, keep_daily=14, keep_weekly=8, keep_monthly=12, keep_yearly=3)
    newest = dt.date(2026, 12, 31)
    days = {dt.date(int(v[:4]), int(v[4:6]), int(v[6:8])) for v in got}
    assert {newest - dt.timedelta(days=i) for i in range(14)} <= days
    assert dt.date(2025, 12, 31) in days  # yearly 2025 (its months are beyond the 12 monthly ones)
    assert {dt.date(2026, m, 1) - dt.timedelta(days=1) for m in range(2, 13)} <= days  # monthly: last days
    assert len(got) == len(set(got))
    assert all(not d.keep for d in plan(vs, Policy(keep_last=1)) if d.version != max(vs))
    # 14 days + 5 older Sundays (ISO weeks) + 11 older month ends + 2025's last day
    assert len(got) == 14 + 5 + 11 + 1


def test_pins_are_kept_and_do_not_count():
    vs = daily_series("2026-03-01", 5)
    newest = sorted(vs, reverse=True)
    # pinning the two newest: keep_last 2 still keeps two unpinned ones as well
    got = kept(vs, pinned=newest[:2], keep_last=2)
    assert got == newest[:4]
    assert reasons(vs, pinned=newest[:2], keep_last=2)[newest[0]] == ["pinned"]
    # an old pinned version survives any policy
    assert newest[-1] in kept(vs, pinned=[newest[-1]], keep_last=1)
    # a pin does not use up a day: the day of a pinned newest version still keeps its next unpinned one
    r = reasons(vs, pinned=[newest[0]], keep_daily=1)
    assert r[newest[0]] == ["pinned"] and r[newest[1]] == ["daily 2026-03-05"]
    # pins of versions that are not in the list change nothing
    assert kept(vs, pinned=["19990101-000000-000"], keep_last=1) == newest[:1]


def test_the_newest_version_is_always_kept():
    vs = daily_series("2026-03-01", 3)
    d = plan(vs, Policy())  # an empty policy: the CLI refuses it, the function still keeps one
    assert [x.version for x in d if x.keep] == [max(vs)] and d[0].reasons == ["newest"]
    assert [x.version for x in plan(vs, Policy(keep_last=0, keep_daily=0)) if x.keep] == [max(vs)]
    assert plan([], Policy(keep_last=3)) == []
    one = [vid("2026-01-01 00:00")]
    assert kept(one, keep_daily=1) == one


def test_versions_without_a_date_are_kept_and_created_is_used():
    vs = ["handmade", "imported", vid("2026-03-01 10:00"), vid("2026-03-02 10:00")]
    created = {"imported": "2026-03-03T10:00:00Z"}  # newer than the id-dated ones
    d = {x.version: x for x in plan(vs, Policy(keep_last=1), created=created)}
    assert d["handmade"].keep and d["handmade"].reasons == ["no date"]
    assert d["imported"].reasons == ["last 1"]
    assert not d[vid("2026-03-02 10:00")].keep and not d[vid("2026-03-01 10:00")].keep


def test_same_second_versions_are_ordered_by_milliseconds():
    vs = ["20260301-100000-001", "20260301-100000-900", "20260301-100000-050"]
    assert kept(vs, keep_last=1) == ["20260301-100000-900"]
    assert kept(vs, keep_hourly=1) == ["20260301-100000-900"]


@pytest.mark.parametrize("bad", [{"keep_last": -1}, {"keep_daily": "3"}, {"keep_weekly": True}, {"keep_yearly": 1.5}])
def test_bad_policy_values(bad):
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(bad)
    assert next(iter(bad)) in str(e.value)


def test_policy_dict_roundtrip_and_unknown_keys():
    p = Policy.from_dict({"keep_last": 2, "keep_monthly": 6})
    assert p.to_dict() == {"keep_last": 2, "keep_monthly": 6} and p and not Policy()
    assert p.describe() == "keep-last 2, keep-monthly 6"
    with pytest.raises(PolicyError, match="unknown key 'keep_dayly'"):
        Policy.from_dict({"keep_dayly": 3})


def test_random_histories_keep_invariants():
    rng = random.Random(7)
    t0 = dt.datetime(2024, 1, 1)
    for _ in range(200):
        vs = sorted({vid(str(t0 + dt.timedelta(minutes=rng.randrange(0, 3 * 365 * 24 * 60))))
                     for _ in range(rng.randrange(1, 60))})
        pol = Policy(**{k: rng.randrange(0, 4) for k in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly",
                                                          "keep_monthly", "keep_yearly")})
        pins = set(rng.sample(vs, min(len(vs), rng.randrange(0, 3))))
        ds = plan(vs, pol, pins)
        assert ds[0].keep and ds[0].version == max(vs)  # the newest always stays
        assert all(d.keep for d in ds if d.version in pins)
        assert all(d.keep == bool(d.reasons) for d in ds)
        assert sum(d.keep for d in ds) <= len(pins) + sum(pol.to_dict().values()) + 1
        # a bigger policy never keeps less
        bigger = Policy(**{k: v + 1 for k, v in pol.to_dict().items()} | {"keep_last": pol.keep_last + 1})
        assert {d.version for d in ds if d.keep} <= {d.version for d in plan(vs, bigger, pins) if d.keep}


# -- retention in job files (alike_ray/jobs.py) -----------------------------------------------
JOB = 'name = "j"\nsources = ["image:/x"]\n'


@pytest.mark.parametrize("text,want", [
    ("[retention]\nonsite = 3\noffsite = 30\n", {"onsite": {"keep_last": 3}, "offsite": {"keep_last": 30}}),
    ("[retention.onsite]\nkeep_last = 2\nkeep_daily = 7\n[retention.offsite]\nkeep_monthly = 12\n",
     {"onsite": {"keep_last": 2, "keep_daily": 7}, "offsite": {"keep_monthly": 12}}),
    ("[retention.onsite]\nkeep_last = 0\n", {}),  # keeps nothing by rule: no retention at all
    ("", {}),
])
def test_job_retention_tables(tmp_path, text, want):
    from alike_ray import jobs

    f = tmp_path / "j.toml"
    f.write_text(JOB + text)
    job = jobs.load(str(f))
    assert {k: p.to_dict() for k, p in job.retention.items()} == want and job.validate is False


@pytest.mark.parametrize("text,words", [
    ("[retention.onsite]\nkeep_dayly = 2\n", "unknown key 'keep_dayly' in [retention.onsite]"),
    ("[retention.offsite]\nkeep_last = \"2\"\n", "keep_last in [retention.offsite] must be an integer"),
    ("[retention.onsite]\nkeep_weekly = -1\n", "keep_weekly in [retention.onsite] must be 0 or more"),
    ("[retention]\nonsite = -1\n", "onsite in [retention] must be 0 or more"),
    ("[retention]\nonsite = true\n", "onsite in [retention] must be a table"),
    ("[retention]\nlocal = 3\n", "unknown key 'local' in [retention]"),
    ("[options]\nvalidate = \"yes\"\n", "validate in [options] must be true or false"),
])
def test_job_retention_errors(tmp_path, text, words):
    from alike_ray import jobs

    f = tmp_path / "j.toml"
    f.write_text(JOB + text)
    with pytest.raises(jobs.JobError) as e:
        jobs.load(str(f))
    assert str(f) in e.value.message and words in e.value.message
