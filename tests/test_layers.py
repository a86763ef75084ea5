"""Imports flow downward only (DESIGN.md 'Layers'); this walks every module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "segcache"

# layer -> segcache layers it may import
ALLOWED = {
    "config": set(),
    "kv": {"config"},
    "model": {"config"},
    "engine": {"config", "kv", "model"},
    "server": {"config", "engine", "kv"},
    "router": {"config", "kv"},
    "lint": {"config", "kv"},
    "bench": {"config", "kv"},
    "client": {"kv"},
    "cli": {"config", "kv", "model", "engine", "server", "router", "lint", "bench"},
}
STDLIB_ONLY = {"config", "kv"}
# Packages of a stdlib-only layer that may use these third-party libraries (never torch):
# the cache tiers write safetensors payloads from numpy buffers and talk to Redis.
THIRD_PARTY_OK = {"kv/tiers": {"numpy", "safetensors", "redis"}}
NO_TORCH = {"server", "router", "lint", "bench", "client"}
# Modules of a no-torch layer that may use torch because they measure the engine itself.
TORCH_EXCEPTIONS: set[str] = set()


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "root"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _third_party_ok(path: Path) -> set[str]:
    rel = path.relative_to(ROOT).as_posix()
    return set().union(*(libs for pkg, libs in THIRD_PARTY_OK.items() if rel.startswith(pkg + "/")))


def test_imports_flow_downward():
    problems = []
    for path in ROOT.rglob("*.py"):
        layer = _layer(path)
        if layer == "root":
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "segcache":
                parts = name.split(".")
                if len(parts) < 2:
                    continue
                target = parts[1]
                if target != layer and target not in ALLOWED.get(layer, set()):
                    problems.append(f"{path.relative_to(ROOT)} imports {name} ({layer} -> {target})")
            elif (layer in STDLIB_ONLY and top not in sys.stdlib_module_names
                  and top not in _third_party_ok(path)):
                problems.append(f"{path.relative_to(ROOT)} imports third-party {name} (stdlib only)")
            elif layer in NO_TORCH and top == "torch" and str(path.relative_to(ROOT)) not in TORCH_EXCEPTIONS:
                problems.append(f"{path.relative_to(ROOT)} imports torch (layer {layer} must not)")
    assert not problems, "\n".join(problems)


def test_layer_check_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import torch\nfrom segcache.server import app\n")
    assert _imports(bad) == ["torch", "segcache.server"]


def test_only_the_tiers_package_gets_third_party_libraries_and_never_torch():
    assert _third_party_ok(ROOT / "kv" / "tiers" / "disk.py") == {"numpy", "safetensors", "redis"}
    assert _third_party_ok(ROOT / "kv" / "segment_tree.py") == set()
    assert _third_party_ok(ROOT / "kv" / "tiers_elsewhere.py") == set()
