"""The `alike` command.

Exit codes: 0 success; 1 failure of a run (a VM's backup failed); 2 bad input (usage, store,
VM, version, target); 3 damaged data found (verify) or refused (restore); 4 no space left;
5 a source cannot be read; 130 interrupted.

The commands themselves live in alike_ray/commands/ (one module each); this module is the entry
point: the parser with the options every command shares, and the error handling.
"""
from __future__ import annotations

import argparse
import sys
import time

from storage.errors import StoreError

from .ui import EPILOG, _guard_stdout, out


# -- parser ---------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse, with options allowed after positional arguments everywhere
    (`alike files VM ls --partition 2 PATH`: plain argparse refuses the PATH after an option once
    it has filled `PATH...` with nothing), and usage errors that name the sub-command: its usage,
    then one `alike: error:` line. Sub-command parsers are made of this class too (argparse's
    add_subparsers uses the parent's class)."""

    _plain = False  # set while parse_known_intermixed_args calls parse_known_args itself

    def parse_known_args(self, args=None, namespace=None):
        if self._plain:
            return super().parse_known_args(args, namespace)
        if any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            # a parser of sub-commands (alike, alike job...): argparse cannot intermix those
            namespace, extras = super().parse_known_args(args, namespace)
        else:
            self._plain, usage = True, self.usage
            if usage is None:  # what parse_known_intermixed_args would set, with metavars' % kept (P%)
                self.usage = self.format_usage()[len("usage: "):].replace("%", "%%")
            try:
                namespace, extras = self.parse_known_intermixed_args(args, namespace)
            finally:
                self._plain, self.usage = False, usage
        if extras:  # no parser above takes options after a command's: refuse them here, with its usage
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"alike: error: {message} (see `{self.prog} --help`)\n")


class _Version(argparse.Action):
    """--version: read from the installed package's metadata only when asked (keeps --help fast)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        out(f"alike {package_version()}")
        parser.exit(0)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alike-ray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return f"{__version__} (not installed)"


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser of `alike`. Given the command line `argv`, one whose command has a module of its
    own in alike_ray/commands/ (`alike backup ...`) gets a parser with only that command's module
    registered: parsing is the same (a sub-command parser never looks at the others), and the
    other commands' parsers (26 ms on this machine, more than a served command's own work before
    its first read) are not made. `alike`, `alike --help`, a misspelt command and the commands of
    a module with another name (pin, pins, unpin) get them all."""
    p = Parser(prog="alike", description="Deduplicating VM backup on Ray.", epilog=EPILOG)
    p.add_argument("--version", action=_Version, help="print alike's version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, fn, help_, desc=None):
        sp = sub.add_parser(name, help=help_, description=desc or help_, epilog=EPILOG)
        sp.add_argument("--store", help="store: a folder, or s3://BUCKET/PREFIX (default: $ALIKE_STORE)")
        sp.add_argument("--endpoint", help="S3 endpoint URL for MinIO, Ceph RGW... (default: boto3's, e.g. "
                                           "$AWS_ENDPOINT_URL; AWS S3 when unset)")
        sp.add_argument("--profile", help="AWS profile for S3 credentials (default: boto3's usual chain)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.set_defaults(fn=fn)
        return sp

    from .commands import register_all

    register_all(add, sub, only=argv[0] if argv and not argv[0].startswith("-") else None)
    return p


def _warnings_as_lines() -> None:
    """What alike's own modules log as warnings (alike.kvm, alike.xen...) reaches the terminal as
    `alike: warning:` lines, as the commands' own warnings do; nothing else of Python's logging."""
    import logging

    lg = logging.getLogger("alike")
    if not any(getattr(h, "_alike", False) for h in lg.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("alike: warning: %(message)s"))
        h.setLevel(logging.WARNING)
        h._alike = True
        lg.addHandler(h)
        lg.propagate = False


def main(argv=None) -> int:
    started = time.time()
    if argv is None:  # the `alike` program: the user has waited since the process started
        from .server import process_started

        started = process_started()
    _warnings_as_lines()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    args.started_at = started
    command = " ".join(filter(None, (args.command, getattr(args, "job_command", None))))
    if hasattr(args, "no_server"):  # a command `alike server` runs (commands/__init__.py, SERVED)
        from .server import route  # no Ray, no numpy in this process when a server runs it

        try:
            code = route(args, command)
        except StoreError as e:
            print(f"alike: error: {e.message}", file=sys.stderr)
            return int(e.exit_code)
        except KeyboardInterrupt:  # while a server was being started for it: that one goes on
            print("alike: interrupted", file=sys.stderr)
            return 130
        if code is not None:
            return code
    _guard_stdout()
    return run_args(args)


def entry() -> None:
    """The `alike` program: main(), then leave Ray before the interpreter exits. (main() itself
    leaves Ray as it is: callers in a process of their own, the tests among them, keep theirs.)"""
    code = main()
    _stop_ray()
    sys.exit(code)


def _stop_ray() -> None:
    """Leave Ray now, Ctrl-C ignored: the command has ended and said so, and a Ctrl-C during
    Ray's own exit handler (which stops a local instance's processes) would only print its
    traceback ("Exception ignored in atexit callback ... KeyboardInterrupt") after our line."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    except Exception:  # nothing of ours is left to lose; the exit code is already decided
        pass


def run_args(args) -> int:
    """Run a parsed command; expected errors become one `alike: error:` line and an exit code
    (also in `alike server`, which runs commands for clients)."""
    from .sources import SourceError

    try:
        return args.fn(args)
    except (StoreError, SourceError) as e:
        msg = getattr(e, "message", None) or str(e)
        print(f"alike: error: {msg}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        out("alike: interrupted; nothing partial was committed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    entry()
