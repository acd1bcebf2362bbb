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

A folder found where we would write one of our entries (a user's own `checkpoints/`)
is never ours: it is refused, even with `overwrite=True`, and never recorded or removed.
One writer at a time: `lock(path)` holds an output for the life of a command, and a
second process is refused while the first is alive (a stale lock is taken over).
A write that fails for want of space (or any OS error without a file name) names the
file it was writing.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

MARKER = ".spsft-jax.json"
LOCK = ".spsft-jax.lock"


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


def check_dir(path: str | os.PathLike, *, kind: str, overwrite: bool = False, what: str = "output",
              entries: Iterable[str] = ()) -> Path:
    """Refuse (OutputError, one line) an output folder we cannot or must not write.

    Fine: a path that can be created, an empty folder, one of our folders, or any
    writable folder with `overwrite=True`.
    entries: names this write may create; one of them found as a folder we did not
        write is refused even with `overwrite=True` (it is never ours to replace).
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
                              f"overwrite=True to replace only the files we write")
        for name in entries:
            _refuse_foreign_folder(final, name, what)
    else:
        _creatable(final, what)
    return final


def _refuse_foreign_folder(folder: Path, name: str, what: str = "output") -> None:
    """A folder `name` in `folder` that no write of ours recorded is someone else's."""
    entry = folder / name
    ours = any(name in files for files in recorded(folder).values())
    if entry.is_dir() and not ours:
        raise OutputError(f"{what} {folder}: its folder {name}/ was not written by spsft-jax and is "
                          f"never replaced; move it, or choose another {what}")


def _foreign(folder: Path, kind: str) -> list[str]:
    """Entries of `folder` that are not ours of this kind (nor our marker, lock or leftovers)."""
    listed = set(recorded(folder).get(kind, ()))
    ours = listed | {MARKER, LOCK}
    # Temporaries of the folder itself and of our entries (a checkpoint folder staged beside its old one).
    leftovers = [_leftover(name) for name in (folder.name, *listed)]
    return sorted(e.name for e in folder.iterdir()
                  if e.name not in ours and not any(p.fullmatch(e.name) for p in leftovers))


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
    entries = list(entries)
    final = check_dir(path, kind=kind, overwrite=overwrite, entries=entries)
    final.mkdir(parents=True, exist_ok=True)
    _write_marker(final, kind, list(recorded(final).get(kind, ())) + entries)
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
        with _naming(final, tmp):
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
        for name in written:
            _refuse_foreign_folder(final, name)
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


# The metadata keys of the GGUFs we write: the adapters merged into a model
# (`interop.save_gguf`), and a llama.cpp adapter's source (`interop.save_gguf_adapter`).
GGUF_MARK = "spsft_jax.merged_adapters"
GGUF_ADAPTER_MARK = "spsft_jax.adapter"


def is_ours(path: str | os.PathLike) -> bool:
    """Whether a file was written by spsft-jax: listed in its folder's marker, a
    safetensors file whose metadata says so (adapters and selections), or a GGUF that
    records the adapters merged into it (`spsft-jax export --format gguf`)."""
    file = Path(path)
    if any(file.name in files for files in recorded(file.parent).values()):
        return True
    if file.suffix.lower() == ".gguf":
        try:
            import gguf

            fields = gguf.GGUFReader(file).fields
            return GGUF_MARK in fields or GGUF_ADAPTER_MARK in fields
        except Exception:  # noqa: BLE001 - unreadable, or no gguf package: not ours
            return False
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
                              f"pass overwrite=True to replace it")
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
        with _naming(final), os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _naming(final: Path, tmp: Path | None = None) -> Iterator[None]:
    """An OS error raised while writing `final` (no space left, quota) names it, or the
    entry of `final` that was being written in its temporary folder `tmp`."""
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        name = final if err.filename is None else Path(err.filename)
        if tmp is not None and tmp in name.parents:
            name = final / name.relative_to(tmp)
        elif err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(name)) from None


# --------------------------------------------------------------------------- one writer


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` (Linux), which tells a live writer from a new
    process that was given a dead writer's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _holder(lock_file: Path) -> int | None:
    """The pid of the live process holding `lock_file`, or None when it is stale."""
    try:
        pid_text, _, started = lock_file.read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if pid == os.getpid() or not _alive(pid):
        return None
    now = _start_time(pid)
    return None if started.strip() and now is not None and now != started.strip() else pid


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing ancestors; the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for entry in reversed(missing):
        entry.mkdir()
    return list(reversed(missing))


@contextlib.contextmanager
def lock(path: str | os.PathLike, *, folder: bool = True, what: str = "output") -> Iterator[Path]:
    """Hold the output `path` (a folder, or a file with `folder=False`) for this process.

    The lock is a file holding our pid: `path/.spsft-jax.lock`, or `.NAME.spsft-jax.lock`
    beside a file. While another live process holds it, OutputError (one line); a lock
    whose process has ended is taken over. On exit the lock is removed, and so are the
    folders created for it that are still empty.
    """
    final = Path(path).absolute()
    home = final if folder else final.parent
    lock_file = home / LOCK if folder else home / f".{final.name}{LOCK}"
    created = _make_parents(home)
    try:
        _acquire(lock_file, final, what)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield lock_file
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()
        _remove_empty(created)


def _acquire(lock_file: Path, final: Path, what: str) -> None:
    """Create `lock_file` holding our pid and start time, taking over a stale one."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(lock_file), suffix=".tmp", dir=lock_file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid()) or ''}\n")
        for _ in range(3):
            try:
                os.link(tmp, lock_file)  # atomic: fails when the lock exists
                return
            except FileExistsError:
                holder = _holder(lock_file)
                if holder is not None:
                    raise OutputError(f"{what} {final}: another spsft-jax process (pid {holder}) is "
                                      f"writing it; wait for it to finish, or choose another {what}") from None
                with contextlib.suppress(FileNotFoundError):
                    lock_file.unlink()  # stale: its process has ended
        raise OutputError(f"{what} {final}: could not take its lock {lock_file}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _remove_empty(created: list[Path]) -> None:
    for entry in reversed(created):  # innermost first
        with contextlib.suppress(OSError):
            entry.rmdir()


# --------------------------------------------------------------------------- replacing a folder late


def staging_dir(final: str | os.PathLike) -> Path:
    """A new empty folder beside `final` to build its replacement in (`.NAME.<pid>.*.tmp`:
    cleaned up as a leftover once this process has ended)."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(final.parent, final.name)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent))


def swap_in(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the folder `staged` in the place of `final` (ours), then remove the old one:
    an interruption leaves either the old folder in place or the new one."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
