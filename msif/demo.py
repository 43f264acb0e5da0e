"""The demo: the whole pipeline on the bundled world (or on your own models), in one call.

Build or load the bundled world (a corpus of real facts, a tiny GPT-NeoX pre-trained on it and its
QA fine-tune), fit and cache both sets of EK-FAC factors and the embedding index, ask the fine-tuned
model a question, greedy-decode its answer, select candidates by embedding neighbours, rerank them by
the multi-stage influence, print the top documents and write a self-contained HTML report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_QUESTION = "What is the capital of Italy?"  # a held-out fact: never seen in fine-tuning


@dataclass
class Artifacts:
    """Cached, derived files of a world: factors of both models and the corpus embedding index."""

    pt_factors: Path
    ft_factors: Path
    index: Path


def build_artifacts(root: Path, pretrained: str, finetuned: str, tokenizer: str, corpus: str, finetune_data: str,
                    progress: bool = True, batch_size: int = 16, log=print) -> Artifacts:
    """Fit (once) the pre-training factors (LM loss on ``corpus``) and the fine-tuning factors (answer
    loss on ``finetune_data``, fields prompt/answer), and build (once) the corpus embedding index, all
    cached under ``root``. Every write is atomic, so a killed run rebuilds only what is missing."""
    from . import api
    from .retrieval import build_index

    art = Artifacts(root / "factors-pt", root / "factors-ft", root / "index")
    steps = [
        (art.pt_factors / "factors.json", "fitting EK-FAC factors of the pre-trained model on the corpus (LM loss)",
         lambda: api.fit(pretrained, corpus, out=art.pt_factors, tokenizer=tokenizer, objective="lm", batch_size=batch_size,
                         progress=progress)),
        (art.ft_factors / "factors.json", "fitting EK-FAC factors of the fine-tuned model on its QA data (answer tokens)",
         lambda: api.fit(finetuned, finetune_data, out=art.ft_factors, tokenizer=tokenizer, objective="answer",
                         batch_size=batch_size, progress=progress)),
        (art.index / "meta.json", "embedding the corpus (all-MiniLM-L6-v2) into a FAISS index",
         lambda: build_index(corpus, art.index, progress=progress, overwrite=True)),
    ]
    for done_marker, what, build in steps:
        if not done_marker.exists():
            t0 = time.perf_counter()
            log(what + " …")
            build()
            log(f"  done in {time.perf_counter() - t0:.0f} s")
    return art


def world_artifacts(world, progress: bool = True, batch_size: int = 16, log=print) -> Artifacts:
    """:func:`build_artifacts` for a bundled world, cached under ``<world>/artifacts``."""
    return build_artifacts(world.path / "artifacts", str(world.pretrained_dir), str(world.finetuned_dir), str(world.tokenizer_dir),
                           str(world.corpus_path), str(world.qa_finetune_path), progress, batch_size, log)


def _fact_for_question(world, question: str):
    q = question.strip().lower()
    for f in world.facts:
        if f.question.strip().lower() == q:
            return f
    return None


def run_demo(
    question: str | None = None,
    answer: str | None = None,
    out: str | Path = "runs/demo",
    top: int = 5,
    candidates: int = 50,
    method: str = "ms-if",
    damping_pt="0.1x",
    damping_ft="0.1x",
    size: str = "full",
    seed: int = 0,
    progress: bool = True,
    quiet: bool = False,
    pretrained: str | None = None,
    finetuned: str | None = None,
    corpus: str | None = None,
    finetune_data: str | None = None,
    tokenizer: str | None = None,
) -> dict:
    """Run the demo on the bundled world, or on your own models (``pretrained``, ``finetuned``,
    ``corpus`` and ``finetune_data`` together: factors and index are then cached under ``<out>/cache``);
    returns the result dict and writes ``<out>/report.html`` and ``<out>/result.json``."""
    import json

    from .data.corpus import Corpus
    from .influence.attribute import Attributor, Query
    from .report.html import write_report
    from .retrieval.candidates import query_text, select_candidates
    from .worldfacts import load_world

    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()
    out = Path(out)
    own = [pretrained, finetuned, corpus, finetune_data]
    if any(x is not None for x in own):
        if not all(x is not None for x in own):
            from .data.encoding import InputError

            raise InputError("to run the demo on your own models give --pretrained, --finetuned, --corpus and --finetune-data together")
        if question is None:
            from .data.encoding import InputError

            raise InputError("give the question to ask your fine-tuned model with --question (asked exactly as written)")
        world, fact, prompt = None, None, question
        tokenizer = tokenizer or pretrained
        art = build_artifacts(out / "cache", pretrained, finetuned, tokenizer, corpus, finetune_data, progress=progress, log=log)
        corpus_path = corpus
    else:
        world = load_world(seed=seed, size=size, progress=progress)
        art = world_artifacts(world, progress=progress, log=log)
        if question is None:
            question = DEFAULT_QUESTION
            if _fact_for_question(world, question) is None and world.test_facts:
                question = world.test_facts[0].question
        fact = _fact_for_question(world, question)
        prompt = world.qa_prompt(question)
        pretrained, finetuned, tokenizer = str(world.pretrained_dir), str(world.finetuned_dir), str(world.tokenizer_dir)
        corpus_path = str(world.corpus_path)
    att = Attributor(pretrained, finetuned, tokenizer,
                     pt_factors=art.pt_factors, ft_factors=art.ft_factors, damping_pt=damping_pt, damping_ft=damping_ft)
    (pq,) = att.prepare([Query(prompt, answer, id="demo")])
    log(f"\nQ: {question}\nA (fine-tuned model{', greedy' if pq.generated else ''}): {pq.answer!r}"
        + (f"   [known answer: {fact.answer!r}]" if fact is not None else ""))
    corpus = Corpus(corpus_path)
    (rows,) = select_candidates(corpus, [query_text(question, pq.answer)], candidates, index=art.index).rows
    res = att.attribute([pq], corpus, candidates=[rows], method=method, top=top)
    result = res.to_json()[0]
    result["prompt"] = question
    if fact is not None:
        result["gold"] = world.sources(fact.id)
        result["hard_negatives"] = world.hard_negatives(fact.id)
        result["expected"] = fact.answer
        result["gold_in_candidates"] = len(set(result["gold"]) & set(corpus.doc_ids(rows)))
    result["candidates"] = len(rows)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    notes = {"models": f"{Path(pretrained).name} → {Path(finetuned).name}", "candidates (embedding KNN)": len(rows), "pre-training documents": len(corpus)}
    if fact is not None:
        notes["sources of the fact among the candidates"] = f"{result['gold_in_candidates']} of {len(result['gold'])}"
    report = write_report(out / "report.html", [result], title="msif demo: which pre-training documents made the model say this?", notes=notes)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if not quiet:
        from .report.console import print_results

        print_results([result])
        if fact is not None:
            found = sum(h["doc_id"] in set(result["gold"]) for h in result["results"])
            print(f"{found} of the top {len(result['results'])} documents state the fact "
                  f"({result['gold_in_candidates']} of its {len(result['gold'])} source documents were among the {len(rows)} candidates).")
        print(f"HTML report: {report}   ({result['elapsed_s']} s)")
    result["report"] = str(report)
    return result
