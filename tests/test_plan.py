"""`msif plan`: its parameter and factor-byte counts against a real tiny fit, the CLI's table and JSON,
and its errors."""

from __future__ import annotations

import json

import pytest
from transformers import GPTNeoXConfig
from typer.testing import CliRunner

from msif.cli import app
from msif.curvature.fit import FitConfig, fit_factors
from msif.models.adapters import tracked_modules
from msif.data.encoding import InputError
from msif.plan import (LOGIT_CHUNK, PlanSettings, factor_bytes, factor_counts, fit_memory, load_shape, make_plan, model_shape,
                       query_memory, scoring_memory)

from helpers import batches, random_lm_examples, tiny_neox, word_tokenizer


def run(*args):
    r = CliRunner().invoke(app, ["plan", *map(str, args)])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan") / "lm"
    tiny_neox().float().save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    corpus = d.parent / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": "the capital of france is paris " * (1 + i % 3)}) + "\n"
                              for i in range(30)))
    return d, corpus


def test_tracked_parameters_match_the_real_model():
    model = tiny_neox()
    shape = model_shape(model, PlanSettings(model="tiny"))
    real = 0
    for tm in tracked_modules(model):
        mod = model.get_submodule(tm.name)
        real += mod.weight.numel() + (mod.bias.numel() if tm.bias else 0)
    assert shape.tracked_params == real
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    assert shape.dtype == "float64"


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_factor_bytes_equal_a_real_fit(strategy, tmp_path):
    model = tiny_neox()
    s = PlanSettings(model="tiny", strategy=strategy)
    shape = model_shape(model, s)
    fs = fit_factors(model, batches(random_lm_examples(12), 4), FitConfig(strategy=strategy), fingerprint="t")
    tensors = fs._tensors()
    assert sum(x.numel() * x.element_size() for x in tensors.values()) == factor_bytes(shape, s)
    counts = factor_counts(shape, strategy)
    for kind, n in counts.items():
        assert sum(x.numel() for k, x in tensors.items() if k.startswith(kind + "/")) == n, kind
    scoring = sum(x.numel() * x.element_size() for k, x in tensors.items() if not k.startswith(("A_sum/", "S_sum/")))
    assert scoring == factor_bytes(shape, s, scoring=strategy in ("ekfac", "kfac")) or strategy == "diagonal"
    fs.save(tmp_path / "f")
    on_disk = (tmp_path / "f" / "factors.safetensors").stat().st_size
    assert factor_bytes(shape, s) <= on_disk <= factor_bytes(shape, s) + 64 * 1024  # + the safetensors header


def test_meta_device_shape_equals_the_loaded_model(checkpoint):
    d, _ = checkpoint
    shape = load_shape(PlanSettings(model=str(d)))
    real = model_shape(tiny_neox(), PlanSettings(model="tiny"))
    assert shape.tracked_params == real.tracked_params and shape.n_params == real.n_params
    assert shape.dtype == "float32"  # the saved checkpoint's


