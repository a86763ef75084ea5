"""Imports flow downward only (DESIGN.md 'Layers'); this walks every module's imports.

``layering_problems`` is the rule; it runs on the package itself and on planted
violations in a temporary package, so a rule that stopped seeing violations fails.
"""

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
    "deploy": {"config", "kv", "engine", "server"},
    "cli": {"config", "kv", "model", "engine", "server", "router", "deploy", "lint", "bench"},
}
STDLIB_ONLY = {"config", "kv"}
# Packages of a stdlib-only layer that may use these libraries (never torch): the cache tiers
# encode payloads with safetensors/numpy, checksum them with xxhash and talk to Redis.
THIRD_PARTY_OK = {"kv/tiers": {"numpy", "safetensors", "xxhash", "redis"}}
NO_TORCH = {"server", "router", "lint", "bench", "client"}
# Modules of a no-torch layer that may use torch because they measure the engine itself.
TORCH_EXCEPTIONS: set[str] = set()
# Torch-free modules of a layer that may otherwise use it: the routing policy and the
# simulator run in the Ray ingress / router processes and on machines without a model.
NO_TORCH_MODULES = {"deploy/__init__.py", "deploy/chain.py", "deploy/routing.py",
                    "deploy/simulate.py", "deploy/sim_cli.py", "deploy/ray_router.py"}
# Layers these modules may import (engine and server load torch).
NO_TORCH_MODULE_LAYERS = {"config", "kv"}


def _layer(rel: Path) -> str:
    """The layer of a module, from its path relative to the package ("root" for __init__)."""
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "root"


def _imports(path: Path, module: str) -> list[str]:
    """Absolute names of the modules ``path`` (the module ``module``) imports,
    relative imports resolved against ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")
            base = base[:len(base) - node.level + (1 if is_package else 0)]
            if node.module:
                names.append(".".join(base + [node.module]))
            else:  # ``from . import x``: each name may be a module
                names += [".".join(base + [a.name]) for a in node.names]
    return names


def _third_party_ok(rel: Path) -> set[str]:
    return set().union(*(libs for pkg, libs in THIRD_PARTY_OK.items() if rel.as_posix().startswith(pkg + "/")))


def test_only_the_tiers_package_gets_third_party_libraries_and_never_torch():
    assert _third_party_ok(Path("kv/tiers/disk.py")) == {"numpy", "safetensors", "xxhash", "redis"}
    assert _third_party_ok(Path("kv/segment_tree.py")) == set()
    assert _third_party_ok(Path("kv/tiers_elsewhere.py")) == set()


def layering_problems(root: Path) -> list[str]:
    """Every import in the package at ``root`` that breaks the layering rules:
    an upward (or sideways) import between layers, a third-party import in a
    stdlib-only layer, torch in a no-torch layer. One line per problem."""
    package = root.name
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        layer = _layer(rel)
        if layer == "root":
            continue
        module = ".".join((package, *rel.with_suffix("").parts)).removesuffix(".__init__")
        for name in _imports(path, module):
            parts = name.split(".")
            top = parts[0]
            if top == package:
                if len(parts) < 2:
                    continue
                target = parts[1]
                if target != layer and target not in ALLOWED.get(layer, set()):
                    problems.append(f"{rel} imports {name} ({layer} -> {target})")
                elif rel.as_posix() in NO_TORCH_MODULES and target not in NO_TORCH_MODULE_LAYERS | {layer}:
                    problems.append(f"{rel} imports {name} (torch-free module -> {target})")
            elif (layer in STDLIB_ONLY and top not in sys.stdlib_module_names
                  and top not in _third_party_ok(rel)):
                problems.append(f"{rel} imports third-party {name} (stdlib only)")
            elif ((layer in NO_TORCH or rel.as_posix() in NO_TORCH_MODULES)
                  and top == "torch" and str(rel) not in TORCH_EXCEPTIONS):
                problems.append(f"{rel} imports torch (layer {layer} must not)")
    return problems


def test_imports_flow_downward():
    problems = layering_problems(ROOT)
    assert not problems, "\n".join(problems)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "segcache"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


CLEAN = {
    "__init__.py": "",
    "config.py": "import os\n",
    "kv/__init__.py": "from segcache.kv.tree import Tree\n",
    "kv/tree.py": "from segcache.config import GiB\nfrom . import hashing\n",
    "kv/hashing.py": "import hashlib\n",
    "model/llama.py": "import torch\nfrom ..config import ModelConfig\n",
    "engine/engine.py": "import torch\nfrom segcache.kv import Tree\nfrom segcache.model import llama\n",
    "server/app.py": "from segcache.engine import types\n",
}


def test_layer_rule_passes_a_clean_package(tmp_path):
    assert layering_problems(_package(tmp_path, CLEAN)) == []


def test_layer_rule_catches_planted_violations(tmp_path):
    root = _package(tmp_path, {
        **CLEAN,
        "kv/tree.py": "from segcache.engine.engine import Engine\n",  # upward
        "kv/hashing.py": "import xxhash\n",  # third-party in a stdlib-only layer
        "model/llama.py": "import torch\nfrom ..engine import engine\n",  # upward, relative
        "server/app.py": "import torch.nn\nfrom segcache.model import llama\n",  # torch; skips engine
    })
    assert layering_problems(root) == [
        "kv/hashing.py imports third-party xxhash (stdlib only)",
        "kv/tree.py imports segcache.engine.engine (kv -> engine)",
        "model/llama.py imports segcache.engine (model -> engine)",
        "server/app.py imports torch (layer server must not)",
        "server/app.py imports segcache.model (server -> model)",
    ]


def test_torch_free_deploy_modules_are_caught_importing_torch_or_the_engine(tmp_path):
    root = _package(tmp_path, {
        **CLEAN,
        "deploy/routing.py": "import torch\nfrom segcache.kv import hashing\n",
        "deploy/simulate.py": "from segcache.engine import engine\nfrom segcache.deploy import routing\n",
        "deploy/app.py": "import torch\nfrom segcache.server import app\n",  # allowed: not routing code
    })
    assert layering_problems(root) == [
        "deploy/routing.py imports torch (layer deploy must not)",
        "deploy/simulate.py imports segcache.engine (torch-free module -> engine)",
    ]


def test_routing_modules_load_without_torch():
    """Importing the policies and the simulator (and running one simulation) loads no torch."""
    import subprocess

    code = ("import sys; from segcache.deploy import sim_cli, simulate, routing, chain; "
            "from segcache.deploy.chain import request_chain, simulated_namespace; "
            "k = request_chain({'messages': [{'role': 'user', 'content': 'hi'}]}, simulated_namespace()); "
            "simulate.simulate([k, k], 2, 'prefix'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == "False"


def test_only_kv_walks_tree_links():
    """Outside ``kv/`` the trees are read through ``peek``/``nodes``/``match``, never by
    walking ``node.children`` (``lint/simulate.py`` has a trie of its own)."""
    own_trie = {Path("lint/simulate.py")}
    walkers = [str(p.relative_to(ROOT)) for p in sorted(ROOT.rglob("*.py"))
               if p.relative_to(ROOT).parts[0] != "kv" and p.relative_to(ROOT) not in own_trie
               and ".children" in p.read_text()]
    assert walkers == []
