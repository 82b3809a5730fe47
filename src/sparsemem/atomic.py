"""Writes that never leave half a file or folder behind, and never lose the copy they replace.

A folder is written into a staging folder next to the target, then swapped in: on Linux by an atomic
exchange of the two names (`renameat2(RENAME_EXCHANGE)`), elsewhere by renaming the old copy aside,
renaming the new one in and only then removing the old one. A writer killed between those two renames
leaves the old copy under its aside name; the next write or read of the target puts it back.

Staging and aside names carry the writer's process id (`.NAME.sparsemem-staging-PID-XXXX`,
`.NAME.sparsemem-old-PID-XXXX`), so a later writer in the same folder removes those left by dead
processes and never touches a live writer's. Files and folders get the modes the umask gives
(0644 / 0755 under umask 022), not the private modes of `tempfile`.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_OWNED = re.compile(r"^\.(?P<name>.+)\.sparsemem-(?P<kind>staging|old)-(?P<pid>\d+)-[^.]+$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    # reading the umask by setting it is racy between threads; Linux reports it in /proc
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths; False where the platform or file system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(error, f"cannot swap {first} and {second}: {os.strerror(error)}")


def recover(target: Path) -> None:
    """Clean what dead writers left next to `target`: put back an old copy set aside by a writer killed
    before its new copy was in place, and remove stale staging and aside folders in the same folder."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        match = _OWNED.match(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        original = parent / match["name"]
        if match["kind"] == "old" and not original.exists():
            logger.warning("restoring %s from %s, set aside by an interrupted write", original, entry.name)
            entry.rename(original)
            continue
        shutil.rmtree(entry, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(output_dir: Path, name: str, payload: dict, markdown: str, plot=None) -> list[Path]:
    """An evaluation's report files in `output_dir`: `name`.json (`payload`), `name`.md (`markdown`), each
    written atomically, and `name`.png when `plot(path)` draws one (it returns the path, or None without the
    `plot` extra). Returns the paths written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{name}.json", output_dir / f"{name}.md"
    write_text(json_path, json.dumps(payload, indent=2))
    write_text(md_path, markdown)
    figure = plot(output_dir / f"{name}.png") if plot is not None else None
    return [json_path, md_path] + ([figure] if figure else [])


def _check_kind(target: Path, marker: str | None) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir() or target.is_symlink():
        raise FileExistsError(f"{target} exists and is not a folder: refusing to replace it")
    if marker is not None and not (target / marker).is_file() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} is a folder without {marker}: not one this writer made, refusing to replace it"
        )


@contextlib.contextmanager
def staged_directory(target: Path, marker: str | None = None):
    """Yield an empty staging folder; on success it replaces `target`, on error it is removed.

    `marker`: a file every folder of this kind holds (e.g. "document.json"); an existing non-empty
    `target` without it is refused, so a folder of someone's files is never replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    _check_kind(target, marker)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.sparsemem-staging-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if marker is not None and not (staging / marker).is_file():
            raise RuntimeError(f"the writer of {target} did not write {marker}")
        _check_kind(target, marker)  # the target may have appeared while the new copy was written
        if not target.exists():
            staging.rename(target)
        elif _exchange(staging, target):
            pass  # `staging` now holds the old copy; removed below
        else:
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.sparsemem-old-{os.getpid()}-", dir=target.parent))
            aside.rmdir()  # only the unique name is wanted: rename needs a free one
            target.rename(aside)
            staging.rename(target)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
