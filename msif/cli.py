"""The ``msif`` command line: one entry point for the whole pipeline."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import click
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


def _fail(msg: str, code: int = 2):
    from .distributed import world

    w = world()
    who = "" if not w.active or msg.startswith(w.tag()) else f"{w.tag()}: "
    console.print(f"[bold red]error:[/] {who}{msg}")
    raise typer.Exit(code)


#: A write that failed for lack of room (disk full, quota, file-size limit) or of permission: the user's
#: to fix, and every msif output is written atomically, so the previous result is still in place.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS}


def _write_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.EACCES, errno.EROFS):
        return (f"cannot write{where}: {os.strerror(e.errno).lower()}; choose an output you may write to. "
                "Nothing was replaced and nothing partial was left.")
    return (f"the output could not be written{where}: {os.strerror(e.errno).lower()} (the disk, a quota or a file-size "
            "limit is full); free space or write elsewhere, then rerun. Any previous result was kept and nothing "
            "partial was left.")


def user_errors(fn):
    """Turn the library's input errors into one clear line and exit code 2 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        from .errors import MsifError

        try:
            return fn(*a, **k)
        except (MsifError, FileNotFoundError, FloatingPointError) as e:  # every failure msif expects
            _fail(str(e))
        except OSError as e:
            if e.errno not in _WRITE_ERRNOS:
                raise
            _fail(_write_error(e))
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception:  # not an input msif expects: a bug, with its traceback
            console.print("[bold red]msif hit an unexpected error: this is a bug; please report it with the command "
                          "line and the traceback below[/]")
            raise

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
    from . import api
    from .curvature.fit import FitConfig

    try:  # settings first: a bad combination fails before the model is loaded
        cfg = FitConfig(objective=objective.value, strategy=strategy.value, modules=modules.value, per_head=per_head,
                        labels=labels.value, seed=seed, max_examples=max_examples, batch_size=batch_size,
                        stats_dtype=stats_dtype.value, generic=generic, samples=samples, refine=refine_basis,
                        factor_dtype=factor_dtype.value).validate()
        if checkpoint_every < 1:
            raise ValueError("--checkpoint-every must be ≥ 1")
    except ValueError as e:
        _fail(str(e))
    from .atomic import prepare_out_dir

    prepare_out_dir(out, overwrite, "factors", marker="factors.json")  # before the model is loaded; again under the lock
    from .data.examples import Fields
    from .distributed import init
    from .models.loading import load_model, load_tokenizer

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
    from .distributed import init
    from .retrieval import BM25Index, build_index

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
        from .data.corpus import Corpus

        bm = BM25Index.build(Corpus(str(corpus), text_field=text_field, id_field=id_field))
        bm.save(out / "bm25", overwrite=True)
    console.print(f"[green]indexed[/] {len(idx)} documents → {out}")


class Method(str, Enum):
    ms_if = "ms-if"
    ss_if = "ss-if"
    gdp = "gdp"
    repsim = "repsim"
    bm25 = "bm25"
    tfidf = "tfidf"
    embedding = "embedding"


def _read_queries(prompt, answer, label, queries_file):
    from .data.corpus import iter_records
    from .data.encoding import InputError
    from .influence.attribute import Query

    if queries_file is not None:
        out = []
        for i, r in enumerate(iter_records(str(queries_file))):
            if "prompt" not in r:
                raise InputError(f"{queries_file} row {i} has no 'prompt' field")
            out.append(Query(r["prompt"], r.get("answer"), r.get("label"), str(r.get("id", i))))
        if not out:
            raise InputError(f"{queries_file} holds no queries")
        return out
    if prompt is None:
        raise InputError("give a query with --prompt TEXT [--answer TEXT], or many with --queries FILE.jsonl")
    return [Query(prompt, answer, label, "0")]


