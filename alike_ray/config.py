"""Where settings come from: flags first, then the environment (ALIKE_STORE, RAY_ADDRESS)."""
from __future__ import annotations

import os
import re

from storage.errors import InvalidValue

_SIZE = re.compile(r"^(\d+)\s*([kmgKMG]?)(i?[bB])?$")


def store_url(args):
    """The store spec of a command: --store or $ALIKE_STORE, with --endpoint and --profile for
    S3 (else boto3's own: AWS_ENDPOINT_URL, AWS_PROFILE, shared config files)."""
    from storage.backend import store_spec

    url = getattr(args, "store", None) or os.environ.get("ALIKE_STORE")
    if not url:
        raise InvalidValue("no store given: pass --store PATH (or s3://BUCKET/PREFIX) or set ALIKE_STORE")
    return store_spec(url, getattr(args, "endpoint", None), getattr(args, "profile", None))


def absolute_store(spec, base: str | None = None):
    """A local store path made absolute (from `base`, else the working folder); URLs as they are."""
    if not isinstance(spec, str) or not spec or "://" in spec or spec.startswith("s3:"):
        return spec
    return os.path.abspath(os.path.join(base, spec) if base else spec)


def parse_size(text: str) -> int:
    m = _SIZE.match(str(text).strip())
    if not m:
        raise InvalidValue(f"size {text!r} is not understood: write it as 512K, 1M or 65536")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]


def absolute_source(spec: str, base: str | None = None) -> str:
    """`image:` paths made absolute (from `base`, else the working folder); other sources as they are."""
    kind, sep, rest = spec.partition(":")
    if kind != "image" or not sep or not rest:
        return spec
    return "image:" + ",".join(os.path.abspath(os.path.join(base, p) if base else p) for p in rest.split(","))
