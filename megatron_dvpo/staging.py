"""Directories written under a staging name and renamed into place once complete, so that a
reader (a resume, a converter's user) never finds half of one."""

from __future__ import annotations

import shutil
from pathlib import Path


def move_into_place(staged: Path, target: Path, stale_suffix: str) -> None:
    """``staged`` becomes ``target``. An existing ``target`` is renamed aside (to
    ``<target><stale_suffix>``) and deleted only once the new one is in place: a crash leaves
    the old or the new directory under ``target``, never neither or a mix."""
    if target.exists():
        stale = target.with_name(target.name + stale_suffix)
        target.rename(stale)
        staged.rename(target)
        shutil.rmtree(stale)
    else:
        staged.rename(target)
