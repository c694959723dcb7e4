"""A checkpoint's files on disk: atomic writes, and a pair of files replaced as one change.

Each save writes two files that must agree (config.json and model.safetensors; trainer_state.json
and optimizer.safetensors): old weights beside a new config.json would load without complaint.
`save_together` replaces them as one change. Its journal (`checkpoint.saving.json`,
`trainer_state.saving.json`) exists only while the files are being swapped:

    1. each new file is written to a temporary file next to its place and fsynced
    2. the journal records each new file's size and sha256 and the name its old file will be
       kept under; it is renamed into place and the directory fsynced before anything moves
    3. each old file is renamed aside, the new one renamed into place; the directory fsynced
    4. the journal is removed (the commit), then the old files

A loader calls `refuse_an_interrupted_save` first: it refuses unless every file the journal lists
is the new one (a save that got through 3 but not 4). So whenever a save stops, a power cut
included (renames reordered between two fsyncs too), the directory loads as the old checkpoint,
as the new one, or not at all with an error naming the journal. An exception before the commit
puts back every old file and the journal as it was (none, normally): the directory is byte for
byte what it was, and one the save created is removed. The put-back reads the disk rather than
a list of the renames done, because an exception (a Ctrl-C) can land after a rename has taken
effect and before the next line runs: each file's identity (device, inode) is taken before step
3, an old file goes back only if its kept name still holds it, and a new file is removed only if
it is the one this save put in place. A directory the save creates is fsynced into its parent.
Files a save does not name are never touched. numpy_ref/checkpoint_files.py writes and reads
the same journal, written from scratch; parity_tests/test_checkpoint_errors.py fails each
file-system call of a save in turn, parity_tests/test_checkpoint_faults.py interrupts each one
just after it has taken effect.

`CheckpointError` lives here, in the lowest layer, because the journal check raises it;
checkpoint.py re-exports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["CheckpointError", "write_temporary", "atomic_write", "fsync_directory", "new_file_mode", "sha256",
           "read_json", "save_together", "refuse_an_interrupted_save"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (or saved); the message names the file and the key."""


# ---- one file -------------------------------------------------------------------------------


def write_temporary(path: Path, write: Callable[[str], None]) -> Path:
    """`write(tmp_path)` into a new temporary file next to `path`, with a new file's usual mode,
    fsynced; returns its path. On failure the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp makes it 0600; the file gets a new file's usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` next to `path`, fsync, rename onto `path`, fsync the directory; on failure
    remove the temp file."""
    tmp = write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the process's umask bits
    (0o644 under the usual umask 022). Reading the umask means setting it: set back at once."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    """The JSON object in `path`, as strict JSON: Python's json would read NaN, Infinity and
    -Infinity, which no save writes; they are refused, naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")

    def refuse(constant: str):
        raise CheckpointError(f"{path}: not valid JSON ({constant} is not a number in strict JSON; a missing "
                              f"number is null)")

    try:
        d = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, or an int past 4300 digits
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(d).__name__}")
    return d


# ---- several files as one change: the journal (the protocol is in the module docstring) -----


