"""The HTTP layer reaches torch only through the engine object it is given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_server_imports_without_torch():
    code = (
        "import sys\n"
        "import segcache.server, segcache.server.protocol\n"
        "from tests.fakes import FakeEngine\n"
        "from segcache.config import CacheConfig, ServerConfig\n"
        "segcache.server.create_app(FakeEngine(), ServerConfig(), CacheConfig())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers'})\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
