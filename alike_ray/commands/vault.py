"""`alike vault`: copy versions to another store (pipelines/vault.py)."""
from __future__ import annotations

import sys
import time

from storage.errors import StoreError

from . import Served, _checks, absolute_args, add_server_options
from ..ui import Progress, _connect, _emit, _h, took, with_times


def _vault(args, src_spec, vms=None, versions=None) -> dict:
    from pipelines.cluster import local_node_id
    from pipelines.vault import run_vault
    from storage.backend import store_spec

    dst = store_spec(args.to, args.to_endpoint or args.endpoint, args.to_profile or args.profile)
    bar = Progress("vault")
    t0 = time.monotonic()
    try:
        rep = run_vault(src_spec, dst, vms=vms, versions=versions, on_progress=bar, node_id=local_node_id())
    finally:
        bar.close()
    rep["seconds"] = round(time.monotonic() - t0, 3)
    return rep


def cmd_vault(args) -> int:
    from storage.store import Store

    from ..config import store_url

    url = store_url(args)
    st = Store.open(url)
    # before Ray starts: the target's form, and the VMs asked for
    _checks.store_target(args.to, args.to_endpoint or args.endpoint, args.to_profile or args.profile)
    unknown = sorted(set(args.vm or ()) - set(st.list_vms()))
    if unknown:
        raise StoreError(f"no VM named {unknown[0]!r} in {st.url} (VMs there: {', '.join(st.list_vms()) or 'none'})")
    _connect(args)
    rep = _vault(args, url, vms=args.vm, versions=args.version)
    rate = rep["bytes_copied"] / rep["seconds"] if rep["seconds"] else 0
    _emit(args, with_times(args, rep), f"vaulted {rep['versions_copied']} version(s) to {rep['target']} "
                                       f"({rep['versions_present']} already there): {rep['blocks_copied']} blocks, "
                                       f"{_h(rep['bytes_copied'])} copied {took(args, f'{_h(rate)}/s')}")
    if rep["versions_skipped"]:
        print(f"alike: error: {len(rep['versions_skipped'])} version(s) not vaulted, their blocks are damaged "
              f"in the source: {', '.join(rep['versions_skipped'])} (run `alike verify`)", file=sys.stderr)
        return 3
    return 0


def register(add, sub) -> None:
    sp = add("vault", cmd_vault, "copy versions to another store (ADS -> ODS, or back)",
             "Copy versions from --store to --to, only the blocks the target lacks. The target is created "
             "(with the source's hash key) when it does not exist. Resumable: run it again after an interruption. "
             "--endpoint/--profile apply to --store and, unless --to-endpoint/--to-profile are given, to --to.")
    sp.add_argument("--to", required=True, metavar="STORE", help="target store: a folder or s3://BUCKET/PREFIX")
    sp.add_argument("--to-endpoint", help="S3 endpoint of the target (default: --endpoint)")
    sp.add_argument("--to-profile", help="AWS profile of the target (default: --profile)")
    sp.add_argument("--vm", action="append", help="only this VM (repeatable; default: all)")
    sp.add_argument("--version", action="append", help="only this version id or prefix (repeatable)")
    sp.add_argument("--address", help="Ray cluster to join")
    add_server_options(sp, "vault")


def _client_args(d: dict) -> None:
    absolute_args(d, stores=("store", "to"))


SERVED = {"vault": Served(cmd_vault, _client_args)}
