"""The command line: help text and a real smoke run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from segcache.cli import _size, build_parser


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("serve", "generate", "bench", "prepare"):
        assert cmd in out


def test_serve_help_explains_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--port", "--model", "--dtype", "--cache-bytes", "--api-keys", "SEGCACHE_API_KEYS"):
        assert flag in out


def test_sizes_parse():
    assert _size("2GiB") == 2 << 30
    assert _size("512MiB") == 512 << 20
    assert _size("1000") == 1000


def test_scheduler_flags_reach_the_config_and_bad_values_name_the_flag(capsys):
    from segcache.cli import _config

    args = build_parser().parse_args(["serve", "--decode-pause-ms", "250", "--prefill-chunk", "128"])
    sched = _config(args).scheduler
    assert sched.decode_pause_s == 0.25 and sched.prefill_chunk == 128
    for flag, value in (("--decode-pause-ms", "0"), ("--decode-pause-ms", "-5"), ("--request-timeout", "x")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, value])
        assert flag in capsys.readouterr().err


def test_bench_engine_prefills_in_the_servers_chunks_by_default(capsys):
    from segcache.config import SchedulerConfig

    args = build_parser().parse_args(["bench", "engine"])
    assert args.prefill_chunk == SchedulerConfig().prefill_chunk
    assert build_parser().parse_args(["bench", "engine", "--prefill-chunk", "0"]).prefill_chunk == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "engine", "--prefill-chunk", "-1"])
    assert "--prefill-chunk" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path):
    from segcache.cli import main

    code = main(["prepare", "--model", str(tmp_path / "missing.gguf"), "--cache-dir", str(tmp_path)])
    assert code == 2


@pytest.mark.slow
def test_generate_smoke():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "segcache.cli", "generate",
                          "What is the capital of France?", "--dtype", "float32", "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "prompt tokens" in out.stderr


def test_lint_command_exit_codes(tmp_path, capsys):
    from segcache.cli import main
    from segcache.lint.synth import generate

    bad = tmp_path / "bad.jsonl"
    bad.write_text(generate(seed=3, plant=("dynamic-prefix",)).to_jsonl())
    clean = tmp_path / "clean.jsonl"
    clean.write_text(generate(seed=3).to_jsonl())
    report = tmp_path / "r.json"
    assert main(["lint", str(bad), "--json", str(report)]) == 1
    assert "dynamic-prefix" in report.read_text()
    assert main(["lint", str(clean)]) == 0
    assert main(["lint", str(tmp_path / "missing.jsonl")]) == 2


def test_bench_flags_take_type_and_default_from_their_dataclasses():
    from segcache.bench.metrics import Pricing
    from segcache.bench.workloads import MultiAgentSizes, WorkloadOptions

    args = build_parser().parse_args(["bench", "repo-docs", "--task-tokens", "300", "--cached-discount", "0.5"])
    assert (args.task_tokens, args.cached_discount) == (300, 0.5)
    assert args.global_tokens == MultiAgentSizes.global_tokens
    assert args.code_tokens == WorkloadOptions.code_tokens
    assert args.cache_write_premium == Pricing.cache_write_premium


def test_served_model_names_and_cors_flags_reach_the_config():
    from segcache.cli import _config

    server = _config(build_parser().parse_args(["serve"])).server
    assert (server.model_name, server.model_aliases, server.cors_origins) == (None, (), ())
    args = build_parser().parse_args(["serve", "--served-model-name", "main", "a1", "a2",
                                      "--cors-origins", "http://x.example", "*"])
    server = _config(args).server
    assert (server.model_name, server.model_aliases) == ("main", ("a1", "a2"))
    assert server.cors_origins == ("http://x.example", "*")


def test_serve_flags_are_the_config_fields_with_their_defaults(capsys):
    """Every config field that declares a flag is a ``serve`` option; with no flags the
    configs are the dataclasses' defaults; a value given reaches its field (scaled where
    the flag's unit differs)."""
    import dataclasses

    from segcache.cli import _config
    from segcache.config import (
        CacheConfig,
        DeployConfig,
        ModelConfig,
        SchedulerConfig,
        ServerConfig,
    )

    cfg = _config(build_parser().parse_args(["serve"]))
    assert (cfg.cache, cfg.scheduler, cfg.deploy) == (CacheConfig(), SchedulerConfig(), DeployConfig())
    assert cfg.model == ModelConfig() and cfg.server.port == ServerConfig().port
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    flagged = [f for cls in (CacheConfig, SchedulerConfig, DeployConfig, ModelConfig, ServerConfig)
               for f in dataclasses.fields(cls) if "flag" in f.metadata]
    assert len(flagged) >= 30
    for f in flagged:
        assert f.metadata["flag"].name in out, f.name
    argv = ["serve", "--max-running", "3", "--decode-pause-ms", "250", "--cache-ttl", "30",
            "--tenant-quota-bytes", "1MiB", "--blend", "auto", "--port", "9001", "--replicas", "2",
            "--threads", "1", "--cors-origins", "http://a", "http://b", "--memo-bytes", "8MiB",
            "--routing", "least-load", "--dtype", "float32"]
    cfg = _config(build_parser().parse_args(argv))
    assert (cfg.scheduler.max_running, cfg.scheduler.decode_pause_s) == (3, 0.25)
    assert (cfg.cache.default_ttl_s, cfg.cache.tenant_quota_bytes, cfg.cache.blend) == (30.0, 1 << 20, "auto")
    assert (cfg.cache.memo_bytes, cfg.cache.tenant_memo_bytes) == (8 << 20, 2 << 20)
    assert (cfg.server.port, cfg.server.cors_origins) == (9001, ("http://a", "http://b"))
    assert (cfg.deploy.replicas, cfg.deploy.routing) == (2, "least-load")
    assert (cfg.model.threads, cfg.model.dtype) == (1, "float32")
