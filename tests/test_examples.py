"""The shipped examples run as written."""
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_and_exports(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    first, last = (float(x) for x in done.stdout.split("loss ")[1].split()[0:3:2])
    assert last < first
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with safe_open(tmp_path / "delta.safetensors", framework="numpy") as f:
        assert any(name.endswith("/w_f") for name in f.keys())
