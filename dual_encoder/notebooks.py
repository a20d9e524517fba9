"""What the notebooks need from their surroundings: the repository folder (where `data/` and `runs/` live), found
the same way whichever folder Jupyter started the kernel in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

# Set by the tests (and by anyone who wants the notebooks' files elsewhere).
ROOT_VARIABLE = "DUAL_ENCODER_NB_ROOT"


def is_repository(folder: Path) -> bool:
    """A checkout of this project: its setup.cfg, the package and the notebooks side by side."""
    return (folder / "setup.cfg").is_file() and (folder / "dual_encoder" / "__init__.py").is_file() and (
        folder / "notebooks"
    ).is_dir()


def find_repository(start: Optional[os.PathLike] = None) -> Path:
    """The folder the notebooks read and write `data/`, `runs/` and `indexes/` under.

    In order: `$DUAL_ENCODER_NB_ROOT` if set; the checkout holding the running notebook (Jupyter Server names it
    in `$JPY_SESSION_NAME`), `start`, or the working folder, or one of their parents; the checkout this package is
    imported from (an editable install or a source tree); else the working folder itself.

    Example:
        >>> ROOT = find_repository()
        >>> DATA_DIR = ROOT / "data" / "synthetic-demo"
    """
    chosen = os.environ.get(ROOT_VARIABLE)
    if chosen:
        return Path(chosen).expanduser().resolve()
    for folder in _candidates(start):
        if is_repository(folder):
            return folder
    return Path.cwd().resolve()


def _candidates(start: Optional[os.PathLike]) -> Iterable[Path]:
    session = os.environ.get("JPY_SESSION_NAME")  # the notebook's path (Jupyter Server 2)
    places = [Path(session).expanduser().parent] if session else []
    places += [Path(start)] if start is not None else []
    places += [Path.cwd(), Path(__file__).parent]
    for place in places:
        place = place.resolve()
        yield from (place, *place.parents)