@app.command()
@user_errors
def attribute(
    pretrained: str = typer.Option(..., "--pretrained", help="Pre-trained model (θ_pt): checkpoint folder or hub id."),
    finetuned: str = typer.Option(..., "--finetuned", help="Fine-tuned model (θ_ft): causal LM or sequence classifier."),
    corpus: Path = typer.Option(..., "--corpus", help="Pre-training corpus (JSONL, Parquet, `datasets` folder)."),
    pretrained_factors: Optional[Path] = typer.Option(None, "--pretrained-factors", help="Factors of θ_pt (`msif fit --objective lm`)."),
    finetuned_factors: Optional[Path] = typer.Option(None, "--finetuned-factors", help="Factors of θ_ft (`msif fit --objective answer|classification`)."),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Embedding index of the corpus (`msif index`) for candidate selection."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The question asked to the fine-tuned model."),
    answer: Optional[str] = typer.Option(None, "--answer", help="The answer to attribute (default: greedy-decoded)."),
    label: Optional[int] = typer.Option(None, "--label", help="Class id for a classification fine-tune (default: predicted)."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="JSONL of queries (prompt, optional answer / label / id)."),
    method: Method = typer.Option(Method.ms_if, "--method", help="ms-if, ss-if, gdp, repsim, or the retrieval scores alone: bm25, tfidf, embedding."),
    candidates: int = typer.Option(100, "--candidates", help="K nearest neighbours to rerank per query."),
    top: int = typer.Option(10, "--top", help="Documents to show per query."),
    damping_pt: str = typer.Option("0.1x", "--damping-pt", help="λ_pt: absolute (1e-4) or relative to the mean eigenvalue (0.1x)."),
    damping_ft: str = typer.Option("0.1x", "--damping-ft", help="λ_ft: absolute or relative (0.1x)."),
    retriever: str = typer.Option("auto", help="Candidates without --index: auto (all documents of a small corpus), bm25, tfidf or all."),
    template: str = typer.Option("plain", help="Prompt template: plain or chat (the tokenizer's chat template)."),
    rank: Optional[int] = typer.Option(None, help="Low-rank query vectors (rank per block) for faster scoring."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer of θ_pt (default: the pre-trained model's)."),
    text_field: str = typer.Option("text", help="Corpus field with the text."),
    id_field: str = typer.Option("id", help="Corpus field with the document id."),
    batch_size: int = typer.Option(8, help="Candidates per forward/backward pass."),
    max_length: Optional[int] = typer.Option(None, help="Longest sequence in tokens (default: the model's context)."),
    truncate: bool = typer.Option(False, help="Truncate over-long documents instead of failing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of a table."),
    device: str = typer.Option("cpu", help="Device, e.g. cuda."),
    chunk_size: int = typer.Option(1024, "--chunk-size", help="Documents read, tokenised and scored at a time (memory does not grow with the corpus)."),
    scores_out: Optional[Path] = typer.Option(None, "--scores-out", help="Folder for the whole (queries × documents) score matrix: float32 shards + manifest.json; a rerun resumes from the finished shards."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Budget of the query vectors, e.g. 8GB (default: a quarter of the available RAM, or of the free CUDA memory); above it they become low-rank."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Scoring dtype of the candidate model: float32, bfloat16 or float16 (default: the checkpoint's); low precision is checked against float32 on 8 candidates."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (documents/s, ETA) on stderr."),
    refine_query: int = typer.Option(0, "--refine-query", help="Refine each query vector by K steps of EK-FAC-preconditioned CG per stage on the exact (full, not block-diagonal) GGN: K+1 GGN-vector products per query and stage over --gvp-examples examples."),
    pretrained_data: Optional[Path] = typer.Option(None, "--pretrained-data", help="Pre-training data for the GGN-vector products of --refine-query (default: where the pre-trained factors were fitted)."),
    finetuned_data: Optional[Path] = typer.Option(None, "--finetuned-data", help="Fine-tuning data for --refine-query (default: where the fine-tuned factors were fitted)."),
    gvp_examples: int = typer.Option(64, "--gvp-examples", help="Examples of each stage's data (the first N) in the GGN of --refine-query."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON (the --json shape) to this file, atomically: a killed or failed run leaves the previous file or none, never part of one."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file (without it an existing file is refused)."),
):
    """Rank pre-training documents by their influence on the fine-tuned model's answer."""
    opts = dict(locals())  # the options, passed whole to the body
    from .distributed import init

    _check_attribute_options(damping_pt=damping_pt, damping_ft=damping_ft, batch_size=batch_size, top=top,
                             candidates=candidates, max_length=max_length, prompt=prompt, answer=answer)
    _check_out_file(out, overwrite)
    w, opts["device"] = init(device)  # under torchrun: the candidates are split across the ranks, rank 0 reports
    with contextlib.ExitStack() as held:
        if out is not None and w.main:  # a second writer of the same file fails now, not after the scoring
            from .atomic import OutputLock

            held.enter_context(OutputLock(out, "msif attribute"))
        _attribute(w, **opts)


def _attribute(w, *, pretrained, finetuned, corpus, pretrained_factors, finetuned_factors, index_dir, prompt, answer,
               label, queries, method, candidates, top, damping_pt, damping_ft, retriever, template, rank, tokenizer,
               text_field, id_field, batch_size, max_length, truncate, as_json, device, chunk_size, scores_out, max_memory,
               dtype, progress, refine_query, pretrained_data, finetuned_data, gvp_examples, out, overwrite):
    """The body of `msif attribute` once its options are checked and its --out file is locked."""
    from .data.corpus import Corpus
    from .data.encoding import InputError
    from .influence.attribute import Attributor
    from .report.console import print_results

    qs = _read_queries(prompt, answer, label, queries)
    corp = Corpus(str(corpus), text_field=text_field, id_field=id_field)
    if method in (Method.ms_if, Method.ss_if) and finetuned_factors is None:
        raise InputError(f"--method {method.value} needs --finetuned-factors (fit them with `msif fit FINETUNED DATA --objective answer`)")
    if method == Method.ms_if and pretrained_factors is None:
        raise InputError("--method ms-if needs --pretrained-factors (fit them with `msif fit PRETRAINED CORPUS --objective lm`)")
    from .models.loading import load_tokenizer

    from .influence.stream import default_max_memory, parse_bytes
    from .models.loading import load_model

    if chunk_size < 1:
        raise InputError(f"--chunk-size must be ≥ 1, not {chunk_size}")
    budget = parse_bytes(max_memory) if max_memory is not None else default_max_memory(device)
    score_dtype = None
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
        import torch

        score_dtype = getattr(torch, dtype)
    ft_tok = None
    if (Path(finetuned) / "tokenizer_config.json").exists():
        ft_tok = load_tokenizer(finetuned)
    # loaded in the checkpoints' dtype (the factors' fingerprints are of those weights); --dtype casts the
    # candidate model once the query vectors exist. One model when both paths are the same checkpoint.
    pt_model = load_model(pretrained, task="causal_lm", device=device)
    same = Path(pretrained).exists() and Path(finetuned).exists() and Path(pretrained).resolve() == Path(finetuned).resolve()
    ft_model = pt_model if same or pretrained == finetuned else load_model(finetuned, task="auto", device=device)
    att = Attributor(
        pt_model, ft_model, tokenizer or pretrained,
        pt_factors=str(pretrained_factors) if pretrained_factors and method == Method.ms_if else None,
        ft_factors=str(finetuned_factors) if finetuned_factors and method in (Method.ms_if, Method.ss_if) else None,
        ft_tokenizer=ft_tok, damping_pt=damping_pt, damping_ft=damping_ft, template=template, batch_size=batch_size,
        max_length=max_length, truncate=truncate, device=device, refine_query=refine_query,
        pretrained_data=pretrained_data, finetuned_data=finetuned_data, gvp_examples=gvp_examples,
    )
    prepared = att.prepare(qs)
    from .retrieval.candidates import query_text, select_candidates

    if method.value in ("bm25", "tfidf"):  # the retrieval scores alone
        kind, index = method.value, None
    elif index_dir is not None:  # the embedding index, whatever --retriever says
        kind, index = "embedding", index_dir
    else:
        kind, index = ("embedding" if method.value == "embedding" else retriever), None
    found = select_candidates(corp, [query_text(p.query.prompt, p.answer) for p in prepared], candidates, index, kind)
    cand_rows, retr_scores = found.rows, found.scores
    if method.value in ("bm25", "tfidf", "embedding"):
        results = []
        for qi, p in enumerate(prepared):
            rows, sc = cand_rows[qi][:top], retr_scores[qi][:top]
            results.append(dict(prompt=p.query.prompt, answer=p.answer, label=p.label, generated=p.generated, method=method.value,
                                query_id=p.query.id, results=[dict(rank=i + 1, doc_id=d, row=r, score=float(s), text=t) for i, (d, r, s, t) in
                                                             enumerate(zip(corp.doc_ids(rows), rows, sc, corp.texts(rows)))]))
    else:
        res = att.attribute(prepared, corp, candidates=cand_rows, method=method.value, top=top, rank=rank, chunk_size=chunk_size,
                            scores_out=scores_out, max_memory=budget, dtype=score_dtype, release=True, progress=progress,
                            log=lambda m: console.print(m, markup=False, highlight=False))
        if res is None:  # not rank 0: its share is merged there
            return
        results = res.to_json()
        _report_refinement(att.refine_summary())
    if not w.main:
        return
    if as_json or out is not None:
        try:
            text = json.dumps(results, indent=1, allow_nan=False)
        except ValueError:
            _fail("some scores are NaN or infinite (check the models' weights for NaN); nothing printed or written")
        if out is not None:
            from .atomic import atomic_write_text

            atomic_write_text(out, text + "\n")
        if as_json:
            print(text)
            return
    print_results(results)


def _check_out_file(out: Path | None, overwrite: bool) -> None:
    """`msif attribute --out FILE`: refused before any work when it is a folder, or a file without --overwrite."""
    if out is None:
        return
    if out.is_dir():
        _fail(f"--out {str(out)!r} is a folder; give a file name for the results (e.g. {str(out / 'results.json')!r})")
    if out.exists() and not overwrite:
        _fail(f"--out {str(out)!r} already exists; pass --overwrite to replace it, or choose another file")


def _check_attribute_options(damping_pt, damping_ft, batch_size, top, candidates, max_length, prompt, answer) -> None:
    """The options of `msif attribute` that can be judged before anything is loaded: one line each."""
    from .curvature.factors import Damping

    for flag, d in (("--damping-pt", damping_pt), ("--damping-ft", damping_ft)):
        try:
            v = Damping.parse(d)
        except ValueError:
            _fail(f"{flag} must be a finite number ≥ 0 (absolute, e.g. 1e-4) or a multiple of the mean eigenvalue "
                  f"(e.g. 0.1x), not {d!r}")
        if v.value == 0:
            console.print(f"[yellow]warning:[/] {flag} 0: an undamped inverse amplifies the curvature's smallest "
                          "directions without bound; rankings are then dominated by noise (try 0.1x)")
    for flag, v in (("--batch-size", batch_size), ("--top", top), ("--candidates", candidates)):
        if v < 1:
            _fail(f"{flag} must be ≥ 1, not {v}")
    if max_length is not None and max_length < 2:
        _fail(f"--max-length must be ≥ 2 tokens, not {max_length}")
    for flag, text in (("--prompt", prompt), ("--answer", answer)):
        if text is not None:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                _fail(f"{flag} holds a character that is not valid text ({e.reason} at position {e.start}); fix the input")


def _report_refinement(summary: dict | None) -> None:
    """One line per stage on stderr: what --refine-query cost per query and how far CG got."""
    if not summary:
        return
    for stage, s in summary["stages"].items():
        console.print(f"refined query vectors ({stage}, {summary['iterations']} CG steps, {s['gvp_examples']} examples): "
                      f"{s['products_per_query']:.0f} GGN-vector products and {s['seconds_per_query']:.2f} s per query "
                      f"({s['train_steps_per_query']:.1f} training steps over the sample); largest relative residual "
                      f"{s['max_relative_residual']:.2e}", markup=False, highlight=False)


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
    from .demo import run_demo

    run_demo(question=question, answer=answer, out=out, top=top, candidates=candidates, method=method,
             damping_pt=damping_pt, damping_ft=damping_ft, size=size, progress=progress, pretrained=pretrained,
             finetuned=finetuned, corpus=corpus, finetune_data=finetune_data, tokenizer=tokenizer)


bench_app = typer.Typer(help="Experiments of the paper (fact tracing, scalability).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("fact-tracing")
@user_errors
def bench_fact_tracing(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="Tiny world, smaller candidate sets, 2 trials unless --trials (minutes)."),
    out: Path = typer.Option(Path("runs/fact-tracing"), "--out", help="Folder for fact_tracing.json/.md/.png and the cache."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials (query subsets, pools, label-sampling seeds); default 3 (quick: 2)."),
    queries: Optional[int] = typer.Option(None, "--queries", help="Queries per trial (default 150; all test facts when fewer)."),
    size: Optional[str] = typer.Option(None, "--size", help="World size preset (default: full; quick: tiny)."),
    world: str = typer.Option("standard", "--world", help="World variant: standard, or hard (sources by alias and reworded, negated near-misses)."),
    k_candidates: Optional[int] = typer.Option(None, "--candidates", help="Embedding nearest neighbours per query (default 100; quick: 50)."),
    pool_size: Optional[int] = typer.Option(None, "--pool", help="Fixed rerank pool size (default 100; quick: 50)."),
    dampings: Optional[str] = typer.Option(None, "--dampings", help="Comma-separated dampings: absolute (default 1e-8,...,1e-2) or relative to each factor set's mean eigenvalue (0.01x,0.1x,1x)."),
    classification: bool = typer.Option(True, "--classification/--no-classification", help="Also trace the classification fine-tune."),
    refine_basis: int = typer.Option(0, "--refine-basis", help="Basis-refinement passes of every EK-FAC fit (as in msif fit)."),
    refine_query: int = typer.Option(0, "--refine-query", help="CG steps per stage refining every MS-IF / SS-IF query vector on the full GGN (as in msif attribute)."),
    gvp_examples: int = typer.Option(64, "--gvp-examples", help="Examples of each stage's data in the GGN of --refine-query."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder for factors and the index (default: OUT/cache)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Fact tracing (paper §5.3): MRR / Recall@10 of MS-IF, SS-IF, GDP, RepSim, BM25 and embeddings over dampings."""
    from dataclasses import replace

    from .eval.fact_tracing import FactTracingConfig, quick_config, run_fact_tracing, write_outputs

    cfg = quick_config() if quick else FactTracingConfig()
    over = {"threads": threads, "classification": classification, "refine": refine_basis, "refine_query": refine_query,
            "gvp_examples": gvp_examples, "world": world}
    from .worldfacts.build import WORLDS

    if world not in WORLDS:
        _fail(f"--world must be one of {', '.join(WORLDS)}, not {world!r}")
    if refine_query < 0 or gvp_examples < 1:
        _fail("--refine-query must be ≥ 0 and --gvp-examples ≥ 1")
    for name, v in (("trials", trials), ("n_queries", queries), ("size", size), ("k_candidates", k_candidates),
                    ("pool_size", pool_size)):
        if v is not None:
            over[name] = v
    if dampings:
        from .curvature.damping import Damping

        try:
            parsed = [Damping.parse(x) for x in dampings.split(",") if x.strip()]
        except ValueError:
            _fail(f"--dampings must be comma-separated numbers ≥ 0 (absolute) or multiples like 0.1x (relative), not {dampings!r}")
        if not parsed or len({d.relative for d in parsed}) > 1:
            _fail("--dampings: give absolute values or relative ones (0.1x), not both")
        over["dampings"] = tuple(d.to_json() for d in parsed)
    if over.get("trials", 1) < 1 or over.get("n_queries", 1) < 1:
        _fail("--trials and --queries must be ≥ 1")
    cfg = replace(cfg, **over)
    res = run_fact_tracing(cfg, cache_dir=cache or out / "cache", progress=progress)
    paths = write_outputs(res, out)
    console.print(f"[green]fact tracing[/] done in {res['timings_s']['total']:.1f}s → "
                  + ", ".join(str(p) for p in paths.values()))
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["timings_s"].items()))
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    else:
        console.print(paths["markdown"].read_text(), markup=False, highlight=False)


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
    from .eval.proximity import markdown, proximity_from_paths, write_outputs

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


def _check_bench_options(world: str, damping: str) -> None:
    """The options every counterfactual benchmark shares: the world variant and the damping."""
    from .curvature.factors import Damping
    from .worldfacts.build import WORLDS

    if world not in WORLDS:
        _fail(f"--world must be one of {', '.join(WORLDS)}, not {world!r}")
    try:
        Damping.parse(damping)
    except ValueError:
        _fail(f"--damping must be a finite number ≥ 0 or a multiple of the mean eigenvalue (0.1x), not {damping!r}")


def _report_bench(label: str, res: dict, paths: dict, seconds: float, json_out: bool) -> None:
    """Where a benchmark wrote its outputs, then its JSON (``--json``) or its markdown table."""
    console.print(f"[green]{label}[/] done in {seconds:.1f}s → " + ", ".join(str(p) for p in paths.values()))
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    else:
        console.print(paths["markdown"].read_text(), markup=False, highlight=False)


@bench_app.command("tail-patch")
@user_errors
def bench_tail_patch(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="Tiny world, k ∈ {1, 3}, 2 trials, 3 groups (a minute or two)."),
    out: Path = typer.Option(Path("runs/tail-patch"), "--out", help="Folder for tail_patch.json/.md/.png and the cache."),
    world: str = typer.Option("standard", "--world", help="World variant: standard or hard."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials (query subsets, groupings, random documents, fit seeds); default 3 (quick: 2)."),
    queries: Optional[int] = typer.Option(None, "--queries", help="Test facts per trial (default 100; all when fewer)."),
    ks: Optional[str] = typer.Option(None, "--k", help="Comma-separated documents patched per query (default 3,10; quick: 1,3)."),
    step: Optional[float] = typer.Option(None, "--step", help="Size of each query's patch, as a fraction of ‖θ_pt‖ (default 0.003), along the negative gradient of its documents' loss."),
    groups: Optional[int] = typer.Option(None, "--groups", help="Query groups per trial: one patched fine-tune per (method, k, group)."),
    damping: str = typer.Option("0.1x", "--damping", help="λ of MS-IF / SS-IF (both stages), absolute or relative (0.1x)."),
    workers: int = typer.Option(2, "--workers", help="Processes re-fine-tuning in parallel (one thread each)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder for factors and the index (default: OUT/cache)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads for the rankings."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Multi-stage tail-patch: patch θ_pt on each method's top-k documents, redo the fine-tuning, measure Δ log p(answer)."""
    from dataclasses import replace

    from .eval.tail_patch import TailPatchConfig, quick_config, run_tail_patch, write_outputs

    _check_bench_options(world, damping)
    over: dict = {"world": world, "workers": workers, "threads": threads}
    if ks is not None:
        try:
            over["ks"] = tuple(sorted({int(x) for x in ks.split(",") if x.strip()}))
        except ValueError:
            _fail(f"--k must be comma-separated whole numbers ≥ 1, not {ks!r}")
        if not over["ks"] or over["ks"][0] < 1:
            _fail(f"--k must be comma-separated whole numbers ≥ 1, not {ks!r}")
    for flag, name, v, lo in (("--trials", "trials", trials, 1), ("--queries", "n_queries", queries, 2), ("--groups", "groups", groups, 2),
                              ("--workers", "workers", workers, 1)):
        if v is not None:
            if v < lo:
                _fail(f"{flag} must be ≥ {lo}, not {v}")
            over[name] = v
    if step is not None:
        if not (0 < step < float("inf")):
            _fail(f"--step must be a finite number > 0 (a fraction of ‖θ_pt‖, e.g. 0.003), not {step}")
        over["step"] = step
    over["damping"] = damping
    cfg = replace(quick_config() if quick else TailPatchConfig(), **over)
    res = run_tail_patch(cfg, cache_dir=cache or out / "cache", progress=progress)
    _report_bench("tail-patch", res, write_outputs(res, out), res["timings_s"]["total"], json_out)


@bench_app.command("ms-lds")
@user_errors
def bench_ms_lds(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="16 subsets instead of 64 (a minute or two)."),
    out: Path = typer.Option(Path("runs/ms-lds"), "--out", help="Folder for ms_lds.json/.md/.png and the cache."),
    world: str = typer.Option("standard", "--world", help="World variant: standard or hard."),
    size: str = typer.Option("tiny", "--size", help="World size preset (every subset is pre-trained and fine-tuned anew: keep it small)."),
    subsets: Optional[int] = typer.Option(None, "--subsets", help="Random subsets of the pre-training corpus (default 64; quick: 16)."),
    fraction: float = typer.Option(0.5, "--fraction", help="Share of the corpus in each subset."),
    damping: str = typer.Option("0.1x", "--damping", help="λ of MS-IF / SS-IF (both stages), absolute or relative (0.1x)."),
    workers: int = typer.Option(2, "--workers", help="Processes retraining in parallel (one thread each)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder for factors (default: OUT/cache)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads for the scores."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Multi-stage LDS: pre-train on random halves of the corpus, fine-tune each the same way, correlate the query losses with each method's summed scores."""
    from dataclasses import replace

    from .eval.ms_lds import MSLDSConfig, quick_config, run_ms_lds, write_outputs
    from .worldfacts.build import SIZES

    _check_bench_options(world, damping)
    if size not in SIZES:
        _fail(f"--size must be one of {', '.join(SIZES)}, not {size!r}")
    if subsets is not None and subsets < 3:
        _fail(f"--subsets must be ≥ 3 (a correlation over subsets), not {subsets}")
    if not 0 < fraction < 1:
        _fail(f"--fraction must be between 0 and 1 (exclusive), not {fraction}")
    if workers < 1:
        _fail(f"--workers must be ≥ 1, not {workers}")
    over = {"world": world, "size": size, "fraction": fraction, "damping": damping, "workers": workers, "threads": threads}
    if subsets is not None:
        over["n_subsets"] = subsets
    cfg = replace(quick_config() if quick else MSLDSConfig(), **over)
    res = run_ms_lds(cfg, cache_dir=cache or out / "cache", progress=progress)
    _report_bench("ms-lds", res, write_outputs(res, out), res["cost"]["total_s"], json_out)


@bench_app.command("scalability")
@user_errors
def bench_scalability(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="Test-sized study (hidden 8, 4 queries x 100 candidates; minutes)."),
    out: Path = typer.Option(Path("runs/scalability"), "--out", help="Folder for results.json, table.md and the PNG plots."),
    lds: bool = typer.Option(False, "--lds", help="Also the linear datamodeling score (retraining on random halves; quick-sized)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Scalability study (paper §5.1, Table 1 / Figure 1): Spearman of EK-FAC and baselines against a CG ground truth."""
    import torch

    from .eval import scalability as sc

    torch.set_num_threads(max(1, threads))
    log = (lambda m: console.print(f"[dim]{m}[/]")) if progress else None
    res = sc.run(sc.QUICK if quick else sc.ScalabilityConfig(), progress=log)
    if lds:
        from .eval import lds as lds_mod

        res["lds"] = lds_mod.run(lds_mod.LDSConfig(), progress=log)
    paths = sc.write_outputs(res, out)
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1, default=float) + "\n")
    else:
        text = sc.markdown_table(res)
        if lds:
            text += "\n\n" + Path(paths["lds_table"]).read_text()
        console.print(text, markup=False, highlight=False)
    console.print(f"[green]scalability[/] done in {res['total_time_s']:.1f}s → " + ", ".join(paths.values()))


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
    from .data.encoding import InputError
    from .plan import PlanSettings, format_plan, run

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


def main():
    from .distributed import broken, exit_now, shutdown

    ok = False
    try:
        app()
    except SystemExit as e:
        if broken():  # a collective failed (its message is printed): leave without the group's destructors
            exit_now(e.code if isinstance(e.code, int) and e.code else 1)
        ok = e.code in (None, 0)
        raise
    finally:
        shutdown(success=ok)


if __name__ == "__main__":
    main()