def save_together(directory: Path, writers: Mapping[str, Callable[[str], None]], journal_name: str) -> None:
    """Replace the files `writers` names (file name -> `write(tmp_path)`) in `directory` as one
    change, through the journal `directory / journal_name`: steps 1 to 4 of the module docstring."""
    journal = directory / journal_name
    created = [p for p in (directory, *directory.parents) if not p.exists()][::-1]  # outermost first
    journal_before = journal.read_bytes() if journal.is_file() else None  # an earlier save's, cut off
    temps: dict[str, Path] = {}  # name -> its new file (step 1)
    files: dict[str, dict] = {}  # name -> its journal entry; complete before anything is renamed
    identity: dict[str, tuple] = {}  # name -> (the old file's identity, None if none; the new file's)
    journal_changed = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for made in created:  # a new directory is an entry of its parent, on disk once the parent is fsynced
            fsync_directory(made.parent)
        for name, write in writers.items():
            temps[name] = write_temporary(directory / name, write)
        for name, tmp in temps.items():
            identity[name] = (_identity(directory / name), _identity(tmp))
            files[name] = {"size": tmp.stat().st_size, "sha256": sha256(tmp),
                           "previous": tmp.name[:-len(".tmp")] + ".old" if identity[name][0] is not None else None}
        text = json.dumps({"files": files}, indent=2) + "\n"
        journal_changed = True  # (if the write below fails it has not: putting it back is harmless)
        atomic_write(journal, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        for name, tmp in temps.items():
            if files[name]["previous"] is not None:
                os.replace(directory / name, directory / files[name]["previous"])
            os.replace(tmp, directory / name)
        fsync_directory(directory)
        os.unlink(journal)  # the commit
    except BaseException:
        _put_back(directory, temps, files, identity)  # a step that fails raises here, the journal left in place
        fsync_directory(directory)  # the old files back on disk before the journal that names them goes
        if journal_changed and journal_before is None:
            journal.unlink(missing_ok=True)
        elif journal_changed:
            atomic_write(journal, lambda tmp: Path(tmp).write_bytes(journal_before))
        fsync_directory(directory)
        for made in reversed(created):  # innermost first; stops at one that holds something else
            try:
                if made.exists():  # (mkdir may have failed before it)
                    os.rmdir(made)
            except OSError:
                break
        raise
    for e in files.values():
        if e["previous"] is not None:
            try:
                os.unlink(directory / e["previous"])
            except OSError:  # the new checkpoint is committed; a hidden old copy left behind costs only space
                pass
    _remove_leftovers(directory, [*writers, journal_name])
    fsync_directory(directory)


def _remove_leftovers(directory: Path, names) -> None:
    """Hidden copies that saves cut off earlier left behind: `.NAME.XXXXXXXX.tmp` (a new file, or
    a journal, not yet in place) and `.NAME.XXXXXXXX.old` (an old file renamed aside), for the
    names this save wrote and its journal's. Once it has committed, no journal refers to them;
    each can be as large as the weights."""
    for name in names:
        leftover = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(tmp|old)")  # tempfile's 8 characters
        for path in directory.iterdir():
            if leftover.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                try:
                    path.unlink()
                except OSError:  # space only, as above
                    pass


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `path` itself, a symlink not followed; None when there is nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _put_back(directory: Path, temps: Mapping[str, Path], files: Mapping[str, Mapping[str, Any]],
              identity: Mapping[str, tuple]) -> None:
    """Undo steps 1 and 3 of a save that failed before its commit, from what is on disk: right
    whichever renames took effect (an exception may land just after one), and safe to run again.
    An old file still under its kept name goes back over its place (the new file, or nothing);
    a new file put where there was none is removed; temporary files not renamed are removed."""
    for name in reversed(list(temps)):
        if name in files:  # otherwise the journal was not written yet and nothing was renamed
            old, new = identity[name]
            kept = files[name]["previous"]
            if kept is not None and _identity(directory / kept) == old:  # it was renamed aside
                os.replace(directory / kept, directory / name)
            elif kept is None and _identity(directory / name) == new:  # the new file, where there was none
                os.unlink(directory / name)
        temps[name].unlink(missing_ok=True)  # gone already if renamed into place


def refuse_an_interrupted_save(directory: Path, journal_name: str) -> None:
    """CheckpointError if a save's journal is in `directory` and a file it lists is not the new
    one: the save stopped part way and the files there may not be one checkpoint. Of the kept old
    copies, the message names those that are there."""
    journal = directory / journal_name
    if not journal.exists():
        return
    files = read_json(journal).get("files")
    if not (isinstance(files, dict) and all(_is_journal_entry(name, e) for name, e in files.items())):
        raise CheckpointError(f"{journal}: key 'files' must map file names in {directory} to "
                              f"{{size, sha256, previous}}, got {files!r}")
    unfinished = [name for name, e in files.items() if not _is_as_recorded(directory / name, e)]
    if unfinished:
        kept = [e["previous"] for e in files.values()
                if e["previous"] is not None and os.path.lexists(directory / e["previous"])]
        where = f"the previous versions moved aside are kept as {kept}" if kept else \
            "no previous version had been moved aside yet"
        raise CheckpointError(f"{journal}: a save into {directory} stopped part way: {unfinished} are not yet the "
                              f"files it was writing, so the files there may not be one checkpoint ({where}); "
                              f"save the checkpoint again")


def _is_journal_entry(name, entry) -> bool:
    """A bare file name (the journal must not point the reader elsewhere) -> size, sha256, previous."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        return False
    return (isinstance(entry, dict) and set(entry) == {"size", "sha256", "previous"}
            and type(entry["size"]) is int and isinstance(entry["sha256"], str)
            and (entry["previous"] is None or isinstance(entry["previous"], str)))


def _is_as_recorded(path: Path, entry: Mapping[str, Any]) -> bool:
    """Is `path` the file the journal entry records (the size first: hashing is the slow part)?"""
    return path.is_file() and path.stat().st_size == entry["size"] and sha256(path) == entry["sha256"]
