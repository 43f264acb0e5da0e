"""``msif attribute``: which pre-training documents made the fine-tuned model give this answer."""

from __future__ import annotations

import contextlib
import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .app import app, console
from .failures import _fail, user_errors


class Method(str, Enum):
    ms_if = "ms-if"
    ss_if = "ss-if"
    gdp = "gdp"
    repsim = "repsim"
    bm25 = "bm25"
    tfidf = "tfidf"
    embedding = "embedding"


def _read_queries(prompt, answer, label, queries_file):
    from ..data.corpus import iter_records
    from ..data.encoding import InputError
    from ..influence.attribute import Query

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
    from ..distributed import init

    _check_attribute_options(damping_pt=damping_pt, damping_ft=damping_ft, batch_size=batch_size, top=top,
                             candidates=candidates, max_length=max_length, prompt=prompt, answer=answer)
    _check_out_file(out, overwrite)
    w, opts["device"] = init(device)  # under torchrun: the candidates are split across the ranks, rank 0 reports
    with contextlib.ExitStack() as held:
        if out is not None and w.main:  # a second writer of the same file fails now, not after the scoring
            from ..atomic import OutputLock

            held.enter_context(OutputLock(out, "msif attribute"))
        _attribute(w, **opts)


def _attribute(w, *, pretrained, finetuned, corpus, pretrained_factors, finetuned_factors, index_dir, prompt, answer,
               label, queries, method, candidates, top, damping_pt, damping_ft, retriever, template, rank, tokenizer,
               text_field, id_field, batch_size, max_length, truncate, as_json, device, chunk_size, scores_out, max_memory,
               dtype, progress, refine_query, pretrained_data, finetuned_data, gvp_examples, out, overwrite):
    """The body of `msif attribute` once its options are checked and its --out file is locked."""
    from ..data.corpus import Corpus
    from ..data.encoding import InputError
    from ..influence.stream import default_max_memory, parse_bytes
    from ..retrieval.candidates import query_text, select_candidates

    qs = _read_queries(prompt, answer, label, queries)
    corp = Corpus(str(corpus), text_field=text_field, id_field=id_field)
    if method in (Method.ms_if, Method.ss_if) and finetuned_factors is None:
        raise InputError(f"--method {method.value} needs --finetuned-factors (fit them with `msif fit FINETUNED DATA --objective answer`)")
    if method == Method.ms_if and pretrained_factors is None:
        raise InputError("--method ms-if needs --pretrained-factors (fit them with `msif fit PRETRAINED CORPUS --objective lm`)")
    if chunk_size < 1:
        raise InputError(f"--chunk-size must be ≥ 1, not {chunk_size}")
    budget = parse_bytes(max_memory) if max_memory is not None else default_max_memory(device)
    score_dtype = _score_dtype(dtype)
    att = _attributor(pretrained, finetuned, tokenizer, device, method,
                      pt_factors=str(pretrained_factors) if pretrained_factors and method == Method.ms_if else None,
                      ft_factors=str(finetuned_factors) if finetuned_factors and method in (Method.ms_if, Method.ss_if) else None,
                      damping_pt=damping_pt, damping_ft=damping_ft, template=template, batch_size=batch_size,
                      max_length=max_length, truncate=truncate, refine_query=refine_query, pretrained_data=pretrained_data,
                      finetuned_data=finetuned_data, gvp_examples=gvp_examples)
    prepared = att.prepare(qs)
    if method.value in ("bm25", "tfidf"):  # the retrieval scores alone
        kind, index = method.value, None
    elif index_dir is not None:  # the embedding index, whatever --retriever says
        kind, index = "embedding", index_dir
    else:
        kind, index = ("embedding" if method.value == "embedding" else retriever), None
    found = select_candidates(corp, [query_text(p.query.prompt, p.answer) for p in prepared], candidates, index, kind)
    if method.value in ("bm25", "tfidf", "embedding"):
        results = _retrieval_results(prepared, corp, found, method.value, top)
    else:
        res = att.attribute(prepared, corp, candidates=found.rows, method=method.value, top=top, rank=rank, chunk_size=chunk_size,
                            scores_out=scores_out, max_memory=budget, dtype=score_dtype, release=True, progress=progress,
                            log=lambda m: console.print(m, markup=False, highlight=False))
        if res is None:  # not rank 0: its share is merged there
            return
        results = res.to_json()
        _report_refinement(att.refine_summary())
    if w.main:
        _emit(results, as_json, out)


def _score_dtype(dtype: str | None):
    """``--dtype`` of the candidate pass as a torch dtype (None: the checkpoint's own)."""
    from ..data.encoding import InputError

    if dtype is None:
        return None
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    import torch

    return getattr(torch, dtype)


def _attributor(pretrained: str, finetuned: str, tokenizer, device: str, method, **settings):
    """Both models, loaded in the checkpoints' dtype (the factors' fingerprints are of those weights;
    --dtype casts the candidate model once the query vectors exist; one model when both paths are the
    same checkpoint), and the :class:`~msif.influence.attribute.Attributor` over them."""
    from ..influence.attribute import Attributor
    from ..models.loading import load_model, load_tokenizer

    ft_tok = load_tokenizer(finetuned) if (Path(finetuned) / "tokenizer_config.json").exists() else None
    pt_model = load_model(pretrained, task="causal_lm", device=device)
    same = Path(pretrained).exists() and Path(finetuned).exists() and Path(pretrained).resolve() == Path(finetuned).resolve()
    ft_model = pt_model if same or pretrained == finetuned else load_model(finetuned, task="auto", device=device)
    return Attributor(pt_model, ft_model, tokenizer or pretrained, ft_tokenizer=ft_tok, device=device, **settings)


def _retrieval_results(prepared, corp, found, method: str, top: int) -> list[dict]:
    """The JSON of `--method bm25 / tfidf / embedding`: the retriever's own top documents and scores."""
    results = []
    for qi, p in enumerate(prepared):
        rows, sc = found.rows[qi][:top], found.scores[qi][:top]
        hits = [dict(rank=i + 1, doc_id=d, row=r, score=float(x), text=t)
                for i, (d, r, x, t) in enumerate(zip(corp.doc_ids(rows), rows, sc, corp.texts(rows)))]
        results.append(dict(prompt=p.query.prompt, answer=p.answer, label=p.label, generated=p.generated, method=method,
                            query_id=p.query.id, results=hits))
    return results


def _emit(results: list[dict], as_json: bool, out: Path | None) -> None:
    """The results as JSON on stdout (--json) and / or atomically in --out, else as a table."""
    from ..report.console import print_results

    if as_json or out is not None:
        try:
            text = json.dumps(results, indent=1, allow_nan=False)
        except ValueError:
            _fail("some scores are NaN or infinite (check the models' weights for NaN); nothing printed or written")
        if out is not None:
            from ..atomic import atomic_write_text

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
    from ..curvature.damping import Damping

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
