"""Backup jobs: a TOML file saying which VMs, how, and where; a record of each run on the store.

    name = "nightly"                         # required: letters, digits, '.', '_', '-'
    store = "./ads"                          # optional (else --store / $ALIKE_STORE)
    endpoint = "http://127.0.0.1:9000"       # optional, for a store on S3
    sources = ["kvm:qemu:///system", {uri = "image:/images/web.raw", name = "web", tags = ["prod"]}]

    [select]                                 # evaluated at every run; none = every VM
    vms = ["web", "db"]                      # these names
    keyword = "web"                          # names containing it (or matching it, as a glob)
    tags = ["prod"]                          # VMs with any of these tags
    exclude = ["scratch"]                    # never these names

    [options]
    method = "enhanced"                      # agentless (the agent comes with its own issue)
    cbt = true                               # changed block tracking where the source has it
    memory = false                           # disk-and-memory snapshots where the platform can
    parallel = 1                             # simultaneous VMs
    full = false                             # always full/baseline: no munge cache
    vault_to = "s3://bucket/offsite"         # vault the new versions right after the backup
    vault_endpoint = "http://127.0.0.1:9000"

    [retention]                              # kept for the retention issue: onsite/offsite counts
    onsite = 14
    offsite = 30

A VM is taken when it matches any of vms, keyword or tags, and is not excluded. Runs are
recorded under jobs/<name>/runs/<run id>.json on the job's store.
"""
from __future__ import annotations

import fnmatch
import json
import time
import tomllib
from dataclasses import dataclass, field

from storage.errors import StoreError
from storage.store import VM_NAME

SCHEMA = {
    "": {"name": str, "store": str, "endpoint": str, "profile": str, "sources": list,
         "select": dict, "options": dict, "retention": dict},
    "select": {"vms": list, "keyword": str, "tags": list, "exclude": list},
    "options": {"method": str, "cbt": bool, "memory": bool, "parallel": int, "full": bool,
                "vault_to": str, "vault_endpoint": str, "vault_profile": str},
    "retention": {"onsite": int, "offsite": int},
}
TYPE_NAMES = {str: "a string", list: "a list", dict: "a table", bool: "true or false", int: "an integer"}


class JobError(StoreError):
    """{detail}"""


@dataclass
class Job:
    path: str
    name: str
    sources: list[dict]
    store: str | None = None
    endpoint: str | None = None
    profile: str | None = None
    vms: list[str] = field(default_factory=list)
    keyword: str | None = None
    tags: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    method: str = "enhanced"
    cbt: bool = True
    memory: bool = False
    parallel: int = 1
    full: bool = False
    vault_to: str | None = None
    vault_endpoint: str | None = None
    vault_profile: str | None = None
    retention: dict = field(default_factory=dict)

    def selects(self, name: str, tags: list[str]) -> bool:
        if name in self.exclude:
            return False
        if not (self.vms or self.keyword or self.tags):
            return True
        if name in self.vms:
            return True
        if self.keyword:
            kw = self.keyword
            if any(c in kw for c in "*?[") and fnmatch.fnmatchcase(name, kw):
                return True
            if kw.lower() in name.lower():
                return True
        return bool(set(self.tags) & set(tags or []))


