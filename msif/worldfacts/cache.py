"""Where built worlds live: the cache root, a world's directory, and the leftovers of killed builds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from msif.worldfacts.config import WorldConfig, world_hash


def default_cache_root() -> Path:
    """``$MSIF_CACHE`` if set, else ``~/.cache/msif``."""
    env = os.environ.get("MSIF_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/msif").expanduser()



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(root: Path, name: str):
    """Remove temporary build directories of ``name`` whose building process is gone."""
    for p in root.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def world_dir(size: str = "full", seed: int = 0, cache_dir: str | Path | None = None,
              config: WorldConfig | None = None, world: str = "standard") -> Path:
    """Where the world for these settings lives (whether or not it is built)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"world-{world_hash(size, seed, config, world)}"


def is_built(path: str | Path) -> bool:
    """A world directory is complete once its ``world.json`` exists (written last, then renamed in)."""
    return (Path(path) / "world.json").is_file()
