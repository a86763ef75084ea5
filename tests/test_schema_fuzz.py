"""schemathesis against the live server's own OpenAPI document: every endpoint,
positive and negative modes, a fixed seed. No 5xx, and no mismatch between what
the document says and what the server does (statuses, content types, bodies,
schema-valid requests accepted, schema-violating ones refused).

``make test`` runs a bounded pass; ``SEGCACHE_LONG_TESTS=1`` runs the long one
(at least 1,000 requests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segcache.config import CacheConfig, ServerConfig, read_environment
from tests.server_harness import running_server

ROOT = Path(__file__).resolve().parents[1]
LONG = read_environment().long_tests  # SEGCACHE_LONG_TESTS=1
EXAMPLES = 150 if LONG else 25  # per operation and phase
SEED = 20261201


def _st() -> str:
    return shutil.which("st") or str(Path(sys.executable).parent / "st")


# With API keys configured too in the long mode.
@pytest.mark.parametrize("keys", [False, True] if LONG else [False])
def test_schemathesis_finds_no_server_error_and_no_mismatch(tiny_engine_factory, capsys, tmp_path,
                                                             keys):
    engine = tiny_engine_factory()
    cfg = ServerConfig()
    auth: list[str] = []
    if keys:  # every /v1 route as a tenant; /metrics answers that tenant 403, as documented
        path = tmp_path / "keys.json"
        path.write_text('{"keys": {"sk-fuzz": "fuzz"}, "admin_keys": ["sk-ops"]}')
        cfg, auth = ServerConfig(api_keys_file=path), ["-H", "Authorization: Bearer sk-fuzz"]
    with running_server(engine, cfg, CacheConfig()) as url:
        cmd = [_st(), "run", url + "/openapi.json", *auth, "--checks", "all",
               # replaced by the hook's check: all but context-window refusals (see there)
               "--exclude-checks", "positive_data_acceptance",
               "--mode", "all", "-n", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--no-shrink", "--request-timeout", "120",
               "--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.fuzz.schemathesis_hooks"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500,
                             cwd=tmp_path)  # its cache folder goes there
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    generated = int(re.search(r"(\d+) generated", out).group(1))
    assert generated >= (1000 if LONG else 200)
    with capsys.disabled():
        print(f"\nschemathesis{' (API keys)' if keys else ''}: {generated} requests, "
              f"seed {SEED}, 0 failures")
