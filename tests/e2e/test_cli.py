"""The command line itself: options anywhere, usage errors that name the sub-command, --version,
and bad arguments refused before Ray starts.

"Before Ray starts" is shown without timing anything: those commands run with RAY_ADDRESS at a
port where nothing listens, so a command that got as far as joining Ray would fail with "cannot
reach the Ray cluster" instead of the message about the argument; and stderr holds nothing but
that one line (no Ray output). Most tests here need no Ray at all."""
from __future__ import annotations

import os

import pytest

from tests.conftest import CLI

NO_RAY = "127.0.0.1:1"  # nothing listens there: joining Ray would fail, and say so


@pytest.fixture
def cli(tmp_path):
    """The CLI, with Ray out of reach."""
    return CLI(NO_RAY, tmp_path)


def only_error(p, code: int, words: str) -> str:
    """The command failed with `code` and printed exactly one line, an `alike: error:` holding `words`."""
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("alike: error: "), p.stderr
    assert words in lines[0], p.stderr
    assert "Ray cluster" not in lines[0]
    return lines[0]


# -- --version ------------------------------------------------------------------------------
def test_version(cli):
    from importlib.metadata import version

    p = cli("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"alike {version('alike-ray')}"


# -- --help of every command ----------------------------------------------------------------
def _commands(parser, path=()):
    """Every command path of the parser: (), ("backup",), ("job", "run")..."""
    import argparse

    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def test_a_command_line_gets_the_parser_of_its_command_only(capsys):
    """build_parser(argv) registers only the module of argv's command when it has one of its own:
    the same help and the same parsed arguments as the whole parser, without the other modules'
    parsers; `alike`, a misspelt command and pin (a command of prune.py) get every command."""
    import argparse

    from alike_ray.cli import build_parser
    from alike_ray.commands import _modules

    def tops(parser):
        return {n for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices}

    everything = tops(build_parser())
    assert len(everything) > 15
    for name in _modules():
        lazy = build_parser([name])
        assert name in tops(lazy) and len(tops(lazy)) < len(everything) - 10, name
        for path in _commands(lazy):
            if not path:
                continue
            texts = []
            for parser in (lazy, build_parser()):
                with pytest.raises(SystemExit):
                    parser.parse_args([*path, "--help"])
                texts.append(capsys.readouterr().out)
            assert texts[0] == texts[1], path
    line = ["backup", "--store", "ads", "image:a.raw", "--name", "web", "--json", "--parallel", "2"]
    assert vars(build_parser(line).parse_args(line)) == vars(build_parser().parse_args(line))
    for argv in ([], ["--help"], ["bakup"], ["pin"], ["-h", "backup"]):
        assert tops(build_parser(argv)) == everything, argv
    with pytest.raises(SystemExit):
        build_parser(["bakup"]).parse_args(["bakup"])
    assert "invalid choice: 'bakup'" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    """--help of each command (options parsed intermixed: a metavar such as P% must survive)."""
    from alike_ray.cli import build_parser

    paths = list(_commands(build_parser()))
    assert ("verify",) in paths and ("job", "run") in paths and ("server", "status") in paths
    for path in paths:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*path, "--help"])
        assert e.value.code == 0, path
        text = capsys.readouterr().out
        assert text.startswith(f"usage: {' '.join(('alike',) + path)}"), (path, text[:200])
        if path and path[0] not in ("job", "server") or len(path) > 1:
            assert "--json" in text, path  # every command has --json for scripts


# -- usage errors ---------------------------------------------------------------------------
USAGE = [
    # (argv, the sub-command's usage line starts with, words of the error)
    (["backup", "image:x", "--bogus"], "usage: alike backup ", "unrecognized arguments: --bogus"),
    (["restore", "web", "--to", "x", "--frobnicate", "1"], "usage: alike restore ",
     "unrecognized arguments: --frobnicate 1"),
    (["job", "run", "j.toml", "--bogus"], "usage: alike job run ", "unrecognized arguments: --bogus"),
    (["gc", "--bogus"], "usage: alike gc ", "unrecognized arguments: --bogus"),
    (["files", "web", "ls", "--bogus"], "usage: alike files ", "unrecognized arguments: --bogus"),
    (["server", "status", "--bogus"], "usage: alike server status ", "unrecognized arguments: --bogus"),
    (["restore", "web"], "usage: alike restore ", "required: --to"),
    (["files", "web", "list"], "usage: alike files ", "invalid choice: 'list'"),
]


