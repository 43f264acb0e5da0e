"""The ``msif`` command line: one entry point for the whole pipeline."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

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


def _fail(msg: str, code: int = 2):
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the library's input errors into one clear line and exit code 2 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        from .curvature.factors import FactorError
        from .data.encoding import InputError
        from .models.adapters import UnsupportedArchitectureError

        try:
            return fn(*a, **k)
        except (InputError, FactorError, UnsupportedArchitectureError, FileNotFoundError, FloatingPointError) as e:
            _fail(str(e))

    return wrapper


@app.command()
@user_errors
def fit(
    model: str = typer.Argument(..., help="Local HF checkpoint folder or hub id."),
    data: Path = typer.Argument(..., help="JSONL, Parquet or a saved `datasets` folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write the factors to (atomically)."),
    objective: Objective = typer.Option(Objective.lm, help="lm: all tokens; answer: prompt/answer fields, answer tokens only; classification: text/label."),
    modules: Modules = typer.Option(Modules.all, help="Which tracked layers: all, mlp or attention."),
    strategy: Strategy = typer.Option(Strategy.ekfac, help="Curvature: ekfac, kfac, diagonal or identity."),
    max_examples: Optional[int] = typer.Option(None, help="Fit on at most this many examples."),
    batch_size: int = typer.Option(8, help="Examples per forward/backward pass."),
    seed: int = typer.Option(0, help="Seed of the label sampling."),
    labels: Labels = typer.Option(Labels.sampled, help="sampled (true Fisher = GGN) or empirical (data labels)."),
    per_head: bool = typer.Option(True, "--per-head/--per-projection", help="Q/K/V of each head as separate blocks (default), or one block per projection."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder or id (default: the model's)."),
    text_field: str = typer.Option("text", help="Field with the text."),
    prompt_field: str = typer.Option("prompt", help="Field with the prompt (answer objective)."),
    answer_field: str = typer.Option("answer", help="Field with the answer (answer objective)."),
    label_field: str = typer.Option("label", help="Field with the class id (classification)."),
    max_length: Optional[int] = typer.Option(None, help="Longest sequence in tokens (default: the model's context)."),
    truncate: bool = typer.Option(False, help="Truncate over-long texts instead of failing."),
    generic: bool = typer.Option(False, help="Unregistered architecture: track every backbone linear layer."),
    device: str = typer.Option("cpu", help="Device, e.g. cuda."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Fit EK-FAC (or K-FAC / diagonal / identity) curvature factors of MODEL on DATA."""
    from . import api
    from .data.examples import Fields
    from .models.loading import load_model, load_tokenizer

    task = "classification" if objective == Objective.classification else "causal_lm"
    m = load_model(model, task=task, device=device)
    tok = load_tokenizer(tokenizer or model)
    fs = api.fit(
        m, str(data), out=out, tokenizer=tok, objective=objective.value, strategy=strategy.value,
        modules=modules.value, per_head=per_head, labels=labels.value, max_examples=max_examples,
        batch_size=batch_size, seed=seed, fields=Fields(text_field, prompt_field, answer_field, label_field),
        max_length=max_length, truncate=truncate, generic=generic, progress=progress, model_name=model,
    )
    console.print(
        f"[green]fitted[/] {strategy.value} factors for {len(fs.blocks)} blocks of {len(fs.modules)} layers on "
        f"{fs.n_examples_cov or fs.n_examples_lambda} examples ({fs.n_tokens} tokens) → {out}"
    )


bench_app = typer.Typer(help="Experiments of the paper (fact tracing, scalability).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def main():
    app()


if __name__ == "__main__":
    main()
