"""`msif index` and `msif attribute` end to end on locally saved tiny checkpoints."""

from __future__ import annotations

import json

import pytest

from test_cli_fit import SENTENCES, checkpoint, run, run_json  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def fitted(checkpoint, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("factors")
    assert run("fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", d / "pt", "--no-progress")[0] == 0
    assert run("fit", checkpoint / "other", checkpoint / "qa.jsonl", "--out", d / "ft", "--objective", "answer", "--no-progress")[0] == 0
    assert run("fit", checkpoint / "cls", checkpoint / "cls.jsonl", "--out", d / "cls", "--objective", "classification", "--no-progress")[0] == 0
    return d


def _attr_args(checkpoint, fitted, *extra, finetuned="other", fft="ft"):  # noqa: F811
    return ("attribute", "--pretrained", checkpoint / "lm", "--finetuned", checkpoint / finetuned,
            "--pretrained-factors", fitted / "pt", "--finetuned-factors", fitted / fft,
            "--corpus", checkpoint / "lm.jsonl", *extra)


def _attr(checkpoint, fitted, *extra, finetuned="other", fft="ft"):  # noqa: F811
    return run("attribute", "--pretrained", checkpoint / "lm", "--finetuned", checkpoint / finetuned,
               "--pretrained-factors", fitted / "pt", "--finetuned-factors", fitted / fft,
               "--corpus", checkpoint / "lm.jsonl", *extra)


def test_attribute_json_carries_corpus_ids(checkpoint, fitted):  # noqa: F811
    (q,) = run_json(*_attr_args(checkpoint, fitted, "--prompt", "what is the capital of france", "--answer", " paris", "--top", 3, "--json"))
    assert q["answer"] == " paris" and q["method"] == "ms-if" and len(q["results"]) == 3
    ids = [h["doc_id"] for h in q["results"]]
    assert all(i.startswith("d") for i in ids) and len(set(ids)) == 3
    scores = [h["score"] for h in q["results"]]
    assert scores == sorted(scores, reverse=True)
    h = q["results"][0]
    assert len(h["tokens"]) == len(h["token_scores"]) and abs(sum(h["token_scores"]) - h["score"]) < 1e-3 * max(1, abs(h["score"]))
    assert set(q["role_share"]) == {"mlp", "attention"}


def test_attribute_table_with_index_and_generated_answer(checkpoint, fitted, tmp_path):  # noqa: F811
    code, out = run("index", checkpoint / "lm.jsonl", "--out", tmp_path / "idx", "--no-progress")
    assert code == 0, out
    code, out = _attr(checkpoint, fitted, "--index", tmp_path / "idx", "--candidates", 4, "--prompt", "berlin is in", "--top", 2)
    assert code == 0, out
    assert "(generated)" in out and "rank" in out
    res = run_json(*_attr_args(checkpoint, fitted, "--index", tmp_path / "idx", "--method", "embedding", "--prompt", "capital of spain", "--answer", " madrid", "--json"))
    assert res[0]["results"][0]["doc_id"] == "d1"  # "the capital of spain is madrid"


def test_attribute_many_queries_and_methods(checkpoint, fitted, tmp_path):  # noqa: F811
    qf = tmp_path / "q.jsonl"
    qf.write_text(json.dumps({"id": "q1", "prompt": "berlin is in", "answer": " germany"}) + "\n"
                  + json.dumps({"id": "q2", "prompt": "what is the capital of france", "answer": " paris"}) + "\n")
    for method in ("ms-if", "ss-if", "gdp", "repsim", "bm25", "tfidf"):
        res = run_json(*_attr_args(checkpoint, fitted, "--queries", qf, "--method", method, "--top", 2, "--json"))
        assert [r["query_id"] for r in res] == ["q1", "q2"]


def test_attribute_classification_finetune(checkpoint, fitted):  # noqa: F811
    res = run_json(*_attr_args(checkpoint, fitted, "--prompt", "berlin is in germany", "--top", 2, "--json", finetuned="cls", fft="cls"))
    assert res[0]["label"] in (0, 1)
    code, out = _attr(checkpoint, fitted, "--prompt", "berlin is in germany", "--method", "ss-if", finetuned="cls", fft="cls")
    assert code == 2 and "classification head" in out


def test_attribute_errors(checkpoint, fitted):  # noqa: F811
    code, out = _attr(checkpoint, fitted)
    assert code == 2 and "--prompt" in out
    code, out = run("attribute", "--pretrained", checkpoint / "lm", "--finetuned", checkpoint / "other", "--corpus", checkpoint / "lm.jsonl", "--prompt", "x")
    assert code == 2 and "--finetuned-factors" in out
    # factors swapped: pt factors given as ft factors are refused by fingerprint
    code, out = run("attribute", "--pretrained", checkpoint / "lm", "--finetuned", checkpoint / "other",
                    "--pretrained-factors", fitted / "pt", "--finetuned-factors", fitted / "pt",
                    "--corpus", checkpoint / "lm.jsonl", "--prompt", "berlin is in", "--answer", " germany")
    assert code == 2 and "fitted on model" in out


def test_attribute_all_documents_streamed_to_resumable_shards(checkpoint, fitted, tmp_path):  # noqa: F811
    q = ("--prompt", "what is the capital of france", "--answer", " paris", "--top", 3, "--json", "--no-progress")
    ref = run_json(*_attr_args(checkpoint, fitted, *q))  # --retriever auto: every document of the small corpus
    args = _attr_args(checkpoint, fitted, *q, "--retriever", "all", "--chunk-size", 3, "--scores-out", tmp_path / "s")
    first = run_json(*args)
    assert [h["doc_id"] for h in first[0]["results"]] == [h["doc_id"] for h in ref[0]["results"]]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["n_docs"] == 6 and len(manifest["shards"]) == 2 and manifest["dtype"] == "float32"
    assert manifest["queries"][0]["answer"] == " paris" and manifest["inputs"]["chunk_size"] == 3
    (tmp_path / "s" / manifest["shards"][1]).unlink()  # as if killed before the second chunk was written
    assert run_json(*args) == first
    code, out = run(*_attr_args(checkpoint, fitted, *q, "--retriever", "all", "--chunk-size", 3, "--scores-out", tmp_path / "s",
                                "--damping-pt", "1e-2"))
    assert code == 2 and "dampings changed" in out and "new --scores-out folder" in out


def test_attribute_max_memory_low_rank_and_dtype(checkpoint, fitted):  # noqa: F811
    from msif.influence.scoring import query_vector_elements
    from msif.models.adapters import tracked_modules
    from msif.models.loading import load_model

    dense = query_vector_elements(tracked_modules(load_model(checkpoint / "lm"))) * 4  # float32 vectors
    q = ("--prompt", "berlin is in", "--answer", " germany", "--top", 2, "--no-progress")
    code, out = run(*_attr_args(checkpoint, fitted, *q, "--max-memory", dense // 2))
    assert code == 0, out
    assert "over --max-memory" in out and "low-rank query vectors of rank" in out
    code, out = run(*_attr_args(checkpoint, fitted, *q, "--max-memory", "lots"))
    assert code == 2 and "--max-memory must be a size" in out
    code, out = run(*_attr_args(checkpoint, fitted, *q, "--dtype", "bfloat16", "--json"))
    assert code == 0, out
    code, out = run(*_attr_args(checkpoint, fitted, *q, "--dtype", "int8"))
    assert code == 2 and "--dtype must be" in out


def test_attribute_refine_query(checkpoint, fitted, tmp_path):  # noqa: F811
    """--refine-query K: K = 0 is EK-FAC exactly; K > 0 changes the scores, reports its cost per stage,
    finds each stage's data where its factors were fitted (or takes --pretrained-data / --finetuned-data)."""
    q = ("--prompt", "what is the capital of france", "--answer", " paris", "--top", 5, "--json", "--no-progress")
    scores = lambda res: [(h["doc_id"], h["score"]) for h in res[0]["results"]]  # noqa: E731
    base = scores(run_json(*_attr_args(checkpoint, fitted, *q)))
    assert scores(run_json(*_attr_args(checkpoint, fitted, *q, "--refine-query", 0))) == base
    refined = scores(run_json(*_attr_args(checkpoint, fitted, *q, "--refine-query", 3)))
    assert refined != base and len(refined) == 5
    explicit = scores(run_json(*_attr_args(checkpoint, fitted, *q, "--refine-query", 3, "--pretrained-data", checkpoint / "lm.jsonl",
                                           "--finetuned-data", checkpoint / "qa.jsonl")))
    assert [d for d, _ in explicit] == [d for d, _ in refined]
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for (_, a), (_, b) in zip(explicit, refined))
    code, out = _attr(checkpoint, fitted, *q[:-2], "--refine-query", 2)
    assert code == 0, out
    assert "refined query vectors (ft, 2 CG steps" in out and "refined query vectors (pt, 2 CG steps" in out
    code, out = _attr(checkpoint, fitted, *q, "--refine-query", -1)
    assert code == 2 and "--refine-query must be ≥ 0" in out
    code, out = _attr(checkpoint, fitted, *q, "--refine-query", 1, "--pretrained-data", tmp_path / "nope.jsonl")
    assert code == 2 and "no such file" in out


def test_attribute_bad_options_are_one_line(checkpoint, fitted, tmp_path):  # noqa: F811
    q = ("--prompt", "berlin is in", "--answer", " germany")
    for extra, msg in (
        (("--damping-pt", "-1"), "--damping-pt must be a finite number"), (("--damping-ft", "nan"), "--damping-ft must be"),
        (("--damping-pt", "inf"), "--damping-pt must be"), (("--damping-pt", "abc"), "--damping-pt must be"),
        (("--damping-pt", "0.1y"), "--damping-pt must be"), (("--batch-size", 0), "--batch-size must be ≥ 1"),
        (("--top", -3), "--top must be ≥ 1"), (("--top", 0), "--top must be ≥ 1"), (("--candidates", 0), "--candidates must be ≥ 1"),
        (("--candidates", -5), "--candidates must be ≥ 1"), (("--max-length", 400), "longer than the pre-trained model's context"),
    ):
        code, out = _attr(checkpoint, fitted, *q, *extra)
        assert code == 2 and msg in out and "Traceback" not in out, (extra, out)
    code, out = _attr(checkpoint, fitted, "--prompt", "berlin \ud800 is in", "--answer", " germany")
    assert code == 2 and "--prompt holds a character that is not valid text" in out
    code, out = _attr(checkpoint, fitted, *q, "--damping-pt", "0", "--top", 2)
    assert "warning: --damping-pt 0" in out and "Traceback" not in out, out  # (here the inverse then does not exist: one more line)
    code, out = run("index", checkpoint / "lm.jsonl", "--out", tmp_path / "idx", "--batch-size", 0)
    assert code == 2 and "--batch-size must be ≥ 1" in out and not list(tmp_path.iterdir())


def test_console_table_escapes_control_characters(capsys):
    from msif.report.console import print_results

    print_results([{"method": "gdp", "prompt": "p", "answer": " a", "results": [
        {"rank": 1, "doc_id": "d\x1b]0;pwned\x07", "score": 1.0, "text": "x\x1b[2Jy"}]}])
    out = capsys.readouterr().out
    assert "\x1b]0" not in out and "\x1b[2J" not in out and "\\x1b" in out


def test_attribute_refuses_a_tokenizer_the_factors_were_not_fitted_with(checkpoint, fitted, tmp_path):  # noqa: F811
    """A tokenizer of another vocabulary, smaller than the embedding (so no size check can see it), is refused
    against the vocabulary fingerprint the factors recorded."""
    from test_cli_fit import SENTENCES
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(list(reversed(SENTENCES)) + ["zebra"], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"], vocab_size=12))
    other = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    other.save_pretrained(tmp_path / "tok")
    code, out = _attr(checkpoint, fitted, "--prompt", "berlin is in", "--answer", " germany", "--tokenizer", tmp_path / "tok")
    assert code == 2 and "fitted with another tokenizer" in out
