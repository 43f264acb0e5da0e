"""Writing an experiment's results: JSON, a markdown table and a plot, side by side.

Every file is written under a temporary name in its folder and renamed into place, so a killed run
leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write, atomic_write_text


def write_outputs(res: dict, out_dir: str | Path, stem: str, markdown: Callable[[dict], str],
                  plot: Callable[[dict, Path], object]) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` (``markdown(res)``) and ``<stem>.png`` (``plot(res, path)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    atomic_write_text(paths["json"], json.dumps(res, indent=1))
    atomic_write_text(paths["markdown"], markdown(res))
    atomic_write(paths["plot"], lambda p: plot(res, p))
    return paths
