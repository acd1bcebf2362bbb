"""The README's Python example runs as written (on the embedded tiny model), twice in the
same folder: a second run replaces its own outputs."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    """The first ```python block after the README's "The Python API" heading."""
    text = README.read_text()
    section = text[text.index("## The Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_first_example_runs_and_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = compile(python_example(), str(README), "exec")
    for _ in range(2):
        namespace: dict = {}
        exec(code, namespace)
        first, last = namespace["result"].history[0]["loss"], namespace["result"].history[-1]["loss"]
        assert last < first
    for written in ("out/delta.safetensors", "out/merged/config.json", "out/adapter/adapter_config.json"):
        assert (tmp_path / written).is_file(), written
    assert "->" in capsys.readouterr().out
