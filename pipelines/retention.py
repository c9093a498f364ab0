"""Retention policy: which versions of a VM a prune keeps, and why. Pure functions, no store.

The semantics are restic's `forget` (which backup administrators know from restic and borg):

- the versions of one VM are taken newest first;
- keep_last N keeps the N newest;
- keep_hourly / keep_daily / keep_weekly / keep_monthly / keep_yearly N keep the newest version of
  each of the N most recent hours / days / ISO weeks / months / years that have versions (periods
  without versions are skipped, they do not use up N);
- a version kept by any rule is kept, with every rule that keeps it as a reason;
- pinned versions are always kept and are left out of the rules: they do not use up any N;
- the newest version of a VM is always kept: a prune never leaves a VM with no version.

Times are UTC, read from the version id (`YYYYmmdd-HHMMSS-mmm`, storage.store.new_version_id), else
from version.json's "created"; a version with neither is kept ("no date"), never guessed at.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field

# rule name -> (policy field, period of a time as a label)
RULES = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "%04d-W%02d" % t.isocalendar()[:2],
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}
KEYS = ("keep_last",) + tuple(f"keep_{r}" for r in RULES)
_ID = re.compile(r"^(\d{8})-(\d{6})(?:-(\d{3}))?")


class PolicyError(ValueError):
    """A bad policy value; the message names what and why."""


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def __post_init__(self):
        for k in KEYS:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PolicyError(f"{k} must be a whole number of 0 or more, not {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise PolicyError(f"unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in KEYS if getattr(self, k)}

    def __bool__(self) -> bool:
        """False for a policy that keeps nothing by any rule (it would delete all but the newest)."""
        return any(getattr(self, k) for k in KEYS)

    def describe(self) -> str:
        return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in self.to_dict().items()) or "nothing"


def version_time(version: str, created: str | None = None) -> _dt.datetime | None:
    """When a version was made (UTC), from its id, else from version.json's "created"."""
    m = _ID.match(version or "")
    if m:
        try:
            t = _dt.datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
            return t.replace(microsecond=int(m.group(3) or 0) * 1000, tzinfo=_dt.timezone.utc)
        except ValueError:
            pass
    if created:
        try:
            t = _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
            return (t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)).astimezone(_dt.timezone.utc)
        except ValueError:
            pass
    return None


@dataclass
class Decision:
    version: str
    keep: bool = False
    reasons: list[str] = field(default_factory=list)
    time: _dt.datetime | None = None

    def to_dict(self) -> dict:
        return {"version": self.version, "keep": self.keep, "reasons": self.reasons,
                "time": self.time.strftime("%Y-%m-%dT%H:%M:%SZ") if self.time else None}


def plan(versions, policy: Policy, pinned=(), created: dict | None = None) -> list[Decision]:
    """Decide for the versions of ONE VM. -> one Decision per version, newest first.

    versions: version ids (any order); pinned: the ids among them that are pinned;
    created: {version id: version.json "created"}, used only for ids that carry no time."""
    created = created or {}
    pinned = set(pinned)
    ds = [Decision(v, time=version_time(v, created.get(v))) for v in versions]
    # newest first; ties (same second) by id, which also orders the milliseconds
    ds.sort(key=lambda d: (d.time or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc), d.version), reverse=True)
    for d in ds:
        if d.version in pinned:
            d.keep = True
            d.reasons.append("pinned")
        elif d.time is None:
            d.keep = True
            d.reasons.append("no date")
    rest = [d for d in ds if d.version not in pinned and d.time is not None]
    for d in rest[:policy.keep_last]:
        d.keep = True
        d.reasons.append(f"last {policy.keep_last}")
    for rule, period in RULES.items():
        n = getattr(policy, f"keep_{rule}")
        last = None
        for d in rest:
            if n <= 0:
                break
            p = period(d.time)
            if p != last:  # the newest version of a period not seen yet
                last = p
                n -= 1
                d.keep = True
                d.reasons.append(f"{rule} {p}")
    if ds and not ds[0].keep:  # only with an empty policy: the promise that a VM keeps a version
        ds[0].keep = True
        ds[0].reasons.append("newest")
    return ds
