"""Credentials of a hypervisor source (xen:, vmware:): never on the command line. A TOML file
(`username`, `password`) refused unless its mode is 0600 or stricter, else the environment
(ALIKE_<KIND>_USERNAME / ALIKE_<KIND>_PASSWORD). And how the server is trusted: TLS verified
against the system's CAs or a CA bundle (https_context)."""
from __future__ import annotations

import os
import ssl
import stat

from .base import SourceError


class AuthError(SourceError):
    """Wrong credentials, or a credentials file that may not be used: bad input."""

    exit_code = 2


def load_credentials(path: str | None, kind: str = "XEN") -> tuple[str, str]:
    """-> (username, password) from a TOML file of mode 0600 (or stricter), else from
    ALIKE_<kind>_USERNAME / ALIKE_<kind>_PASSWORD."""
    if path:
        try:
            st = os.stat(path)
        except OSError as e:
            raise AuthError(f"credentials file {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise AuthError(f"credentials file {path} is not a file")
        if st.st_mode & 0o077:
            raise AuthError(f"credentials file {path} may be read by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                           f"chmod 600 {path}")
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise AuthError(f"credentials file {path} cannot be read: {e}") from None
        user, pw = data.get("username"), data.get("password")
        if not isinstance(user, str) or not user or not isinstance(pw, str):
            raise AuthError(f"credentials file {path} must hold username = \"...\" and password = \"...\"")
        return user, pw
    user, pw = os.environ.get(f"ALIKE_{kind}_USERNAME"), os.environ.get(f"ALIKE_{kind}_PASSWORD")
    if not user or pw is None:
        raise AuthError(f"no credentials: pass --credentials FILE (TOML with username and password, mode 0600) "
                       f"or set ALIKE_{kind}_USERNAME and ALIKE_{kind}_PASSWORD")
    return user, pw


def https_context(ca_bundle: str | None) -> ssl.SSLContext:
    """TLS verified against the system's CAs, or `ca_bundle`: CA certificates, or the server's own
    certificate (XenServer and ESXi hosts come with self-signed ones: pinned as they are)."""
    ctx = ssl.create_default_context(cafile=ca_bundle)
    if ca_bundle:
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx
