"""`msif fit` end to end on a locally saved checkpoint, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, PreTrainedTokenizerFast
from typer.testing import CliRunner

from msif import api
from msif.cli import app
from msif.curvature.factors import FactorError, FactorSet

from helpers import neox_config

SENTENCES = [
    "the capital of france is paris", "the capital of spain is madrid", "berlin is in germany",
    "rome is the capital of italy", "lisbon is in portugal", "what is the capital of france",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = neox_config(vocab_size=len(tok), max_position_embeddings=16)
    GPTNeoXForCausalLM(cfg).save_pretrained(d / "lm")
    tok.save_pretrained(d / "lm")
    torch.manual_seed(1)
    GPTNeoXForCausalLM(cfg).save_pretrained(d / "other")
    tok.save_pretrained(d / "other")
    cls_cfg = neox_config(vocab_size=len(tok), max_position_embeddings=16, num_labels=2)
    GPTNeoXForSequenceClassification(cls_cfg).save_pretrained(d / "cls")
    tok.save_pretrained(d / "cls")
    lm = d / "lm.jsonl"
    lm.write_text("".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES)))
    qa = d / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "what is the capital of france", "answer": " paris"}) + "\n"
                  + json.dumps({"prompt": "berlin is in", "answer": " germany"}) + "\n")
    cl = d / "cls.jsonl"
    cl.write_text("".join(json.dumps({"text": s, "label": i % 2}) + "\n" for i, s in enumerate(SENTENCES)))
    return d


def run(*args):
    """Exit code and stdout + stderr of ``msif ARGS``."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def run_json(*args):
    """Exit code and the parsed JSON that ``msif ARGS --json`` prints on stdout."""
    import json as _json

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return _json.loads(r.stdout)


@pytest.mark.parametrize("objective,data,model", [("lm", "lm.jsonl", "lm"), ("answer", "qa.jsonl", "lm"), ("classification", "cls.jsonl", "cls")])
def test_fit_cli_writes_loadable_factors(checkpoint, tmp_path, objective, data, model):
    code, out = run("fit", checkpoint / model, checkpoint / data, "--out", tmp_path / "f", "--objective", objective,
                    "--batch-size", 2, "--no-progress")
    assert code == 0, out
    fs = FactorSet.load(tmp_path / "f")
    assert fs.meta["objective"] == objective and fs.strategy == "ekfac"
    assert fs.n_examples_cov == fs.n_examples_lambda == (2 if objective == "answer" else len(SENTENCES))
    from msif.models.loading import load_model

    m = load_model(str(checkpoint / model), task="classification" if objective == "classification" else "causal_lm")
    api.load_factors(tmp_path / "f", model=m)  # fingerprint matches


def test_fit_cli_options(checkpoint, tmp_path):
    code, out = run("fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", tmp_path / "f", "--modules", "mlp",
                    "--strategy", "kfac", "--max-examples", 3, "--seed", 4, "--per-projection", "--no-progress")
    assert code == 0, out
    fs = FactorSet.load(tmp_path / "f")
    assert fs.strategy == "kfac" and fs.n_examples_cov == 3 and fs.meta["config"]["seed"] == 4
    assert {tm.role for tm in fs.modules.values()} == {"mlp"}
    code, out = run("fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", tmp_path / "r", "--refine-basis", 2,
                    "--samples", 2, "--no-progress")
    assert code == 0, out
    fs = FactorSet.load(tmp_path / "r")
    assert fs.meta["config"]["refine"] == 2 and fs.meta["config"]["samples"] == 2 and "refine_s" in fs.meta["timings"]
    code, out = run("fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", tmp_path / "k", "--strategy", "kfac",
                    "--refine-basis", 1, "--no-progress")
    assert code != 0 and "only applies to strategy 'ekfac'" in out and not (tmp_path / "k").exists()


