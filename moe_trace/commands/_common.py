"""Helpers shared by the subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def write_json(path: str | None, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` (``-`` for stdout); do nothing when ``path`` is None."""
    if path is None:
        return
    text = json.dumps(payload, indent=2, default=_jsonable) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
