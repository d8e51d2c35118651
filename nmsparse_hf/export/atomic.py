"""Outputs written beside, then moved into place: the directory mechanics of the one save path.

A save into ``out/final`` writes everything into a sibling staging directory
``out/.final.nmsparse-tmp-<pid>`` (same parent, so every move is a ``rename`` on one file
system), and only after the staged files verified does `swap_dir` (or `swap_files`) put them in
place. The previous contents stay until then, and on any failure they stay:

* `swap_dir` (the folder holds nothing but a previous save): rename the old folder to
  ``.final.nmsparse-old-<pid>``, rename the staged one to ``final``, then delete the old one;
* `swap_files` (the folder also holds other files that must stay, e.g. the Trainer's
  ``checkpoint-*`` folders, or it cannot be renamed: the working directory, a mount point): the
  entries being replaced move aside into the old sibling, the staged files move in one by one,
  the finish marker last; any failure moves everything back.

A staging directory left behind by a killed save is how `leftovers` tells that a save into a
folder started and did not finish; `staging_dir` clears those of processes no longer running.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TMP_TAG = ".nmsparse-tmp-"
OLD_TAG = ".nmsparse-old-"


def _sibling(folder: Path, tag: str, pid: int | None = None) -> Path:
    return folder.parent / f".{folder.name}{tag}{os.getpid() if pid is None else pid}"


def is_staging(folder: Path) -> bool:
    """Whether ``folder`` is a staging or set-aside directory of a save (by its name)."""
    return folder.name.startswith(".") and (TMP_TAG in folder.name or OLD_TAG in folder.name)


def leftovers(folder: Path) -> list[Path]:
    """The staging and set-aside directories that saves into ``folder`` left beside it (a save
    killed before it finished), sorted by name."""
    parent = folder.parent
    if not folder.name or not parent.is_dir():
        return []
    prefixes = (f".{folder.name}{TMP_TAG}", f".{folder.name}{OLD_TAG}")
    found = []
    for entry in parent.iterdir():
        tail = next((entry.name[len(p) :] for p in prefixes if entry.name.startswith(p)), None)
        if tail is not None and tail.isdigit():
            found.append(entry)
    return sorted(found)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def staging_dir(folder: Path) -> Path:
    """A fresh, empty staging directory beside ``folder`` for this process. Staging directories
    that saves of processes no longer running left beside ``folder`` are removed first (they
    hold only a killed save's partial files; set-aside old folders are never removed here)."""
    for entry in leftovers(folder):
        pid = int(entry.name.rsplit("-", 1)[1])
        if TMP_TAG in entry.name and (pid == os.getpid() or not _running(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = _sibling(folder, TMP_TAG)
    staged.mkdir()
    return staged


def must_swap_files(folder: Path) -> bool:
    """Whether ``folder`` cannot be replaced by a rename: it is the working directory (or holds
    it) or a mount point."""
    resolved = folder.resolve()
    cwd = Path.cwd().resolve()
    return resolved == cwd or resolved in cwd.parents or folder.is_mount()


def swap_dir(staged: Path, folder: Path) -> None:
    """Put the verified ``staged`` directory in place of ``folder``: rename the old folder aside,
    rename ``staged`` into place, then delete the old one. If the second rename fails, the old
    folder is renamed back."""
    if not os.path.lexists(folder):
        os.rename(staged, folder)
        return
    old = _sibling(folder, OLD_TAG)
    os.rename(folder, old)
    try:
        os.rename(staged, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def swap_files(staged: Path, folder: Path, replaced: list[str], order: list[str]) -> None:
    """Move the files of ``staged`` into ``folder`` in ``order`` (the finish marker last), after
    moving the entries ``replaced`` (the previous save's files and same-named files) aside;
    everything else in ``folder`` stays where it is. On any failure the moved-in files are
    removed and the set-aside entries moved back, so the folder holds what it held before."""
    old = _sibling(folder, OLD_TAG)
    old.mkdir()
    aside: list[str] = []
    placed: list[str] = []
    try:
        for name in replaced:
            os.rename(folder / name, old / name)
            aside.append(name)
        for name in order:
            os.rename(staged / name, folder / name)
            placed.append(name)
    except BaseException:
        for name in reversed(placed):
            os.rename(folder / name, staged / name)
        for name in reversed(aside):
            os.rename(old / name, folder / name)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
