"""Approximate vector index: recall@100 against exact cosine search, and query speed-up, same run.

    python benchmarks/retrieval.py                      # 100k × 384 synthetic vectors, IVF defaults
    python benchmarks/retrieval.py --types ivf,hnsw     # also HNSW (slower to build)
    python benchmarks/retrieval.py --corpus my.jsonl --real-docs 5000   # real-sentence check on your corpus

The corpus is ``clustered_unit_vectors`` (msif.retrieval.synthetic: a hierarchical mixture with
low-rank local spread, normalised); queries are drawn from the same mixture but are *not* corpus
rows. The index is built with ``build_index_from_vectors`` (default settings: ``index_type="auto"``,
which is IVF at this size, with the build-time calibrated ``nprobe``), written to disk, loaded back
with ``load_index`` and searched with its stored defaults. Exact search is FAISS ``IndexFlatIP`` over
the same vectors with the same threads. Times are the best of ``--repeats`` runs of the whole query
batch. Prints one table; nothing is asserted.

A smaller real-sentence check follows: the first ``--real-docs`` texts of a corpus (default: the
bundled worldfacts corpus) are embedded with all-MiniLM-L6-v2, 10% are held out as queries, and an
IVF index (forced; ``auto`` would pick exact search at this size) is compared with exact search.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Smallest wall time of ``repeats`` calls of ``fn`` and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_synthetic(n: int, d: int, n_queries: int, k: int, types: list[str], repeats: int, seed: int) -> list[dict]:
    import faiss

    from msif.retrieval.index import build_index_from_vectors, load_index, recall_at_k
    from msif.retrieval.synthetic import clustered_unit_vectors

    t = time.perf_counter()
    allx = clustered_unit_vectors(n + n_queries, d, seed=seed)
    corpus, queries = allx[:n], allx[n:]
    print(f"generated {n} corpus + {n_queries} query vectors, d={d} in {time.perf_counter() - t:.1f}s")

    flat = faiss.IndexFlatIP(d)
    flat.add(corpus)
    t_exact, (ex_scores, ex_rows) = best_time(lambda: flat.search(queries, k), repeats)
    rand = float((corpus[:500] @ corpus[500:1000].T).mean())
    print(f"exact: top-1 cosine {ex_scores[:, 0].mean():.3f}, top-{k} cosine {ex_scores[:, -1].mean():.3f}, random pair {rand:.3f}")

    results = []
    for kind in types:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            build_index_from_vectors(corpus, os.path.join(tmp, "ix"), index_type=kind, seed=seed)
            t_build = time.perf_counter() - t
            vi = load_index(os.path.join(tmp, "ix"))
            t_approx, hits = best_time(lambda vi=vi: vi.search_vectors(queries, k), repeats)
            results.append(
                {
                    "index": vi.kind,
                    "params": vi.meta["index"]["params"],
                    "search": vi.search_params,
                    "calib_recall": vi.meta["index"]["calibration"].get("recall"),
                    "recall": recall_at_k(hits.rows, ex_rows),
                    "build_s": t_build,
                    "exact_ms": 1000 * t_exact,
                    "approx_ms": 1000 * t_approx,
                    "speedup": t_exact / t_approx,
                }
            )
    return results


def run_real(path: str, n_docs: int, n_queries: int, k: int, seed: int) -> dict:
    """Embed the first ``n_docs`` texts of a corpus; hold out ``n_queries`` of them as queries."""
    from msif.data.corpus import Corpus
    from msif.retrieval.embed import load_encoder
    from msif.retrieval.index import build_index_from_vectors, exact_topk, load_index, recall_at_k

    corpus = Corpus(path)
    n = min(n_docs + n_queries, len(corpus))
    texts = [t for b in corpus.iter_batches(1024, limit=n) for t in b.texts]
    enc = load_encoder()
    t = time.perf_counter()
    emb = enc.encode(texts, batch_size=64, progress=True)
    print(f"embedded {n} real texts in {time.perf_counter() - t:.1f}s")
    rng = np.random.default_rng(seed)
    qmask = np.zeros(n, bool)
    qmask[rng.choice(n, size=n_queries, replace=False)] = True
    docs, queries = emb[~qmask], emb[qmask]
    with tempfile.TemporaryDirectory() as tmp:
        build_index_from_vectors(docs, os.path.join(tmp, "ix"), index_type="ivf", model_name=enc.name, calibration_k=k)
        vi = load_index(os.path.join(tmp, "ix"))
        hits = vi.search_vectors(queries, k)
        _, ex = exact_topk(docs, queries, min(k, len(docs)))
        return {"n_docs": len(docs), "search": vi.search_params, "params": vi.meta["index"]["params"], "recall": recall_at_k(hits.rows, ex)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="corpus vectors")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--types", default="auto", help="comma-separated index types: auto, ivf, hnsw, flat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="real corpus (JSONL/Parquet/datasets) for the real-sentence check "
                   "(default: the bundled worldfacts corpus, ~4k short documents)")
    p.add_argument("--real-docs", type=int, default=1500)
    p.add_argument("--no-real", action="store_true", help="skip the real-sentence check")
    a = p.parse_args(argv)

    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs")
    res = run_synthetic(a.n, a.dim, a.queries, a.k, a.types.split(","), a.repeats, a.seed)
    print()
    print(f"{'index':6} {'params':34} {'search':16} {'calib':>6} {'recall@' + str(a.k):>10} {'build s':>8} {'exact ms':>9} {'approx ms':>10} {'speed-up':>9}")
    for r in res:
        print(
            f"{r['index']:6} {str(r['params']):34.34} {str(r['search']):16} {r['calib_recall'] or 1:6.3f} {r['recall']:10.4f} "
            f"{r['build_s']:8.1f} {r['exact_ms']:9.1f} {r['approx_ms']:10.1f} {r['speedup']:8.1f}x"
        )
    if not a.no_real:
        with tempfile.TemporaryDirectory() as tmp:
            path = a.corpus or worldfacts_corpus(tmp)
            if path is not None:
                r = run_real(path, a.real_docs, min(200, a.real_docs // 10), a.k, a.seed)
                print(
                    f"\nreal sentences ({a.corpus or 'worldfacts corpus'}, all-MiniLM-L6-v2): {r['n_docs']} docs, "
                    f"IVF {r['params']} {r['search']}: recall@{a.k} {r['recall']:.4f} on held-out documents as queries"
                )
    return 0


def worldfacts_corpus(tmp: str) -> str | None:
    """Write the bundled worldfacts pre-training corpus to ``tmp`` as JSONL (None if unavailable)."""
    try:
        from msif.worldfacts.corpus import build_corpus, write_corpus
    except ImportError as e:
        print(f"(real-sentence check skipped: {e})")
        return None
    cp, _ = write_corpus(build_corpus(0), tmp)
    return str(cp)


if __name__ == "__main__":
    sys.exit(main())
