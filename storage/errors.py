"""Errors of the store. Each class's docstring is the message shown to the user; the CLI prints
it on one line, with no traceback, and exits non-zero."""


class StoreError(Exception):
    """{detail}"""

    exit_code = 2

    def __init__(self, detail: str = "", **kw):
        self.detail = detail
        self.kw = kw
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return (self.__doc__ or "{detail}").strip().format(detail=self.detail, **self.kw)


class NotAStore(StoreError):
    """{detail} is not an alike store (no config.json): create one with `alike init --store {detail}` or check the path."""


class StoreExists(StoreError):
    """{detail} already holds a store: choose another path, or use it as it is."""


class BadConfig(StoreError):
    """The store's config.json is damaged or of an unknown format ({detail}): nothing was changed."""


class InvalidValue(StoreError):
    """{detail}"""


class ObjectMissing(StoreError):
    """Object {detail} is missing from the store: run `alike verify` to see which versions this breaks."""


class DamagedData(StoreError):
    """Damaged data in the store: {detail}. Nothing was written from it; run `alike verify` to list every damaged version and disk."""

    exit_code = 3


class StoreFull(StoreError):
    """No space left on {detail}: free space (`alike gc --grace 0` removes what failed backups wrote) or use another store. Nothing partial was committed."""

    exit_code = 4


class RestoreTargetFull(StoreError):
    """No space left for the restore on {detail}: free space there or restore elsewhere (nothing of this restore was left there; the store is unchanged)."""

    exit_code = 4


class UnknownVersion(StoreError):
    """{detail}"""