def _check(path: str, section: str, table: dict) -> None:
    known = SCHEMA[section]
    where = f"[{section}]" if section else "the top level"
    for key, value in table.items():
        if key not in known:
            raise JobError(f"{path}: unknown key {key!r} in {where} (known: {', '.join(sorted(known))})")
        want = known[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise JobError(f"{path}: {key} in {where} must be {TYPE_NAMES[want]}, not {value!r}")


def load(path: str) -> Job:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise JobError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise JobError(f"cannot read job file {path}: {e.strerror}") from None
    _check(path, "", data)
    for section in ("select", "options", "retention"):
        _check(path, section, data.get(section, {}))
    if "name" not in data:
        raise JobError(f"{path}: the job has no name: add name = \"...\" at the top")
    if not VM_NAME.match(data["name"]):
        raise JobError(f"{path}: name {data['name']!r} is not allowed: use letters, digits, '.', '_' and '-'")
    sources = []
    for i, s in enumerate(data.get("sources", [])):
        if isinstance(s, str):
            s = {"uri": s}
        if not isinstance(s, dict) or not isinstance(s.get("uri"), str) or set(s) - {"uri", "name", "tags"} \
                or not isinstance(s.get("tags", []), list):
            raise JobError(f"{path}: sources[{i}] must be a source string or a table "
                           "{{uri = \"...\", name = \"...\", tags = [...]}}")
        sources.append(s)
    if not sources:
        raise JobError(f"{path}: the job has no sources: add sources = [\"image:/path/disk.raw\"] or a kvm: URI")
    sel, opt = data.get("select", {}), data.get("options", {})
    for key in ("vms", "tags", "exclude"):
        if not all(isinstance(x, str) for x in sel.get(key, [])):
            raise JobError(f"{path}: {key} in [select] must be a list of strings")
    if opt.get("method", "enhanced") != "enhanced":
        raise JobError(f"{path}: method {opt['method']!r} is not available: use \"enhanced\" (agentless)")
    if opt.get("parallel", 1) < 1:
        raise JobError(f"{path}: parallel in [options] must be at least 1")
    return Job(path=path, name=data["name"], sources=sources, store=data.get("store"),
               endpoint=data.get("endpoint"), profile=data.get("profile"),
               vms=sel.get("vms", []), keyword=sel.get("keyword"), tags=sel.get("tags", []),
               exclude=sel.get("exclude", []), retention=data.get("retention", {}),
               **{k: opt[k] for k in ("method", "cbt", "memory", "parallel", "full", "vault_to",
                                      "vault_endpoint", "vault_profile") if k in opt})


def select(job: Job, node_id: str | None = None):
    """-> ([(source, VMInfo)] the job takes now, {VM name: why it cannot be taken}) where the
    second holds VMs listed in [select] vms that no source has, and VMs of sources that cannot
    be listed now (an image that disappeared...): they fail alone, the others run."""
    from .sources import SourceError, open_source

    taken, seen, problems = [], set(), {}
    for s in job.sources:
        opts = {"node_id": node_id}
        if s["uri"].startswith("image:"):
            opts["name"] = s.get("name")
        try:
            src = open_source(s["uri"], **opts)
            vms = src.list_vms()
        except SourceError as e:
            name = s.get("name") or getattr(locals().get("src"), "name", None) or s["uri"]
            seen.add(name)
            if job.selects(name, s.get("tags", [])):
                problems[name] = f"source {s['uri']} cannot be read: {e}"
            continue
        for vm in vms:
            seen.add(vm.name)
            if s.get("tags"):  # tags given in the job for sources without their own (images)
                vm.tags = sorted(set(vm.tags) | set(s["tags"]))
            if job.selects(vm.name, vm.tags):
                taken.append((src, vm))
    for v in job.vms:
        if v not in seen:
            problems[v] = f"VM {v} is listed in {job.path} but no source has it (removed or renamed?)"
    names = [vm.name for _, vm in taken]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise JobError(f"{job.path}: two sources have a VM named {sorted(dup)[0]!r}: name them apart")
    return taken, problems


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{int(time.time() * 1000) % 1000:03d}"


def record_run(store, job: str, run_id: str, record: dict) -> None:
    store.backend.put(f"jobs/{job}/runs/{run_id}.json", json.dumps(record, indent=2).encode())


def history(store, job: str | None = None) -> list[dict]:
    out = []
    for key in store.backend.list(f"jobs/{job}/runs/" if job else "jobs/"):
        if "/runs/" in key and key.endswith(".json"):
            try:
                out.append(json.loads(store.backend.get(key)))
            except Exception:
                continue
    return sorted(out, key=lambda r: r.get("run_id", ""), reverse=True)
