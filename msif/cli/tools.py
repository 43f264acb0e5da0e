"""``msif demo``, ``msif proximity`` and ``msif plan``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .app import Modules, Strategy, app, console
from .failures import _fail, user_errors


@app.command()
@user_errors
def demo(
    question: Optional[str] = typer.Option(None, help="Ask another question (default: What is the capital of Italy?, a fact never seen in fine-tuning)."),
    answer: Optional[str] = typer.Option(None, help="Attribute this answer instead of the model's greedy one."),
    out: Path = typer.Option(Path("runs/demo"), help="Folder for report.html and result.json."),
    top: int = typer.Option(5, help="Documents to show."),
    candidates: int = typer.Option(50, help="Embedding nearest neighbours to rerank."),
    method: str = typer.Option("ms-if", help="ms-if, ss-if, gdp or repsim."),
    damping_pt: str = typer.Option("0.1x", "--damping-pt", help="λ_pt (absolute, or relative like 0.1x)."),
    damping_ft: str = typer.Option("0.1x", "--damping-ft", help="λ_ft (absolute, or relative like 0.1x)."),
    size: str = typer.Option("full", help="Bundled world: full, or tiny (seconds to build, for a smoke test)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Your own pre-trained model (with --finetuned, --corpus, --finetune-data)."),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", help="Your own fine-tuned causal LM."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Your pre-training corpus (JSONL / Parquet / datasets; text and id fields)."),
    finetune_data: Optional[str] = typer.Option(None, "--finetune-data", help="Your fine-tuning data (prompt / answer fields)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer (default: the pre-trained model's)."),
):
    """The whole pipeline on the bundled world (or your own models): build/load it, ask, decode, retrieve,
    rerank by MS-IF, print the top documents and write an HTML report. With your own models the factors
    and the index are cached under OUT/cache; for full control use `msif fit`, `msif index`, `msif attribute`."""
    from ..demo import run_demo

    run_demo(question=question, answer=answer, out=out, top=top, candidates=candidates, method=method,
             damping_pt=damping_pt, damping_ft=damping_ft, size=size, progress=progress, pretrained=pretrained,
             finetuned=finetuned, corpus=corpus, finetune_data=finetune_data, tokenizer=tokenizer)


@app.command()
@user_errors
def proximity(
    pretrained: str = typer.Argument(..., help="Local checkpoint folder of the pre-trained model."),
    finetuned: str = typer.Argument(..., help="Local checkpoint folder of the fine-tuned model (a causal LM or a classifier built from it)."),
    alpha: float = typer.Option(1.0, "--alpha", help="α of the proximity loss (α/2)‖θ_ft − θ_pt‖²."),
    out: Path = typer.Option(Path("runs/proximity"), "--out", help="Folder for proximity.json/.md and the histogram proximity.png."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    top: int = typer.Option(20, "--top", help="Rows of the printed table (largest ratio first; the files have all)."),
):
    """Per weight matrix ‖θ_ft − θ_pt‖ and its ratio to ‖θ_pt‖, total squared distance, proximity loss (paper §5.2)."""
    from ..eval.proximity import markdown, proximity_from_paths, write_outputs

    if not (alpha >= 0) or alpha == float("inf"):
        _fail(f"--alpha must be a finite number ≥ 0, not {alpha}")
    try:
        res = proximity_from_paths(pretrained, finetuned, alpha=alpha)
    except ValueError as e:
        _fail(str(e))
    paths = write_outputs(res, out)
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    else:
        console.print(markdown(res, top=top), markup=False, highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command()
@user_errors
def plan(
    model: str = typer.Argument(..., help="Local checkpoint folder (only its config.json is read)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Pre-training corpus: documents counted, tokens per document estimated from a sample."),
    documents: Optional[int] = typer.Option(None, "--documents", help="Documents in the corpus (instead of --corpus; default 10000)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Mean tokens per document (default 512, or estimated from --corpus)."),
    queries: int = typer.Option(1, "--queries", help="Queries attributed in one run."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (the config's), float32, bfloat16, float16, float64."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward/backward pass (fit and scoring)."),
    device_memory: Optional[float] = typer.Option(None, "--device-memory", help="GiB of memory to plan for (default: this machine's RAM, or the CUDA device's)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Padded batch length (default: 1.05 × --tokens, at most the context)."),
    fit_examples: Optional[int] = typer.Option(None, "--fit-examples", help="Documents the pre-trained fit reads (default: all)."),
    finetune_examples: int = typer.Option(1000, "--finetune-examples", help="Examples of the fine-tuned fit."),
    finetune_tokens: int = typer.Option(64, "--finetune-tokens", help="Tokens per fine-tuning example."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Documents scored per query (default: all)."),
    strategy: Strategy = typer.Option(Strategy.ekfac, help="Curvature: ekfac, kfac, diagonal or identity."),
    modules: Modules = typer.Option(Modules.all, help="Which tracked layers: all, mlp or attention."),
    stats_dtype: Optional[str] = typer.Option(None, "--stats-dtype", help="float32 (default; float64 for a float64 model) or float64 sums."),
    factor_dtype: Optional[str] = typer.Option(None, "--factor-dtype", help="Dtype of the stored eigendecompositions (default: the stats dtype)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Low-rank query vectors (rank per block)."),
    refine_basis: int = typer.Option(0, "--refine-basis", help="EK-FAC basis-refinement passes."),
    per_head: bool = typer.Option(True, "--per-head/--per-projection", help="Q/K/V of each head as separate blocks (default), or one block per projection."),
    generic: bool = typer.Option(False, help="Unregistered architecture: track every backbone linear layer."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Load the model (random init without weights) and time real batches instead of a nominal throughput."),
    world_size: int = typer.Option(1, "--world-size", help="Ranks of a torchrun launch: time per stage split across them (memory is per rank)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of a table."),
):
    """Memory, work and time of every stage (fit pt / ft, query vectors, scoring, index) for MODEL, without loading its weights."""
    from ..data.encoding import InputError
    from ..plan import PlanSettings, format_plan, run

    if corpus is not None and documents is not None:
        raise InputError("give the corpus with --corpus FILE or its size with --documents N, not both")
    s = PlanSettings(model=model, documents=10_000 if documents is None else documents, tokens=512 if tokens is None else tokens,
                     queries=queries, dtype=dtype, batch_size=batch_size, device=device,
                     device_memory=None if device_memory is None else int(device_memory * 2**30), seq_len=seq_len,
                     fit_examples=fit_examples, finetune_examples=finetune_examples, finetune_tokens=finetune_tokens,
                     candidates=candidates, strategy=strategy.value, modules=modules.value, stats_dtype=stats_dtype,
                     factor_dtype=factor_dtype, rank=rank, refine=refine_basis, per_head=per_head, generic=generic,
                     world_size=world_size)
    if device_memory is not None and not device_memory > 0:
        raise InputError(f"--device-memory must be a positive number of GiB, not {device_memory}")
    p = run(s, corpus=None if corpus is None else str(corpus), do_calibrate=calibrate, estimate_tokens=tokens is None)
    if as_json:
        print(json.dumps(p, indent=1))
        return
    print(format_plan(p))
