"""Writing an experiment's results: JSON, a markdown table and a plot, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_outputs(res: dict, out_dir: str | Path, stem: str, markdown: Callable[[dict], str],
                  plot: Callable[[dict, Path], object]) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` (``markdown(res)``) and ``<stem>.png`` (``plot(res, path)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(res, indent=1))
    paths["markdown"].write_text(markdown(res))
    plot(res, paths["plot"])
    return paths
