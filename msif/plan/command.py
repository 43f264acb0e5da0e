"""What `msif plan` does: read the model's shape (and the corpus's size), optionally calibrate, plan."""

from __future__ import annotations

import os

from .calibrate import calibrate, corpus_stats
from .settings import PlanSettings
from .shape import load_shape
from .stages import make_plan


def run(s: PlanSettings, corpus: str | None = None, do_calibrate: bool = False, text_field: str = "text",
        estimate_tokens: bool = True) -> dict:
    """Read the model's shape (and the corpus's size), optionally calibrate, and make the plan."""
    s.validate()
    shape = load_shape(s)
    if corpus is not None:
        n, t = corpus_stats(corpus, os.path.expanduser(s.model), text_field)
        s.documents, s.tokens = n, (t if estimate_tokens else s.tokens)
    thr = None
    cal = None
    if do_calibrate:
        cal = calibrate(shape, s)
        if not s.device.startswith("cuda"):
            s.runtime_bytes = cal["runtime_bytes"]
        thr = {"fit": cal["fit"], "train": cal["train"]}
    p = make_plan(shape, s, thr)
    if cal is not None:
        p["calibration"] = cal
    return p
