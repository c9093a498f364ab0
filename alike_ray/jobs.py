"""Backup jobs: a TOML file saying which VMs, how, and where; a record of each run on the store.

    name = "nightly"                         # required: letters, digits, '.', '_', '-'
    store = "./ads"                          # optional (else --store / $ALIKE_STORE)
    endpoint = "http://127.0.0.1:9000"       # optional, for a store on S3
    sources = ["kvm:qemu:///system", {uri = "image:/images/web.raw", name = "web", tags = ["prod"]},
               {uri = "xen:https://pool-master", credentials = "/etc/alike/xen.toml", ca_bundle = "/etc/alike/pool-ca.pem"}]

    [select]                                 # evaluated at every run; none = every VM
    vms = ["web", "db"]                      # these names
    keyword = "web"                          # names containing it (or matching it, as a glob)
    tags = ["prod"]                          # VMs with any of these tags (xen:, vmware:, kvm: metadata)
    folders = ["Production/Web"]             # vmware: VMs in these folders (or below)
    exclude = ["scratch"]                    # never these names

    [options]
    method = "enhanced"                      # agentless (the agent comes with its own issue)
    cbt = true                               # changed block tracking where the source has it
    memory = false                           # disk-and-memory snapshots where the platform can (xen:)
    quiesce = false                          # quiesced snapshots through the guest's tools (vmware:)
    parallel = 1                             # simultaneous VMs
    full = false                             # always full/baseline: no munge cache
    vault_to = "s3://bucket/offsite"         # vault the new versions right after the backup
    vault_endpoint = "http://127.0.0.1:9000"
    validate = false                         # verify the new data after the backups (damaged -> exit 3)
    validate_all = false                     # ... or every block of the store

    [retention.onsite]                       # pruned on the job's store after each run (see `alike prune`)
    keep_last = 7                            # keep_last, keep_hourly, keep_daily, keep_weekly,
    keep_daily = 14                          # keep_monthly, keep_yearly: whole numbers >= 0
    [retention.offsite]                      # pruned on the vault_to store after each run
    keep_monthly = 12
    # onsite = 14 / offsite = 30 (plain integers) are shorthand for keep_last

A run backs up, vaults (vault_to), validates (validate), then applies retention to the job's VMs:
onsite on the job's store, offsite on the vault_to store. Pinned versions and the newest version
of each VM are always kept; onsite retention is skipped when validation finds damaged data (older
versions may be the intact ones); offsite retention without vault_to is skipped, with a note in
the run. A failed prune is recorded and makes the run fail; it never undoes the backups.

A VM is taken when it matches any of vms, keyword, tags or folders, and is not excluded. Runs are
recorded under jobs/<name>/runs/<run id>.json on the job's store.

`run(job, spec)` is a whole run (what `alike job run`, `alike server` and a scheduler call);
`load`, `select` and `store_for` are its parts that need no Ray.
"""
from __future__ import annotations

import fnmatch
import json
import os
import time
import tomllib
from dataclasses import dataclass, field
from typing import Callable

from storage.errors import StoreError
from storage.store import VM_NAME

