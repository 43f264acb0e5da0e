"""``msif fit`` and ``msif index``: curvature factors of a model, the embedding index of a corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import Labels, ModelDtype, Modules, Objective, Strategy, SumDtype, app, console
from .failures import _fail, user_errors


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
    samples: int = typer.Option(1, help="Label draws per example (sampled labels); more draws, less noise (e.g. for a confident classifier)."),
    refine_basis: int = typer.Option(0, "--refine-basis", help="EK-FAC: extra passes that move A and S towards the nearest Kronecker product of each GGN block (1 is usually enough; each costs about one eigenvalue-correction pass)."),
    per_head: bool = typer.Option(True, "--per-head/--per-projection", help="Q/K/V of each head as separate blocks (default), or one block per projection."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder or id (default: the model's)."),
    text_field: str = typer.Option("text", help="Field with the text."),
    prompt_field: str = typer.Option("prompt", help="Field with the prompt (answer objective)."),
    answer_field: str = typer.Option("answer", help="Field with the answer (answer objective)."),
    label_field: str = typer.Option("label", help="Field with the class id (classification)."),
    max_length: Optional[int] = typer.Option(None, help="Longest sequence in tokens (default: the model's context)."),
    truncate: bool = typer.Option(False, help="Truncate over-long texts instead of failing."),
    generic: bool = typer.Option(False, help="Unregistered architecture: track every backbone linear layer."),
    device: str = typer.Option("cpu", help="Device, e.g. cuda or cuda:1."),
    dtype: Optional[ModelDtype] = typer.Option(None, "--dtype", help="Precision the model runs in: float32, bfloat16 or float16 (default: the checkpoint's own); activations are cast to float32 per layer before any product."),
    stats_dtype: SumDtype = typer.Option(SumDtype.auto, "--stats-dtype", help="Covariance and Λ sums: float32, float64, or auto (float32; float64 for a float64 model)."),
    factor_dtype: SumDtype = typer.Option(SumDtype.auto, "--factor-dtype", help="Stored eigenvectors: float32, float64 or auto (as --stats-dtype); the eigendecomposition itself is always float64."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Write the running sums to OUT.checkpoint every N batches; a killed fit rerun with the same command resumes there."),
    restart: bool = typer.Option(False, "--restart", help="Discard OUT.checkpoint of an interrupted fit and start over."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun: shard the model's weights across the ranks (FSDP2) for a model that does not fit one device (loaded on the CPU first)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace factors already in --out (without it an existing factor folder is refused; a folder holding anything else always is)."),
):
    """Fit EK-FAC (or K-FAC / diagonal / identity) curvature factors of MODEL on DATA."""
    from .. import api
    from ..curvature.fit import FitConfig

    try:  # settings first: a bad combination fails before the model is loaded
        cfg = FitConfig(objective=objective.value, strategy=strategy.value, modules=modules.value, per_head=per_head,
                        labels=labels.value, seed=seed, max_examples=max_examples, batch_size=batch_size,
                        stats_dtype=stats_dtype.value, generic=generic, samples=samples, refine=refine_basis,
                        factor_dtype=factor_dtype.value).validate()
        if checkpoint_every < 1:
            raise ValueError("--checkpoint-every must be ≥ 1")
    except ValueError as e:
        _fail(str(e))
    from ..atomic import prepare_out_dir

    prepare_out_dir(out, overwrite, "factors", marker="factors.json")  # before the model is loaded; again under the lock
    from ..data.examples import Fields
    from ..distributed import init
    from ..models.loading import load_model, load_tokenizer

    w, device = init(device)  # under torchrun: one process group, one device per rank
    task = "classification" if objective == Objective.classification else "causal_lm"
    # the checkpoint's dtype: the fingerprint is of those weights; with --fsdp on the CPU, sharded onto the device
    m = load_model(model, task=task, device="cpu" if fsdp else device)
    tok = load_tokenizer(tokenizer or model)
    fs = api.fit(
        m, str(data), out=out, tokenizer=tok, config=cfg, fields=Fields(text_field, prompt_field, answer_field, label_field),
        max_length=max_length, truncate=truncate, progress=progress, model_name=model, checkpoint_every=checkpoint_every,
        resume=not restart, dtype=dtype.value if dtype else None, device=device, fsdp=fsdp, overwrite=overwrite,
    )
    if not w.main:
        return
    console.print(
        f"[green]fitted[/] {strategy.value} factors for {len(fs.blocks)} blocks of {len(fs.modules)} layers on "
        f"{fs.n_examples_cov or fs.n_examples_lambda} examples ({fs.n_tokens} tokens, {fs.dtype}"
        f"{', resumed' if fs.meta.get('resumed') else ''}) → {out}"
    )


@app.command()
@user_errors
def index(
    corpus: Path = typer.Argument(..., help="Pre-training corpus: JSONL, Parquet or a saved `datasets` folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write the index to (atomically)."),
    model: Optional[str] = typer.Option(None, help="Sentence-Transformers model (default: the bundled all-MiniLM-L6-v2)."),
    index_type: str = typer.Option("auto", help="auto (exact below 50k documents, IVF above), flat, ivf or hnsw."),
    batch_size: int = typer.Option(128, help="Texts per embedding batch."),
    text_field: str = typer.Option("text", help="Field with the text."),
    id_field: str = typer.Option("id", help="Field with the document id (row numbers when absent)."),
    lexical: bool = typer.Option(False, help="Also build a BM25 index (in OUT/bm25)."),
    overwrite: bool = typer.Option(False, help="Replace an existing index in OUT."),
    device: Optional[str] = typer.Option(None, help="Device for the embedding model."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Embed CORPUS (streamed) into a persisted FAISS index for candidate selection."""
    from ..distributed import init
    from ..retrieval import BM25Index, build_index

    if batch_size < 1:  # before anything is opened or written (a .OUT.partial/ was left behind)
        _fail(f"--batch-size must be ≥ 1, not {batch_size}")
    w, dev = init(device or "cpu")  # under torchrun: the ranks embed blocks of rows in turn, rank 0 writes
    if device is not None:
        device = dev
    elif w.active:
        import torch

        device = f"cuda:{w.local_rank}" if torch.cuda.is_available() else "cpu"
    idx = build_index(str(corpus), out, model=model, index_type=index_type, batch_size=batch_size, text_field=text_field,
                      id_field=id_field, progress=progress, overwrite=overwrite, device=device)
    if not w.main:
        return
    if lexical:
        from ..data.corpus import Corpus

        bm = BM25Index.build(Corpus(str(corpus), text_field=text_field, id_field=id_field))
        bm.save(out / "bm25", overwrite=True)
    console.print(f"[green]indexed[/] {len(idx)} documents → {out}")
