"""The ``msif`` Typer application, its console (stderr) and the option types commands share."""

from __future__ import annotations

import os
from enum import Enum

import typer
from rich.console import Console

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="msif: which pre-training documents made a fine-tuned LLM say this? (multi-stage influence, EK-FAC)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root():
    """msif: which pre-training documents made a fine-tuned LLM say this? (multi-stage influence, EK-FAC)"""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" bars would clutter tables and JSON


bench_app = typer.Typer(help="Experiments of the paper (fact tracing, scalability).", no_args_is_help=True)


class Objective(str, Enum):
    lm = "lm"
    answer = "answer"
    classification = "classification"


class Modules(str, Enum):
    all = "all"
    mlp = "mlp"
    attention = "attention"


class Strategy(str, Enum):
    ekfac = "ekfac"
    kfac = "kfac"
    diagonal = "diagonal"
    identity = "identity"


class Labels(str, Enum):
    sampled = "sampled"
    empirical = "empirical"


class ModelDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


class SumDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    float64 = "float64"