SCHEMA = {
    "": {"name": str, "store": str, "endpoint": str, "profile": str, "sources": list,
         "select": dict, "options": dict, "retention": dict},
    "select": {"vms": list, "keyword": str, "tags": list, "folders": list, "exclude": list},
    "options": {"method": str, "cbt": bool, "memory": bool, "quiesce": bool, "parallel": int, "full": bool,
                "vault_to": str, "vault_endpoint": str, "vault_profile": str, "validate": bool,
                "validate_all": bool},
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
    folders: list[str] = field(default_factory=list)  # vmware: VM folders (and the folders below them)
    exclude: list[str] = field(default_factory=list)
    method: str = "enhanced"
    cbt: bool = True
    memory: bool = False
    quiesce: bool = False
    parallel: int = 1
    full: bool = False
    vault_to: str | None = None
    vault_endpoint: str | None = None
    vault_profile: str | None = None
    validate: bool = False
    validate_all: bool = False
    retention: dict = field(default_factory=dict)  # "onsite"/"offsite" -> retention.Policy (only those set)

    def selects(self, name: str, tags: list[str], folder: str = "") -> bool:
        if name in self.exclude:
            return False
        if not (self.vms or self.keyword or self.tags or self.folders):
            return True
        if folder and any(folder == f.strip("/") or folder.startswith(f.strip("/") + "/") for f in self.folders):
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


def load(path: str, base: str | None = None) -> Job:
    """Read and check a job file. `base`: the folder relative local paths in it (store, vault_to,
    image: sources) are taken from - the caller's working folder; `alike server` passes its
    client's, so that a job means the same wherever it runs."""
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
    for section in ("select", "options"):
        _check(path, section, data.get(section, {}))
    retention = _retention(path, data.get("retention", {}))
    if "name" not in data:
        raise JobError(f"{path}: the job has no name: add name = \"...\" at the top")
    if not VM_NAME.match(data["name"]):
        raise JobError(f"{path}: name {data['name']!r} is not allowed: use letters, digits, '.', '_' and '-'")
    sources = []
    for i, s in enumerate(data.get("sources", [])):
        if isinstance(s, str):
            s = {"uri": s}
        if not isinstance(s, dict) or not isinstance(s.get("uri"), str) \
                or set(s) - {"uri", "name", "tags", "credentials", "ca_bundle"} \
                or not isinstance(s.get("tags", []), list) \
                or not all(isinstance(s.get(k, ""), str) for k in ("name", "credentials", "ca_bundle")):
            raise JobError(f"{path}: sources[{i}] must be a source string or a table "
                           "{{uri = \"...\", name = \"...\", tags = [...], credentials = \"FILE\", "
                           "ca_bundle = \"FILE\"}}")
        for k in ("credentials", "ca_bundle"):  # relative to the job file, as image paths are
            if k in s and base:
                s[k] = os.path.abspath(os.path.join(base, s[k]))
        sources.append(s)
    if not sources:
        raise JobError(f"{path}: the job has no sources: add sources = [\"image:/path/disk.raw\"] or a kvm: URI")
    sel, opt = data.get("select", {}), data.get("options", {})
    for key in ("vms", "tags", "folders", "exclude"):
        if not all(isinstance(x, str) for x in sel.get(key, [])):
            raise JobError(f"{path}: {key} in [select] must be a list of strings")
    if opt.get("method", "enhanced") != "enhanced":
        raise JobError(f"{path}: method {opt['method']!r} is not available: use \"enhanced\" (agentless)")
    if opt.get("parallel", 1) < 1:
        raise JobError(f"{path}: parallel in [options] must be at least 1")
    for key, url in (("store", data.get("store")), ("vault_to", opt.get("vault_to"))):
        if url is not None:
            _check_store_url(path, key, url)
    if base:
        from .config import absolute_store
        from .sources import absolute_source

        for s in sources:
            s["uri"] = absolute_source(s["uri"], base)
        data["store"] = absolute_store(data.get("store"), base)
        if "vault_to" in opt:
            opt = dict(opt, vault_to=absolute_store(opt["vault_to"], base))
    return Job(path=path, name=data["name"], sources=sources, store=data.get("store"),
               endpoint=data.get("endpoint"), profile=data.get("profile"),
               vms=sel.get("vms", []), keyword=sel.get("keyword"), tags=sel.get("tags", []),
               folders=sel.get("folders", []),
               exclude=sel.get("exclude", []), retention=retention,
               **{k: opt[k] for k in ("method", "cbt", "memory", "quiesce", "parallel", "full", "vault_to",
                                      "vault_endpoint", "vault_profile", "validate", "validate_all") if k in opt})


def _check_store_url(path: str, key: str, url: str) -> None:
    """A store named in the job has a form alike knows (a folder, s3://BUCKET/PREFIX): found
    when the job is read, not after its backups ran."""
    from storage.backend import open_backend, store_spec

    try:
        open_backend(store_spec(url))  # no I/O: the URL's form only
    except StoreError as e:
        raise JobError(f"{path}: {key} {url!r}: {e.message}") from None


def _retention(path: str, table: dict) -> dict:
    """[retention] -> {"onsite"/"offsite": Policy} for the policies that keep something."""
    from pipelines.retention import KEYS, Policy

    out = {}
    for where, value in table.items():
        if where not in ("onsite", "offsite"):
            raise JobError(f"{path}: unknown key {where!r} in [retention] (known: offsite, onsite)")
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise JobError(f"{path}: {where} in [retention] must be 0 or more, not {value}")
            value = {"keep_last": value}  # the older shorthand
            section = "[retention]"
        elif isinstance(value, dict):
            section = f"[retention.{where}]"
        else:
            raise JobError(f"{path}: {where} in [retention] must be a table ([retention.{where}] with "
                           f"keep_last, keep_daily...) or an integer (keep_last), not {value!r}")
        for key, n in value.items():
            if key not in KEYS:
                raise JobError(f"{path}: unknown key {key!r} in {section} (known: {', '.join(KEYS)})")
            if isinstance(n, bool) or not isinstance(n, int):
                raise JobError(f"{path}: {key} in {section} must be an integer, not {n!r}")
            if n < 0:
                raise JobError(f"{path}: {key} in {section} must be 0 or more, not {n}")
        policy = Policy(**value)
        if policy:  # all zeros: no retention, every version stays
            out[where] = policy
    return out


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
        else:
            opts.update(source_options(s["uri"], s.get("credentials"), s.get("ca_bundle"), job.memory, job.cbt,
                                       job.quiesce))
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
            if job.selects(vm.name, vm.tags, vm.folder):
                taken.append((src, vm))
    for v in job.vms:
        if v not in seen:
            problems[v] = f"VM {v} is listed in {job.path} but no source has it (removed or renamed?)"
    names = [vm.name for _, vm in taken]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise JobError(f"{job.path}: two sources have a VM named {sorted(dup)[0]!r}: name them apart")
    return taken, problems


def source_options(uri: str, credentials: str | None, ca_bundle: str | None, memory: bool, cbt: bool,
                   quiesce: bool = False) -> dict:
    """The options a hypervisor source of `uri` takes (xen:, vmware:: credentials, CA bundle, memory, cbt)."""
    if uri.startswith("xen:"):
        return {"credentials": credentials, "ca_bundle": ca_bundle, "memory": memory, "cbt": cbt}
    if uri.startswith("vmware:"):
        return {"credentials": credentials, "ca_bundle": ca_bundle, "cbt": cbt, "quiesce": quiesce}
    return {}


def store_for(job: Job, store: str | None = None, endpoint: str | None = None, profile: str | None = None,
              env_store: str | None = None):
    """The store spec a run of `job` writes to: `store` (--store) first, then the job's own
    store, then `env_store` (the caller's $ALIKE_STORE)."""
    from storage.backend import store_spec
    from storage.errors import InvalidValue

    url = store or job.store or env_store
    if not url:
        raise InvalidValue(f"{job.path}: no store: put store = \"...\" in the job, pass --store or set ALIKE_STORE")
    return store_spec(url, endpoint or job.endpoint, profile or job.profile)


@dataclass
class JobRun:
    """The outcome of one run: `record` is what is stored under jobs/<name>/runs/ (and printed with
    --json); `results` the backup results of each VM (run_backup's, plus those that could not be
    taken); `code` the exit code (0 ok, 1 a VM, the vault or retention failed, 3 damaged data)."""
    record: dict
    results: list[dict]
    code: int


RECORD_KEYS = ("vm", "version", "logical_bytes", "read_bytes", "new_blocks", "stored_bytes", "cbt", "patched_blocks",
               "cbt_notes", "notes", "seconds", "vaulted", "vault_error", "error")


def _quiet(text: str) -> None:
    pass


def run(job: Job, spec, node_id: str | None = None, on_vm=None, say: Callable[[str], None] = _quiet) -> JobRun:
    """Run `job` once into the store `spec`: select its VMs, back them up, vault the new versions
    (vault_to), validate (validate, validate_all), apply retention, and record the run on the
    store (as "running" first, then with its outcome). Ray must be connected. on_vm(vm, phase,
    done, total): backup progress; say(text): a line of progress for a person or a log."""
    from storage.store import Store

    store = Store.open(spec)
    taken, missing = select(job, node_id)
    if not taken and not missing:
        raise JobError(f"{job.path}: the selection matches no VM of its sources")
    run_id = new_run_id()
    t0 = time.time()
    record = {"job": job.name, "run_id": run_id, "file": os.path.abspath(job.path),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "status": "running", "vms": []}
    record_run(store, job.name, run_id, record)
    results = _backup(job, spec, taken, missing, node_id, on_vm)
    if job.vault_to:
        _vault(job, spec, results, node_id)
    code = 0 if all("error" not in r for r in results) else 1
    if job.validate or job.validate_all:
        code = _validate(job, spec, record, node_id, say, code)
    if job.retention:
        code = _apply_retention(job, store, results, record, say, code)
    record.update(status="ok" if code == 0 else "failed",
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  seconds=round(time.time() - t0, 3),
                  vms=[{k: r[k] for k in RECORD_KEYS if k in r} for r in results])
    record_run(store, job.name, run_id, record)
    return JobRun(record=record, results=results, code=code)


def _backup(job: Job, spec, taken, missing: dict, node_id, on_vm) -> list[dict]:
    """Back up the VMs taken; those that could not be taken are failed results of their own."""
    from pipelines.backup import run_backup

    results = run_backup(spec, [(src, vm.name) for src, vm in taken], parallel=job.parallel, full=job.full,
                         node_id=node_id, on_vm=on_vm, cbt=job.cbt)
    return results + [{"vm": m, "error": why} for m, why in missing.items()]


def _vault(job: Job, spec, results: list[dict], node_id) -> None:
    """Vault the versions just made to job.vault_to; marks each result "vaulted" (and
    "vault_error" when the vault failed: the backups stay)."""
    from pipelines.vault import run_vault
    from storage.backend import store_spec

    done = [r for r in results if "error" not in r]
    if not done:
        return
    dst = store_spec(job.vault_to, job.vault_endpoint or job.endpoint, job.vault_profile or job.profile)
    try:
        rep = run_vault(spec, dst, vms=[r["vm"] for r in done], versions=[r["version"] for r in done],
                        node_id=node_id)
        for r in done:
            r["vaulted"] = f"{r['vm']}@{r['version']}" not in rep["versions_skipped"]
    except StoreError as e:
        for r in done:
            r["vaulted"] = False
            r["vault_error"] = e.message


def _validate(job: Job, spec, record: dict, node_id, say, code: int) -> int:
    """Verify the data not validated yet (the new data), or all of it; -> the run's exit code."""
    from pipelines.verify import run_verify

    say("validate: verifying " + ("the store" if job.validate_all else "the new data"))
    try:
        rep = run_verify(spec, on_progress=None, node_id=node_id, new_only=not job.validate_all)
        record["validate"] = {"ok": rep["ok"], "versions": rep.get("versions"), "mode": rep.get("mode"),
                              "packs_checked": rep.get("packs_checked"),
                              "blocks_checked": rep.get("blocks_checked"), "problems": rep.get("problems", []),
                              "damaged": [f"{b['vm']}@{b['version']} disk {b['disk']}" for b in rep.get("broken", [])]}
        return code if rep["ok"] else 3  # damaged data outranks a failed backup (1)
    except Exception as e:  # could not validate: the run fails, the backups stay
        record["validate"] = {"ok": False, "error": getattr(e, "message", None) or f"{type(e).__name__}: {e}"}
        return max(code, 1)


def _apply_retention(job: Job, store, results: list[dict], record: dict, say, code: int) -> int:
    """Prune the job's VMs (also those that failed this time) onsite and offsite as the job
    says; a failed prune is recorded and fails the run, never undoes the backups. -> exit code."""
    from pipelines.prune import prune_store
    from storage.backend import store_spec
    from storage.store import Store

    names = sorted({r["vm"] for r in results})
    record["retention"] = {}
    for where, policy in job.retention.items():
        entry = record["retention"][where] = {"policy": policy.to_dict()}
        if where == "onsite" and "error" not in record.get("validate", {}) and \
                not record.get("validate", {}).get("ok", True):
            entry["skipped"] = "validation found damaged data: older versions may be the intact ones"
        elif where == "offsite" and not job.vault_to:
            entry["skipped"] = "the job has no vault_to store"
        else:
            try:
                if where == "onsite":
                    target = store
                else:
                    target = Store.open(store_spec(job.vault_to, job.vault_endpoint or job.endpoint,
                                                   job.vault_profile or job.profile))
                rep = prune_store(target, policy, names)
                entry.update(store=rep["store"], removed=rep["removed"], kept=rep["kept"])
            except Exception as e:  # reported; the backups stay
                entry["error"] = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                code = max(code, 1)
        say(f"retention {where}: " + retention_text(entry))
    return code


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{int(time.time() * 1000) % 1000:03d}"


def record_run(store, job: str, run_id: str, record: dict) -> None:
    store.put_json(f"jobs/{job}/runs/{run_id}.json", record)


def history(store, job: str | None = None) -> list[dict]:
    out = []
    for key in store.backend.list(f"jobs/{job}/runs/" if job else "jobs/"):
        if "/runs/" in key and key.endswith(".json"):
            try:
                out.append(store.get_json(key))
            except Exception:
                continue
    return sorted(out, key=lambda r: r.get("run_id", ""), reverse=True)


def retention_text(entry: dict) -> str:
    if "error" in entry:
        return f"FAILED: {entry['error']}"
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    # the count kept first and the removed ids after "removed N:", so that no one reads the ids
    # listed as the kept ones
    if not entry["removed"]:
        return f"kept {entry['kept']}, removed none"
    return (f"kept {entry['kept']}, removed {len(entry['removed'])}: {', '.join(entry['removed'])} "
            "(`alike gc` reclaims their space)")


def run_notes(record: dict) -> list[str]:
    """What a job run did after its backups (validation, retention), one line each."""
    lines = []
    val = record.get("validate")
    if val:
        lines.append("validate: " + (f"FAILED: {val['error']}" if "error" in val else
                                     f"ok, {val['blocks_checked']} blocks of {val['versions']} versions" if val["ok"]
                                     else f"DAMAGED: {', '.join(val['damaged'] + val['problems'])}"))
    for where, entry in (record.get("retention") or {}).items():
        lines.append(f"retention {where}: " + retention_text(entry))
    return lines

