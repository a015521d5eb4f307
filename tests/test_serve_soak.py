"""A short run of examples/serve_soak.py (the 60-second soak of `npgpt serve`, docs/performance.md): a few
clients, good and bad requests mixed, for 4 seconds; every good request answered right, every bad one its
status, the server up, its threads and memory unchanged."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("openai")
pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_soak_of_good_and_bad_requests():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "serve_soak.py"), "--seconds", "4",
                        "--clients", "3", "--parallel", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0 and r.stdout.strip().endswith("PASS"), r.stdout + r.stderr
    assert " 0/" not in r.stdout and "hang_up   ok" in r.stdout