@pytest.mark.parametrize("argv,usage,words", USAGE, ids=[" ".join(u[0]) for u in USAGE])
def test_usage_error_names_the_subcommand(cli, argv, usage, words):
    p = cli(*argv)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith(usage), p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("alike: error: ")]
    assert len(errors) == 1 and words in errors[0], p.stderr
    assert p.stderr.splitlines()[-1] == errors[0]
    assert f"`alike {usage.split()[2]}" in errors[0]  # points at that command's --help


def test_unknown_command_prints_top_usage(cli):
    p = cli("bogus")
    assert p.returncode == 2
    assert p.stderr.startswith("usage: alike [-h] [--version] COMMAND")
    assert p.stderr.splitlines()[-1].startswith("alike: error: argument COMMAND: invalid choice: 'bogus'")


# -- options after positional arguments -----------------------------------------------------
SAME = [
    # argv with the options first, and the same with them after (or between) the positionals
    (["files", "--store", "S", "office", "ls", "--partition", "2", "/Projects/Q4 Report"],
     ["files", "office", "ls", "/Projects/Q4 Report", "--store", "S", "--partition", "2"]),
    (["files", "--to", "D", "--disk", "1", "pc", "get", "/a", "/b"],
     ["files", "pc", "get", "/a", "--to", "D", "/b", "--disk", "1"]),
    (["backup", "--store", "S", "--vm", "web", "--parallel", "3", "kvm:qemu:///system", "image:/x.raw"],
     ["backup", "kvm:qemu:///system", "--vm", "web", "image:/x.raw", "--store", "S", "--parallel", "3"]),
    (["restore", "--store", "S", "--to", "x.raw", "--disk", "0", "web@2026"],
     ["restore", "web@2026", "--to", "x.raw", "--store", "S", "--disk", "0"]),
    (["job", "run", "--store", "S", "--json", "nightly.toml"], ["job", "run", "nightly.toml", "--json", "--store", "S"]),
    (["pin", "--note", "audit", "--store", "S", "web@1"], ["pin", "web@1", "--note", "audit", "--store", "S"]),
    (["inventory", "--json", "image:/x.raw"], ["inventory", "image:/x.raw", "--json"]),
    (["instant", "--memory", "64", "web"], ["instant", "web", "--memory", "64"]),
]


@pytest.mark.parametrize("first,after", SAME, ids=[s[0][0] for s in SAME])
def test_options_after_positionals(first, after):
    from alike_ray.cli import build_parser

    a, b = vars(build_parser().parse_args(first)), vars(build_parser().parse_args(after))
    assert a == b


def test_files_options_after_path_end_to_end(cli, ray_address, tmp_path, corpus):
    """The issue's own command, on a real backup: `--partition N` then a PATH after it."""
    alike = CLI(ray_address, tmp_path)
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    parts = alike.json("files", "--store", store, "web", "parts")["disks"][0]["partitions"]
    number = next(p["number"] for p in parts if p["filesystem"])
    top = alike.json("files", "--store", store, "web", "ls", "--partition", number, "/")
    names = {e["name"] for e in top["entries"]}
    sub = next(e["name"] for e in top["entries"] if e["kind"] == "dir" and e["name"] != "lost+found")
    p = alike("files", "--store", store, "web", "ls", "--partition", number, f"/{sub}", "--json")
    assert p.returncode == 0, p.stderr
    assert names and p.stdout.startswith("{") and f'"path": "/{sub}"' in p.stdout


# -- bad arguments found before Ray ---------------------------------------------------------
@pytest.fixture
def bad(tmp_path, cli):
    """A store (made without Ray), an image, a folder, a FIFO, an image whose name is no VM name."""
    store = tmp_path / "ads"
    cli.json("init", "--store", store)
    (tmp_path / "web.raw").write_bytes(b"\0" * 65536)
    (tmp_path / "plain").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "my disk.raw").write_bytes(b"\0" * 65536)
    return tmp_path


