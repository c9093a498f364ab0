"""`alike init`: create a store."""
from __future__ import annotations

from ..ui import _emit, _h


def cmd_init(args) -> int:
    from storage.store import Store

    from ..config import parse_size, store_url

    st = Store.init(store_url(args), parse_size(args.block_size), args.zstd_level)
    _emit(args, {"store": st.url, "store_id": st.config["store_id"], "block_size": st.block_size},
          f"created store {st.url} (block size {_h(st.block_size)}, zstd level {args.zstd_level})")
    return 0


def register(add, sub) -> None:
    sp = add("init", cmd_init, "create a store")
    sp.add_argument("--block-size", default="512K", help="block size, a power of two from 64K to 4M (default 512K)")
    sp.add_argument("--zstd-level", type=int, default=3, help="zstd compression level, 1-19 (default 3)")
