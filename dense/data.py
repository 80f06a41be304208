"""Where training and benchmark data live: ``DENSE_DATA``, else ``../shared/data``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dense.zoo import REPO_ROOT


def data_root() -> Path | None:
    """The data folder, or None when there is none (tests that need it skip)."""
    env = os.environ.get("DENSE_DATA")
    if env:
        return Path(env)
    default = REPO_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def require_data(sub: str) -> Path:
    """``data_root() / sub``, or a clear error naming the setting."""
    root = data_root()
    if root is None or not (root / sub).exists():
        raise FileNotFoundError(
            f"data folder '{sub}' not found: set DENSE_DATA to the folder holding it "
            f"(default ../shared/data beside the repository)")
    return root / sub


def data_root_or_error(given: Path | str | None) -> Path | None:
    """``given`` (a --data argument) or :func:`data_root`; None after an error line on stderr."""
    root = given or data_root()
    if root is None:
        print("error: no data folder: pass --data or set DENSE_DATA", file=sys.stderr)
        return None
    return Path(root)
