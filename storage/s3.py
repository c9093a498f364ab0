"""The S3 backend (an ODS on AWS S3, MinIO, Ceph RGW...), with boto3.

Same contract as the directory backend (storage/backend.py):
- put is atomic by S3's own semantics (an object appears whole or not at all). Objects above
  MULTIPART_THRESHOLD go up as a multipart upload through boto3's transfer manager; every
  upload carries a CRC32 checksum that the server checks, and downloads of whole objects are
  checked against it by botocore.
- read-after-write: S3 (and MinIO) are strongly consistent for new objects and lists.
- get_range is a ranged GET (restore reads blocks that way); the blocks' own BLAKE3 hashes
  check what comes back.
- retries, timeouts and connection pooling are botocore's (standard retry mode).
Keys spread over prefixes by construction (packs/<xx>/, index/<x>/).

Credentials come the way every AWS tool takes them: environment, shared config and
credentials files, `profile`. They are never stored, logged or printed: errors name the
store, never a key.
"""
from __future__ import annotations

import io
import os
import threading
from typing import Iterator

from .backend import Backend
from .errors import ObjectMissing, StoreError

MULTIPART_THRESHOLD = 64 * 1024 * 1024
RETRIES = 5  # botocore's retries of a request after its first try (standard mode, backoff up to 20 s)
BODY_ATTEMPTS = 5  # botocore retries a request, not the reading of its streamed body: we do
_LOADER: list = [None]  # this process's botocore data loader, shared by its sessions (_new_session)
_LOADER_LOCK = threading.Lock()  # one session at a time is made over it (and changes its search paths)


def _new_session(profile: str | None):
    """A boto3 session of its own (credentials resolved afresh: a long-running `alike server` sees
    keys rotated in the environment or the shared files), over this process's one botocore data
    loader. Why: each new session's loader parses the S3 service model and endpoint rules again,
    65-190 ms per store opened here, and a served restore from S3 opens two (0.55 s of its
    1.8 s plan in py-spy); a client of a session over a loaded loader takes ~12 ms."""
    import boto3
    import botocore.exceptions
    import botocore.loaders
    import botocore.session

    with _LOADER_LOCK:
        if _LOADER[0] is None:
            _LOADER[0] = botocore.loaders.create_loader()
        loader = _LOADER[0]
        bc = botocore.session.Session()
        if profile is not None and profile not in bc.available_profiles:
            raise botocore.exceptions.ProfileNotFound(profile=profile)  # as boto3's own Session raises it
        bc.register_component("data_loader", loader)
        session = boto3.session.Session(botocore_session=bc, profile_name=profile)
        paths = loader.search_paths  # boto3 appends its data folder to the loader at each session
        paths[:] = list(dict.fromkeys(paths))
    return session


class S3Error(StoreError):
    """{detail}"""


def _attempts() -> int:
    """Tries of one request: $AWS_MAX_ATTEMPTS (botocore's own setting, total tries) or 1 + RETRIES."""
    v = os.environ.get("AWS_MAX_ATTEMPTS")
    if v is None:
        return 1 + RETRIES
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise S3Error(f"AWS_MAX_ATTEMPTS={v!r} is not a number of tries: set it to 1 or more, or unset it")
    return n


