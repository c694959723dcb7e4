"""A checkpoint's files on disk: atomic writes, and a pair of files replaced as one change.

Each save writes two files that must agree (config.json and model.safetensors; trainer_state.json
and optimizer.safetensors): old weights beside a new config.json would load without complaint.
`save_together` replaces them as one change. Its journal (`checkpoint.saving.json`,
`trainer_state.saving.json`) exists only while the files are being swapped:

    1. each new file is written to a temporary file next to its place and fsynced
    2. the journal records each new file's size and sha256 and the name its old file will be
       kept under; it is renamed into place and the directory fsynced before anything moves
    3. each old file is renamed aside and the new one renamed into place; directory fsynced
    4. the journal is removed (this is the commit), then the old files

A loader calls `refuse_an_interrupted_save` first: it refuses unless every file the journal lists
is the new one (a save that got through 3 but not 4). So wherever the save stops, a power cut
included (and renames reordered between two fsyncs), the directory loads as the old checkpoint,
as the new one, or not at all with an error naming the journal. An exception before the commit
puts back every old file and the journal as it was (normally none): the directory is byte for
byte what it was, and one the save created is removed again. The put-back works from what is on
disk, not from a note of which renames ran: an exception (a Ctrl-C) can arrive just after a
rename, before the line after it. Each file's identity (device, inode) is taken before step 3,
so an old file is moved back only if its kept name holds it, and a new file is removed only if
it is the one this save placed. A directory the save creates is made durable in its parent.
Files a save does not name are never touched. torch_impl/checkpoint_files.py writes and reads
the same journal, written from scratch; parity_tests/test_checkpoint_errors.py fails each
file-system call of a save in turn, parity_tests/test_checkpoint_faults.py interrupts each just
after it has taken effect.

`CheckpointError` lives here, in the lowest layer, because the journal check raises it;
safetensors_io.py and checkpoint.py import it from here.
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
    """A checkpoint or safetensors file that cannot be loaded; the message names file and key."""


# ---- one file -------------------------------------------------------------------------------


def write_temporary(path, write: Callable) -> Path:
    """Call `write(file)` on a new temporary file next to `path` (a new file's usual mode), fsync
    it and return its path; `path` itself is not touched. On failure the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed whatever happens below
            os.chmod(tmp, new_file_mode())  # mkstemp makes it 0600; the file gets a new file's usual mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path, write: Callable) -> None:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it onto `path`.

    The rename is atomic on POSIX: a reader sees the old file or the new one, never a partial
    one. If anything fails, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
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
    """The JSON object in `path`, strict JSON: NaN, Infinity and -Infinity (which Python's json
    reads and writes by default) are refused, naming the file, as a save refuses to write them."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")

    def no_constant(name: str):
        raise CheckpointError(f"{path}: not valid JSON ({name} is not a number in strict JSON; a missing "
                              f"number is null)")

    try:
        d = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, or an int past 4300 digits
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(d).__name__}")
    return d


def _write_json(path: Path, d: Mapping[str, Any]) -> None:
    text = json.dumps(d, indent=2) + "\n"  # serialise first: a TypeError leaves nothing behind
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---- several files as one change: the journal (the protocol is in the module docstring) -----


def save_together(directory: Path, writers: Mapping[str, Callable], journal_name: str) -> None:
    """Replace the files `writers` names (file name -> `write(open_file)`) in `directory` as one
    change, through the journal `directory / journal_name`: steps 1 to 4 of the module docstring."""
    journal = directory / journal_name
    created = [p for p in (directory, *directory.parents) if not p.exists()][::-1]  # outermost first
    journal_before = journal.read_bytes() if journal.is_file() else None  # an earlier save's, cut off
    temps: dict[str, Path] = {}  # name -> its new file (step 1)
    files: dict[str, dict] = {}  # name -> its journal entry, all recorded before step 3 renames anything
    identity: dict[str, tuple] = {}  # name -> (its old file's identity or None, its new file's)
    journal_changed = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for made in created:  # a new directory's name is an entry in its parent: durable only once that is fsynced
            fsync_directory(made.parent)
        for name, write in writers.items():
            temps[name] = write_temporary(directory / name, write)
        for name, tmp in temps.items():
            old, new = _identity(directory / name), _identity(tmp)
            keep_as = tmp.name[:-len(".tmp")] + ".old"  # unique, as mkstemp made the temporary name
            identity[name] = (old, new)
            files[name] = {"size": tmp.stat().st_size, "sha256": sha256(tmp),
                           "previous": keep_as if old is not None else None}
        journal_changed = True  # (if the write below fails it has not: putting it back is harmless)
        _write_json(journal, {"files": files})
        for name, tmp in temps.items():
            if files[name]["previous"] is not None:
                os.replace(directory / name, directory / files[name]["previous"])
            os.replace(tmp, directory / name)
        fsync_directory(directory)
        os.unlink(journal)  # the commit
    except BaseException:
        _put_back(directory, temps, files, identity)  # if a step of it fails, it raises: the journal stays
        fsync_directory(directory)  # the old files back on disk before the journal that names them goes
        if journal_changed and journal_before is None:
            journal.unlink(missing_ok=True)
        elif journal_changed:
            atomic_write(journal, lambda f: f.write(journal_before))
        fsync_directory(directory)
        for made in reversed(created):  # innermost first; stops at one holding anything else
            try:
                if made.exists():  # (mkdir may have failed before it)
                    os.rmdir(made)
            except OSError:
                break
        raise
    for entry in files.values():
        if entry["previous"] is not None:
            try:
                os.unlink(directory / entry["previous"])
            except OSError:  # committed already; a hidden old copy left behind costs disk space only
                pass
    _remove_leftovers(directory, [*writers, journal_name])
    fsync_directory(directory)


def _remove_leftovers(directory: Path, names) -> None:
    """Hidden copies that saves cut off earlier left behind: `.NAME.XXXXXXXX.tmp` (a new file not
    yet in place, or a journal not yet in place) and `.NAME.XXXXXXXX.old` (an old file renamed
    aside), for the names this save wrote and its journal. Once it has committed, no journal refers
    to them; each can be as large as the weights."""
    for name in names:
        leftover = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(tmp|old)")  # tempfile's 8 characters
        for path in directory.iterdir():
            if leftover.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                try:
                    path.unlink()
                except OSError:  # space only, as above
                    pass


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path` itself (a symlink is not followed), or None if nothing is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _put_back(directory: Path, temps: Mapping[str, Path], files: Mapping[str, Mapping[str, Any]],
              identity: Mapping[str, tuple]) -> None:
    """Undo steps 1 and 3 of a save that failed before its commit, judged from what is on disk, so
    it is right whichever renames ran (an exception can land just after a rename) and can be run
    again: an old file still under its kept name goes back over whatever is in its place (the new
    file, or nothing); a new file that replaced no old one is removed if it is in place; every
    temporary file not renamed into place is removed."""
    for name in reversed(list(temps)):
        if name in files:  # else the journal was not yet written, and nothing was renamed
            old, new = identity[name]
            kept = files[name]["previous"]
            if kept is not None and _identity(directory / kept) == old:  # renamed aside
                os.replace(directory / kept, directory / name)  # the old file back, over the new one if placed
            elif kept is None and _identity(directory / name) == new:  # placed where there was no old file
                os.unlink(directory / name)
        temps[name].unlink(missing_ok=True)  # gone already if it was renamed into place


def refuse_an_interrupted_save(directory: Path, journal_name: str) -> None:
    """CheckpointError if a save's journal is in `directory` and names a file that is not the new
    one yet: that save stopped part way, and the files there may not be one checkpoint. The
    message names only the kept old copies that are there."""
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
    """A bare file name in the directory (never a path elsewhere) -> {size, sha256, previous}."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        return False
    return (isinstance(entry, dict) and set(entry) == {"size", "sha256", "previous"}
            and type(entry["size"]) is int and isinstance(entry["sha256"], str)
            and (entry["previous"] is None or isinstance(entry["previous"], str)))


def _is_as_recorded(path: Path, entry: Mapping[str, Any]) -> bool:
    """Is `path` the file the journal entry records (size first: hashing is the slow part)?"""
    return path.is_file() and path.stat().st_size == entry["size"] and sha256(path) == entry["sha256"]
