"""Multi-stage tail-patch (msif.eval.tail_patch, `msif bench tail-patch`) on the tiny world.

The pieces are checked against direct computations (the world's own fine-tune, autograd's gradient
step, log-softmax, the difference-in-differences by hand); the quick run checks only what must hold
whatever the model: the random control sits at zero within its spread, and the patches have the size
asked for. (That gold sources move the answer more than random documents does *not* hold for every
model: on the full world a step on a fact's sources lowers its answer's probability about as often as
it raises it; see the benchmark's notes.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from msif.data.encoding import encode_prompt_answer, encode_text, pad_token_id
from msif.eval import tail_patch as tp


@pytest.fixture(scope="module")
def world():
    from msif.worldfacts import load_world

    return load_world(size="tiny", progress=False)


def test_the_rerun_fine_tune_is_the_worlds_own_bit_for_bit(world):
    from msif.worldfacts.build import finetune_qa

    model = world.load_pretrained()
    finetune_qa(world, model)
    ref = world.load_finetuned().state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_patch_moves_each_group_a_fixed_step_along_its_documents_negative_gradient(world):
    tok = world.load_tokenizer()
    pad = pad_token_id(tok)
    texts = [d["text"] for d in world.documents[:5]]
    docs = [encode_text(tok, t, index=i) for i, t in enumerate(texts)]
    pt = world.load_pretrained().double()
    step = 0.01
    got = tp.patch(pt, [docs[:2], docs[2:5]], step, pad)
    ref = {n: p.detach().clone() for n, p in pt.named_parameters()}
    size = step * float(torch.sqrt(sum((p.detach() ** 2).sum() for p in pt.parameters())))
    for group in (texts[:2], texts[2:5]):  # each group: mean next-token loss over its real tokens, by hand
        model = world.load_pretrained().double()
        losses = []
        for t in group:
            ids = torch.tensor([tok(t)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
        torch.cat(losses).mean().backward()
        norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))
        for n, p in model.named_parameters():
            if p.grad is not None:
                ref[n] -= size / norm * p.grad
    for n, p in got.named_parameters():
        torch.testing.assert_close(p, ref[n], rtol=1e-9, atol=1e-12)


def test_answer_logprobs_sum_the_answer_tokens_log_probabilities(world):
    tok = world.load_tokenizer()
    model = world.load_finetuned().double()
    pairs = [(world.qa_prompt(f.question), f.answer) for f in world.test_facts[:3]]
    enc = [encode_prompt_answer(tok, p, a, index=i) for i, (p, a) in enumerate(pairs)]
    got = tp.answer_logprobs(model, enc, pad_token_id(tok), batch_size=2)
    for (p, a), g in zip(pairs, got):
        pi, ai = tok(p)["input_ids"], tok(a)["input_ids"]
        ids = torch.tensor([pi + ai])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        want = sum(float(lp[len(pi) - 1 + j, t]) for j, t in enumerate(ai))
        assert abs(g - want) < 1e-9


def test_effect_is_own_group_change_minus_the_other_groups_mean():
    cfg = tp.TailPatchConfig(methods=("gold",), ks=(1,), groups=3)
    base = np.array([0.0, 1.0, 2.0, 3.0])
    group_of = np.array([0, 1, 2, 0])
    lp = {("gold", 1, 0): base + np.array([5.0, 1.0, 1.0, 7.0]),
          ("gold", 1, 1): base + np.array([1.0, 4.0, 3.0, 1.0]),
          ("gold", 1, 2): base + np.array([3.0, 2.0, 9.0, 3.0])}
    e = tp._effects(lp, base, group_of, cfg)["gold@1"]
    assert e["own"] == [5.0, 4.0, 9.0, 7.0]
    assert e["others"] == [2.0, 1.5, 2.0, 2.0]
    assert e["effect"] == [3.0, 2.5, 7.0, 5.0]


def test_quick_run_random_documents_sit_at_zero_and_every_method_is_reported(world, tmp_path):
    from typer.testing import CliRunner

    from msif.cli import app

    r = CliRunner().invoke(app, ["bench", "tail-patch", "--quick", "--json", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert {p.name for p in tmp_path.iterdir()} >= {"tail_patch.json", "tail_patch.md", "tail_patch.png"}
    k = max(res["config"]["ks"])
    pooled = {m: np.concatenate([t["effects"][f"{m}@{k}"]["effect"] for t in res["trials"]]) for m in ("gold", "random")}
    se = pooled["random"].std(ddof=1) / np.sqrt(len(pooled["random"]))
    assert abs(pooled["random"].mean()) < 3 * se  # the control: no effect beyond its own spread
    assert pooled["gold"].std() > 0  # the patches do move the answers
    biggest = max(np.bincount(t["group"]).max() for t in res["trials"])
    for t in res["trials"]:  # each query's step is step·‖θ_pt‖, and a group's steps add up
        assert all(0 < v <= res["config"]["step"] * biggest * (1 + 1e-6) for v in t["patch_size"].values())
    assert {row["method"] for row in res["results"]} == set(tp.METHODS)
    assert res["fine_tunes"] == res["config"]["trials"] * (len(tp.METHODS) * len(res["config"]["ks"]) * res["config"]["groups"] + 1)


def test_bad_options_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from msif.cli import app

    for args, msg in ((["--k", "0"], "--k must be"), (["--k", "a"], "--k must be"), (["--step", "-1"], "--step must be"),
                      (["--groups", "1"], "--groups must be ≥ 2"), (["--world", "odd"], "--world must be one of")):
        r = CliRunner().invoke(app, ["bench", "tail-patch", "--quick", "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()