def parse_s3_url(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise S3Error(f"store URL {url!r} has no bucket: write s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


class S3Backend(Backend):
    min_request = 16 << 20

    def __init__(self, url: str, endpoint: str | None = None, profile: str | None = None,
                 max_connections: int = 16, attempts: int | None = None):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self.endpoint = endpoint
        self.profile = profile
        self.max_connections = max_connections
        self.attempts = attempts  # total tries of a request (None: $AWS_MAX_ATTEMPTS or 1 + RETRIES)
        self._client = None
        self._session = None
        self._hasty = None

    def __getstate__(self):
        s = dict(self.__dict__)
        s["_client"] = None  # a client holds credentials and sockets: each process makes its own
        s["_session"] = s["_hasty"] = None
        return s

    def hasty(self) -> "S3Backend":
        """Two tries, the second within a second, and short timeouts (see Backend.hasty)."""
        if self._hasty is None:
            h = S3Backend(self.url, self.endpoint, self.profile, max_connections=2, attempts=2)
            h._session = self._get_session()  # one session for both clients (its credentials resolved once)
            self._hasty = h
        return self._hasty

    def _get_session(self):
        if self._session is None:
            try:
                self._session = _new_session(self.profile)
            except Exception as e:  # ProfileNotFound...
                raise S3Error(f"cannot use AWS profile {self.profile!r} for {self.url}: {type(e).__name__}") from None
        return self._session

    @property
    def client(self):
        if self._client is None:
            from botocore.config import Config

            session = self._get_session()
            quick = self.attempts is not None
            retries = {"mode": "standard", "total_max_attempts": self.attempts if quick else _attempts()}
            cfg = Config(retries=retries, max_pool_connections=self.max_connections,
                         connect_timeout=3 if quick else 10, read_timeout=10 if quick else 60,
                         request_checksum_calculation="when_supported",
                         response_checksum_validation="when_supported")
            self._client = session.client("s3", endpoint_url=self.endpoint, config=cfg)
        return self._client

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _err(self, e, key: str, op: str):
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"{self.url}" + (f" (endpoint {self.endpoint})" if self.endpoint else "")
        if isinstance(e, StoreError):
            return e
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket"):
                return ObjectMissing(key)
            if code == "NoSuchBucket":
                return S3Error(f"bucket {self.bucket!r} does not exist at {where}: create it or check the store URL")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                        "ExpiredToken") or status == 403:
                return S3Error(f"access to {where} was refused ({code or status}): check the credentials "
                               "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, --profile) and the bucket policy")
            return S3Error(f"S3 {op} of {key} on {where} failed: {code or status}")
        if isinstance(e, NoCredentialsError):
            return S3Error(f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "a shared credentials file, or --profile")
        if isinstance(e, EndpointConnectionError) or type(e).__name__ in ("ConnectTimeoutError", "ReadTimeoutError",
                                                                         "ConnectionClosedError"):
            return S3Error(f"cannot reach {where}: check --endpoint and the network (retried, still failing)")
        return S3Error(f"S3 {op} of {key} on {where} failed: {type(e).__name__}")

    def _get_body(self, **kw) -> bytes:
        """GET an object (or range) and read its body, again if the body is cut off in transit
        (a dropped connection, a read timeout, a checksum that does not match)."""
        import random
        import time

        from botocore.exceptions import (FlexibleChecksumError, IncompleteReadError, ReadTimeoutError,
                                         ResponseStreamingError)

        for attempt in range(BODY_ATTEMPTS):
            r = self.client.get_object(**kw)
            try:
                return r["Body"].read()
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, FlexibleChecksumError):
                r["Body"].close()
                if attempt == BODY_ATTEMPTS - 1:
                    raise
                time.sleep(random.random() * min(4.0, 0.25 * 2 ** attempt))

    def put(self, key: str, data) -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            if len(data) >= MULTIPART_THRESHOLD:
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, self._k(key),
                    ExtraArgs={"ChecksumAlgorithm": "CRC32"},
                    Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 << 20,
                                          max_concurrency=4))
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=bytes(data),
                                       ChecksumAlgorithm="CRC32")
        except Exception as e:
            raise self._err(e, key, "put") from None

    def get(self, key: str) -> bytes:
        try:
            return self._get_body(Bucket=self.bucket, Key=self._k(key), ChecksumMode="ENABLED")
        except Exception as e:
            raise self._err(e, key, "get") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            data = self._get_body(Bucket=self.bucket, Key=self._k(key),
                                  Range=f"bytes={offset}-{offset + length - 1}")
        except Exception as e:
            err = self._err(e, key, "ranged get")
            if "InvalidRange" in str(getattr(e, "response", "")):
                err = ObjectMissing(f"{key} (truncated: wanted {length} bytes at {offset})")
            raise err from None
        if len(data) != length:
            raise ObjectMissing(f"{key} (truncated: wanted {length} bytes at {offset})")
        return data

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except Exception as e:
            err = self._err(e, key, "head")
            if isinstance(err, ObjectMissing):
                return False
            raise err from None

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"])
        except Exception as e:
            raise self._err(e, key, "head") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(obj["Key"][len(self.prefix):])
        except Exception as e:
            raise self._err(e, prefix, "list") from None
        return iter(sorted(out))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Sizes of every object under prefix, from the listing (one request per 1000 keys)."""
        out = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self._k(prefix)):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(self.prefix):]] = int(obj["Size"])
        except Exception as e:
            raise self._err(e, prefix, "list") from None
        return out

    def stat_all(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        out = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self._k(prefix)):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(self.prefix):]] = (int(obj["Size"]), obj["LastModified"].timestamp())
        except Exception as e:
            raise self._err(e, prefix, "list") from None
        return out

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as e:
            err = self._err(e, key, "delete")
            if not isinstance(err, ObjectMissing):
                raise err from None

    def check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            from botocore.exceptions import ClientError

            if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise S3Error(f"bucket {self.bucket!r} does not exist at {self.url}"
                              + (f" (endpoint {self.endpoint})" if self.endpoint else "")
                              + ": create it or check the store URL") from None
            raise self._err(e, "", "head bucket") from None