FAST = [
    # (id, argv with {d} the fixture's folder, exit code, words the one error line must hold)
    ("missing image", ["backup", "--store", "{d}/ads", "image:{d}/nope.raw"], 2, "does not exist"),
    ("image is a folder", ["backup", "--store", "{d}/ads", "image:{d}/plain"], 2, "is a folder"),
    ("image is a fifo", ["backup", "--store", "{d}/ads", "image:{d}/fifo"], 2, "not a file or a block device"),
    ("second image missing", ["backup", "--store", "{d}/ads", "image:{d}/web.raw,{d}/nope.raw"], 2,
     "nope.raw does not exist"),
    ("path without image:", ["backup", "--store", "{d}/ads", "{d}/web.raw"], 2, "write image:"),
    ("unknown source kind", ["backup", "--store", "{d}/ads", "vhdx:{d}/web.raw"], 2, "not supported"),
    ("bad --name", ["backup", "--store", "{d}/ads", "image:{d}/web.raw", "--name", "a/b"], 2, "not allowed"),
    ("image name no VM name", ["backup", "--store", "{d}/ads", "image:{d}/my disk.raw"], 2, "'my disk' is not allowed"),
    ("--parallel 0", ["backup", "--store", "{d}/ads", "image:{d}/web.raw", "--parallel", "0"], 2, "--parallel 0"),
    ("bad --vault-to", ["backup", "--store", "{d}/ads", "image:{d}/web.raw", "--vault-to", "ftp://x/y"], 2,
     "not supported"),
    ("missing store", ["backup", "--store", "{d}/nostore", "image:{d}/web.raw"], 2, "does not exist"),
    ("two sources one name", ["backup", "--store", "{d}/ads", "image:{d}/web.raw", "image:{d}/web.raw"], 2,
     "distinct name"),
    ("inventory without kind", ["inventory", "{d}/web.raw"], 2, "write image:"),
    ("vault unknown vm", ["vault", "--store", "{d}/ads", "--to", "{d}/ods", "--vm", "ghost"], 2, "no VM named 'ghost'"),
    ("vault bad target", ["vault", "--store", "{d}/ads", "--to", "s3://"], 2, "no bucket"),
    ("repair from no store", ["repair", "--store", "{d}/ads", "--from", "{d}/plain"], 2, "not an alike store"),
    ("verify bad sample", ["verify", "--store", "{d}/ads", "--sample", "500%"], 2, "500%"),
]


@pytest.mark.parametrize("case", FAST, ids=[c[0] for c in FAST])
def test_bad_arguments_before_ray(cli, bad, case):
    _, argv, code, words = case
    p = cli(*[a.format(d=bad) for a in argv])
    only_error(p, code, words)
    assert not (bad / "ods").exists()  # nothing was made


def test_job_with_bad_vault_store_refused_when_read(cli, bad):
    job = bad / "j.toml"
    job.write_text(f'name = "j"\nstore = "{bad}/ads"\nsources = ["image:{bad}/web.raw"]\n'
                   '[options]\nvault_to = "ftp://host/x"\n')
    only_error(cli("job", "run", job), 2, "vault_to 'ftp://host/x'")
    assert cli.json("job", "history", "--store", bad / "ads")["runs"] == []  # no run was started


@pytest.fixture(scope="module")
def backed_up(ray_address, tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("cli")
    alike = CLI(ray_address, d)
    alike.json("init", "--store", d / "ads")
    alike.json("backup", "--store", d / "ads", f"image:{corpus['web']}", "--name", "web")
    (d / "plain").mkdir()
    (d / "ro").mkdir(mode=0o500)
    return d


RESTORE = [
    ("target is a folder", ["--to", "{d}/plain"], "is a folder"),
    ("target is a folder, --force", ["--to", "{d}/plain", "--force"], "is a folder"),
    ("target folder missing", ["--to", "{d}/no/such/x.raw"], "does not exist"),
    ("bad disk", ["--to", "{d}/x.raw", "--disk", "7"], "no disk '7'"),
]


@pytest.mark.parametrize("case", RESTORE, ids=[c[0] for c in RESTORE])
def test_restore_target_checked_before_ray(cli, backed_up, case):
    _, extra, words = case
    p = cli("restore", "--store", backed_up / "ads", "web", *[a.format(d=backed_up) for a in extra])
    only_error(p, 2, words)
    assert sorted(os.listdir(backed_up / "plain")) == []


def test_restore_into_read_only_folder_before_ray(cli, backed_up):
    if os.geteuid() == 0:
        pytest.skip("not applicable: root may write into a read-only folder (a read-only filesystem is tested as root in test_first_user)")
    p = cli("restore", "--store", backed_up / "ads", "web", "--to", backed_up / "ro" / "x.raw")
    only_error(p, 2, "permission denied")
