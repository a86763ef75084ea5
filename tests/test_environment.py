"""The environment is read in one place (``config.read_environment``), whose
variables ``segcache --help`` lists; nothing else in the package or the tests
reads an environment variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from segcache.cli import main
from segcache.config import ENVIRONMENT, ModelConfig, read_environment

ROOT = Path(__file__).resolve().parent.parent
# Reading a variable; copying the environment for a subprocess (``dict(os.environ, ...)``) is not.
READS = re.compile(r"os\.environ\s*(\.get|\[)|getenv\(|os\.environ\.(setdefault|pop)")


def test_cache_dir_precedence():
    home = Path.home()
    assert read_environment({}).cache_dir == home / ".cache" / "segcache"
    assert read_environment({"XDG_CACHE_HOME": "/x"}).cache_dir == Path("/x/segcache")
    both = {"XDG_CACHE_HOME": "/x", "SEGCACHE_CACHE_DIR": "/c"}
    assert read_environment(both).cache_dir == Path("/c")
    assert read_environment({"SEGCACHE_CACHE_DIR": "", "XDG_CACHE_HOME": ""}).cache_dir == read_environment({}).cache_dir


def test_api_keys_and_ci():
    assert read_environment({}).api_keys_file is None
    assert read_environment({"SEGCACHE_API_KEYS": "/k.json"}).api_keys_file == Path("/k.json")
    assert [read_environment({"CI": v}).ci for v in ("", "0", "false", "true", "1")] == [
        False, False, False, True, True]


def test_config_and_cli_defaults_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGCACHE_CACHE_DIR", str(tmp_path))
    assert ModelConfig().cache_dir == tmp_path
    from segcache.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.cache_dir == tmp_path and args.api_keys_file is None


def test_help_lists_every_variable(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ENVIRONMENT:
        assert name in out
    assert "read_environment" in out


def test_nothing_else_reads_the_environment():
    files = [*sorted((ROOT / "segcache").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    allowed = {ROOT / "segcache" / "config.py", Path(__file__).resolve()}  # (this file's samples)
    readers = [str(f.relative_to(ROOT)) for f in files if f not in allowed and READS.search(f.read_text())]
    assert readers == []


def test_the_scan_sees_a_reader():
    assert READS.search('x = os.environ.get("HOME")') and READS.search("os.getenv('A')")
    assert READS.search('os.environ["A"]') and not READS.search("dict(os.environ, A='1')")
