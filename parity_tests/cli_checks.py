"""Assertions the command-line tests share: a usage error is one line on stderr, exit status 2,
and leaves the files it must not touch as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gpt_oracle.cli import main
from gpt_oracle.user_input import EXIT_USAGE


def snapshot(*roots: Path) -> dict[str, str]:
    """Path -> sha256 of every file under the roots (a missing root is an empty snapshot)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")) if Path(root).exists() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def user_error(capsys, argv: list[str], *needles: str, untouched: tuple[Path, ...] = ()) -> str:
    """main(argv) must exit 2 with one stderr line naming every needle, and leave `untouched` as it was."""
    before = snapshot(*untouched)
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == EXIT_USAGE, f"{argv}: exit status {status}, stderr {captured.err!r}"
    assert len(lines) == 1, f"{argv}: expected one line on stderr, got {captured.err!r}"
    assert "Traceback" not in captured.err + captured.out, captured.err
    assert lines[0].startswith(f"gpt-oracle {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{argv}: {needle!r} not in {lines[0]!r}"
    assert snapshot(*untouched) == before, f"{argv} changed files it must not touch"
    return lines[0]
