"""Safe outputs: every file is written to a temporary name and renamed into place, and
nothing we did not write is ever deleted.

A folder we write holds a marker, `.spsft-jax.json`, listing the entries we put there
by kind of output (a fine-tuning run, an HF checkpoint, a PEFT adapter):

    {"written_by": "spsft-jax", "files": {"run": ["adapter.safetensors", "history.json"]}}

Writing into an existing non-empty folder holding anything but our entries of the same
kind is refused unless `overwrite=True`; even then only the entries we write are
replaced. A rerun into one of our folders removes the entries the previous write of that
kind listed and this one does not write (a stale `selection.safetensors` beside a new
LoRA adapter), and nothing else.

    with output_dir("runs/x", kind="run") as tmp:        # write into tmp
        save_file(..., tmp / "adapter.safetensors")
    with output_file("sel.safetensors", "wb") as f:      # one file, temp + rename
        f.write(data)
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

MARKER = ".spsft-jax.json"


class OutputError(ValueError):
    """An output path that cannot or must not be written (a user error)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}."


def _leftover(name: str) -> re.Pattern:
    """Our temporary entries for `name`: `.NAME.<pid>[.*].tmp|old`."""
    return re.compile(rf"\.{re.escape(name)}\.(\d+)(\..*)?\.(tmp|old)")


def _clean_leftovers(folder: Path, name: str) -> None:
    """Remove our temporary entries for `name` that a process no longer running left behind."""
    pattern = _leftover(name)
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            match = pattern.fullmatch(entry.name)
            if match is None or _alive(int(match.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier write that was interrupted in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _creatable(final: Path, what: str) -> None:
    """The nearest existing ancestor of `final` is a writable folder."""
    parent = final.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {final}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {final}: {parent} is not writable")


# --------------------------------------------------------------------------- folders


def recorded(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Kind -> the entries our marker in `folder` lists ({} when the folder is not ours)."""
    marker = Path(folder) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict) or info.get("written_by") != "spsft-jax" or \
            not isinstance(info.get("files"), dict):
        return {}
    return {kind: [f for f in files if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")]
            for kind, files in info["files"].items() if isinstance(files, list)}


def check_dir(path: str | os.PathLike, *, kind: str, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse (OutputError, one line) an output folder we cannot or must not write.

    Fine: a path that can be created, an empty folder, one of our folders, or any
    writable folder with `overwrite=True`.
    """
    final = Path(path).absolute()
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise OutputError(f"{what} {final}: exists and is not a folder")
        if not os.access(final, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {final}: folder is not writable")
        foreign = _foreign(final, kind)
        if foreign and not overwrite:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            other = next((k for k, files in recorded(final).items() if foreign[0] in files), None)
            held = (f"holds another spsft-jax output ({other}: {foreign[0]}{more})" if other else
                    f"holds files spsft-jax did not write ({foreign[0]}{more})")
            raise OutputError(f"{what} {final}: {held}; choose an empty or new folder, or pass "
                              f"--overwrite (overwrite=True) to replace only the files we write")
    else:
        _creatable(final, what)
    return final


def _foreign(folder: Path, kind: str) -> list[str]:
    """Entries of `folder` that are not ours of this kind (nor our marker or leftovers)."""
    ours = set(recorded(folder).get(kind, ())) | {MARKER}
    leftover = _leftover(folder.name)
    return sorted(e.name for e in folder.iterdir()
                  if e.name not in ours and not leftover.fullmatch(e.name))


def _write_marker(folder: Path, kind: str, files: Iterable[str]) -> None:
    """Record `files` as this kind's entries (and no other kind's)."""
    mine = set(files)
    listed = {k: sorted(set(v) - mine) for k, v in recorded(folder).items() if k != kind}
    listed = {k: v for k, v in listed.items() if v}
    listed[kind] = sorted(mine)
    text = json.dumps({"written_by": "spsft-jax", "files": listed}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(folder / MARKER), suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, folder / MARKER)


def claim_dir(path: str | os.PathLike, entries: Iterable[str], *, kind: str,
              overwrite: bool = False) -> Path:
    """Create (or check) our output folder and record `entries` as ours before we write them
    in place (a checkpoint folder written during training)."""
    final = check_dir(path, kind=kind, overwrite=overwrite)
    final.mkdir(parents=True, exist_ok=True)
    _write_marker(final, kind, list(recorded(final).get(kind, ())) + list(entries))
    return final


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
        entry.unlink()


@contextlib.contextmanager
def output_dir(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    keep: Iterable[str] = (),
    conflicts: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder; on success its entries become `path`'s.

    A new `path` is the temporary folder renamed into place. In an existing folder each
    entry is renamed in (one at a time), the entries our previous write listed and this
    one does not are removed (except `keep`), and nothing else is touched.
    conflicts: a regular expression of names that must not remain beside the new ones
    when we did not write them (weight files of another layout); such a folder is refused.
    """
    final = check_dir(path, kind=kind, overwrite=overwrite)
    existing = final.exists()
    if existing:
        _clean_leftovers(final, final.name)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".tmp",
                                dir=final if existing else final.parent))
    try:
        yield tmp
        written = sorted(e.name for e in tmp.iterdir() if e.name != MARKER)
        for entry in tmp.rglob("*"):  # some writers create private files; match a normal save
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        if not existing:
            _write_marker(tmp, kind, written)
            os.replace(tmp, final)
            return
        previous = set(recorded(final).get(kind, ()))
        if conflicts is not None:
            for name in _foreign(final, kind):
                if name not in written and re.fullmatch(conflicts, name):
                    raise OutputError(f"output {final}: {name} was not written by spsft-jax and "
                                      f"would be left beside the new files; choose another folder")
        # Record the union first, so an interruption never leaves an entry of ours unlisted.
        _write_marker(final, kind, previous | set(written) | set(keep))
        for name in written:
            target = final / name
            if (tmp / name).is_dir() and target.is_dir():
                _remove(target)  # os.replace cannot replace a non-empty folder
            os.replace(tmp / name, target)
        for name in sorted(previous - set(written) - set(keep)):
            _remove(final / name)
        _write_marker(final, kind, set(written) | {k for k in keep if (final / k).exists()})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- single files


def is_ours(path: str | os.PathLike) -> bool:
    """Whether a file was written by spsft-jax: listed in its folder's marker, or a
    safetensors file whose metadata says so (adapters and selections)."""
    file = Path(path)
    if any(file.name in files for files in recorded(file.parent).values()):
        return True
    try:
        from safetensors import safe_open

        with safe_open(os.fspath(file), framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return any(k.startswith("spsft_jax") for k in metadata) or \
        str(metadata.get("format", "")).startswith("spsft-jax")


def check_file(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse (OutputError, one line) an output file we cannot or must not write."""
    final = Path(path).absolute()
    if final.is_dir():
        raise OutputError(f"{what} {final}: is a folder; give a file name")
    if final.exists():
        if not os.access(final.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {final}: its folder is not writable")
        if not overwrite and not is_ours(final):
            raise OutputError(f"{what} {final}: exists and was not written by spsft-jax; "
                              f"pass --overwrite (overwrite=True) to replace it")
    else:
        _creatable(final, what)
    return final


@contextlib.contextmanager
def output_file(path: str | os.PathLike, mode: str = "w", *, overwrite: bool = False) -> Iterator:
    """Open a temporary file beside `path` for writing; on success it replaces `path`.

    An existing file is replaced only when spsft-jax wrote it or with `overwrite=True`.
    """
    final = check_file(path, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(final.parent, final.name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