def test_factors_of_another_model_are_refused(checkpoint, tmp_path):
    assert run("fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", tmp_path / "f", "--no-progress")[0] == 0
    from msif.models.loading import load_model

    other = load_model(str(checkpoint / "other"))
    with pytest.raises(FactorError, match="fitted on model"):
        api.load_factors(tmp_path / "f", model=other)


def test_fit_cli_input_errors(checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x y"}) + "\n")
    code, out = run("fit", checkpoint / "lm", bad, "--out", tmp_path / "f", "--no-progress")
    assert code == 2 and "no field 'text'" in out and "--text-field" in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "berlin is in", "answer": ""}) + "\n")
    code, out = run("fit", checkpoint / "lm", empty, "--out", tmp_path / "f", "--objective", "answer", "--no-progress")
    assert code == 2 and "answer is empty" in out
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": " ".join(["paris"] * 40)}) + "\n")
    code, out = run("fit", checkpoint / "lm", long, "--out", tmp_path / "f", "--no-progress")
    assert code == 2 and "max_length" in out
    code, out = run("fit", checkpoint / "lm", long, "--out", tmp_path / "f", "--truncate", "--no-progress")
    assert code == 0, out
    assert not (tmp_path / "g").exists()
    code, out = run("fit", checkpoint / "lm", tmp_path / "missing.jsonl", "--out", tmp_path / "g", "--no-progress")
    assert code == 2 and not (tmp_path / "g").exists()


def test_nan_weights_are_reported(checkpoint, tmp_path):
    from msif.models.loading import load_model

    m = load_model(str(checkpoint / "lm"))
    with torch.no_grad():
        m.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
    from msif.models.loading import load_tokenizer

    with pytest.raises(FloatingPointError, match="NaN"):
        api.fit(m, str(checkpoint / "lm.jsonl"), out=tmp_path / "f", tokenizer=load_tokenizer(str(checkpoint / "lm")), progress=False)
    assert not (tmp_path / "f").exists()


def test_fit_out_never_clobbers(checkpoint, tmp_path):
    """--out: a model folder, a folder of other files, a file and earlier factors are refused before any
    work and left as they were; --overwrite replaces factors; one fit at a time per folder; leftovers of
    a killed save are swept."""
    from msif.atomic import OutputLock

    fit = lambda out, *extra: run("fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", out, "--no-progress", *extra)  # noqa: E731
    before = sorted(p.name for p in (checkpoint / "lm").iterdir())
    code, out = fit(checkpoint / "lm")
    assert code == 2 and "not an msif factors folder" in out and sorted(p.name for p in (checkpoint / "lm").iterdir()) == before
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    code, out = fit(junk)
    assert code == 2 and (junk / "notes.txt").read_text() == "mine" and len(out.strip().splitlines()) == 1
    f = tmp_path / "file"
    f.write_text("x")
    code, out = fit(f)
    assert code == 2 and "is a file" in out and f.read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing hidden left beside them
    good = tmp_path / "f"
    (tmp_path / ".f.tmp-orphan").mkdir()  # a killed earlier save
    assert fit(good)[0] == 0
    assert not (tmp_path / ".f.tmp-orphan").exists() and not (tmp_path / ".f.lock").exists()
    sha = FactorSet.load(good).meta["sha256"]
    code, out = fit(good, "--seed", 1)
    assert code == 2 and "--overwrite" in out and FactorSet.load(good).meta["sha256"] == sha
    with OutputLock(good, "msif fit"):
        code, out = fit(good, "--seed", 1, "--overwrite")
    assert code == 2 and "another msif fit process is writing" in out and FactorSet.load(good).meta["sha256"] == sha
    assert fit(good, "--seed", 1, "--overwrite")[0] == 0 and FactorSet.load(good).meta["sha256"] != sha


def test_fit_missing_model_is_one_line(checkpoint, tmp_path):
    code, out = run("fit", tmp_path / "no-such-model", checkpoint / "lm.jsonl", "--out", tmp_path / "f", "--no-progress")
    assert code == 2 and "Traceback" not in out and not (tmp_path / "f").exists()