def test_memory_grows_with_the_batch_and_rank_is_recommended_when_dense_vectors_do_not_fit(tmp_path):
    cfg = GPTNeoXConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                        vocab_size=50304, max_position_embeddings=2048)
    cfg.save_pretrained(tmp_path / "m")  # config only: the plan never needs the weights
    s = PlanSettings(model=str(tmp_path / "m"), documents=1000, tokens=190, device_memory=64 * 2**30)
    shape = load_shape(s)
    one, eight = fit_memory(shape, s, 1, 200), fit_memory(shape, s, 8, 200)
    assert eight["activations"] == 8 * one["activations"] and eight["layer inputs a"] == 8 * one["layer inputs a"]
    assert one["logits"] == 4 * 200 * 50304 * 4  # four float32 copies of one sequence's logits
    assert eight["logits"] == 4 * (2**24 // 50304) * 50304 * 4  # the fit's head gradient: chunks of 2^24 logits
    assert sum(eight.values()) > sum(one.values())
    p = make_plan(shape, s)
    assert p["recommend"]["rank"] is None and p["recommend"]["fit_batch_size"] >= 8
    s.queries, s.device_memory = 500, 8 * 2**30  # 500 dense vectors of 4·P bytes: ~38 GB
    r = make_plan(shape, s)["recommend"]
    assert r["rank"] is not None and r["rank"] >= 1


def test_scoring_streams_chunked_logits_and_counts_released_memory_once(tmp_path):
    cfg = GPTNeoXConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                        vocab_size=50304, max_position_embeddings=2048)
    cfg.save_pretrained(tmp_path / "m")
    s = PlanSettings(model=str(tmp_path / "m"), documents=2000, tokens=190)
    shape = load_shape(s)
    sc = scoring_memory(shape, s, 8, None)
    # the candidates' head gradient is chunked like the fit's: no (B, T, V) logits
    assert sc["logits"] == 4 * (LOGIT_CHUNK // 50304) * 50304 * 4
    assert sc["weights"] == shape.n_params * 4  # the fine-tuned model is released before scoring
    transient = sum(sc[k] for k in ("activations", "logits", "layer inputs a", "candidate grads s"))
    released = shape.n_params * 4 + 2 * factor_bytes(shape, s, scoring=True)
    assert transient + sc["freed, kept by the allocator"] == max(transient, released)
    # streamed in chunks: a larger corpus does not grow the peak
    big = PlanSettings(model=s.model, documents=1_000_000, tokens=190)
    assert sum(scoring_memory(shape, big, 8, None).values()) == sum(sc.values())
    q = query_memory(shape, s)
    assert q["weights"] == 2 * shape.n_params * 4 and q["factors"] == 2 * factor_bytes(shape, s, scoring=True)


def test_cli_prints_a_table_and_valid_json(checkpoint):
    d, corpus = checkpoint
    code, out = run(d, "--documents", 100, "--tokens", 20, "--device-memory", 4)
    assert code == 0, out
    for stage in ("fit pt", "fit ft", "query vectors", "scoring", "index"):
        assert stage in out
    assert "fit --batch-size" in out
    r = CliRunner().invoke(app, ["plan", str(d), "--corpus", str(corpus), "--json", "--queries", "3"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["settings"]["documents"] == 30 and p["settings"]["queries"] == 3
    assert 6 <= p["settings"]["tokens"] <= 20  # 6, 12 or 18 words + BOS
    assert [s["name"] for s in p["stages"]] == ["fit pt", "fit ft", "query vectors", "scoring", "index"]
    assert all(s["peak_bytes"] == sum(s["memory"].values()) > 0 for s in p["stages"])


def test_calibrate_measures_throughput(checkpoint):
    d, _ = checkpoint
    r = CliRunner().invoke(app, ["plan", str(d), "--documents", 10, "--tokens", 8, "--calibrate", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["throughput_flops"]["calibrated"] and p["calibration"]["fit"] > 0 and p["calibration"]["runtime_bytes"] > 0


def test_bad_input_is_one_line_and_exit_code_2(checkpoint, tmp_path):
    d, corpus = checkpoint
    (tmp_path / "empty").mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 30,
                                                  "is_decoder": True}))
    cases = [
        ((tmp_path / "missing",), "no such model folder"),
        ((tmp_path / "empty",), "config.json"),
        ((bert,), "adapter"),
        ((d, "--corpus", corpus, "--documents", 5), "not both"),
        ((d, "--documents", 0), "--documents"),
        ((d, "--batch-size", -1), "--batch-size"),
        ((d, "--device-memory", 0), "--device-memory"),
        ((d, "--corpus", tmp_path / "nope.jsonl"), "nope.jsonl"),
    ]
    for args, needle in cases:
        code, out = run(*args)
        assert code == 2, (args, out)
        assert needle in out and "Traceback" not in out, (args, out)
        assert len(out.strip().splitlines()) == 1 or out.count("error:") == 1, (args, out)


def test_world_size_splits_the_time_and_adds_the_reduce_buckets(tmp_path):
    cfg = GPTNeoXConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        vocab_size=1000, max_position_embeddings=256)
    cfg.save_pretrained(tmp_path / "m")
    s1 = PlanSettings(model=str(tmp_path / "m"), documents=1000, tokens=100)
    s4 = PlanSettings(model=str(tmp_path / "m"), documents=1000, tokens=100, world_size=4)
    shape = load_shape(s1)
    p1, p4 = ({st["name"]: st for st in make_plan(shape, s)["stages"]} for s in (s1, s4))
    for name in ("fit pt", "fit ft", "scoring", "index"):
        assert p4[name]["time_s"] == pytest.approx(p1[name]["time_s"] / 4)
        assert p4[name]["flops"] == p1[name]["flops"]
    assert p4["query vectors"]["time_s"] == p1["query vectors"]["time_s"]  # made on every rank
    c = factor_counts(shape, "ekfac")
    assert p4["fit pt"]["memory"]["reduce buckets"] == 2 * (c["A_sum"] + c["S_sum"] + c["lambda_sum"]) * 4
    assert "reduce buckets" not in p1["fit pt"]["memory"]
    with pytest.raises(InputError, match="world-size"):
        make_plan(shape, PlanSettings(model="m", world_size=0))
