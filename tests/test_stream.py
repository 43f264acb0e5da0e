"""Corpus-scale attribution: streamed top-k against the one-pass scores, resumable score shards,
refused inputs, bounded memory, low-rank fallback, precision check, no CPU-default tensors."""

from __future__ import annotations

import pytest
import torch

from msif.data.encoding import InputError, collate, encode_text
from msif.influence.attribute import Query
from msif.influence.scoring import low_rank, score_batches
from msif.influence.stream import TopK, parse_bytes, precision_report

from helpers import WORDS_CORPUS
from test_influence import QA, attributor, world  # noqa: F401  (fixture)

CORPUS = WORDS_CORPUS + [f"{a} {b}" for a, b in zip(WORDS_CORPUS, WORDS_CORPUS[1:] + WORDS_CORPUS[:1])]  # 24 distinct texts


def _queries(n=3):
    return [Query(p, a, id=str(i)) for i, (p, a) in enumerate(QA[:n])]


def _reference(att, prepared, texts, method, top, rank=None):
    """Top rows and scores from one pass over all texts and one stable sort."""
    s = att.score(prepared, texts, method=method, rank=rank).scores
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :top]
    return order.tolist(), s.gather(1, order).tolist()


@pytest.mark.parametrize("method,rank", [("ms-if", None), ("gdp", None), ("ms-if", 1), ("repsim", None)])
def test_streamed_topk_equals_one_pass(world, method, rank):  # noqa: F811
    att = attributor(world)
    prepared = att.prepare(_queries())
    rows, scores = _reference(att, prepared, CORPUS, method, 5, rank)
    res = att.attribute(prepared, CORPUS, method=method, top=5, rank=rank, chunk_size=5)
    assert res.rows == rows
    assert res.doc_ids == [[str(r) for r in rr] for rr in rows]
    assert torch.allclose(torch.tensor(res.scores), torch.tensor(scores), rtol=1e-9, atol=1e-12)
    if method != "repsim":  # per-token scores of the final top documents sum to their scores
        for q in range(3):
            for r in range(5):
                assert abs(sum(res.token_scores[q][r]) - res.scores[q][r]) <= 1e-9 * max(1.0, abs(res.scores[q][r]))
        one = att.score(prepared, CORPUS, method=method, rank=rank)
        for q in range(3):
            assert res.role_share[q] == pytest.approx({k: float(v[q]) for k, v in one.role_shares().items()}, rel=1e-9)


def test_streamed_candidate_lists_equal_one_pass(world):  # noqa: F811
    att = attributor(world)
    prepared = att.prepare(_queries(2))
    cands = [[3, 7, 1, 20, 11, 2, 9], [5, 0, 23]]
    res = att.attribute(prepared, CORPUS, candidates=cands, top=4, chunk_size=2)
    for q, c in enumerate(cands):
        s = att.score([prepared[q]], [CORPUS[r] for r in c], c).scores[0]
        order = torch.sort(s, descending=True, stable=True).indices[:4].tolist()
        assert res.rows[q] == [c[i] for i in order]


def test_memory_does_not_grow_with_the_corpus(world):  # noqa: F811
    att = attributor(world)
    prepared = att.prepare(_queries(2))
    held = []
    for corpus in (CORPUS, CORPUS * 4):
        att.attribute(prepared, corpus, method="gdp", top=3, chunk_size=4, per_token=False)
        held.append(att.held)
    assert held == [3 + 4, 3 + 4]  # a running top-k and one chunk, for 24 and for 96 documents


def test_topk_ties_keep_row_order():
    t = TopK(1, 3)
    t.update(torch.tensor([[1.0, 2.0]]), [0, 1])
    t.update(torch.tensor([[2.0, 1.0, 3.0]]), [2, 3, 4])
    assert t.best(0) == ([4, 1, 2], [3.0, 2.0, 2.0])


class _Killed(Exception):
    pass


def _kill_after(att, monkeypatch, n_chunks):
    """Make scoring raise once ``n_chunks`` chunks were scored (a process killed between shards)."""
    real, calls = att.score_texts, []

    def score_texts(*a, **k):
        if not k.get("per_token"):  # a chunk (the per-token pass over the final top documents is not one)
            if len(calls) >= n_chunks:
                raise _Killed
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(att, "score_texts", score_texts)
    return calls


def _same(a, b):
    assert a.rows == b.rows and a.scores == b.scores and a.role_share == b.role_share
    assert a.token_scores == b.token_scores


def test_shards_resume_after_a_kill(world, tmp_path, monkeypatch):  # noqa: F811
    att = attributor(world)
    prepared = att.prepare(_queries())
    kw = dict(top=4, chunk_size=5)
    full = att.attribute(prepared, CORPUS, scores_out=tmp_path / "a", **kw)
    shards = sorted(p.name for p in (tmp_path / "a").glob("shard-*.safetensors"))
    assert len(shards) == 5  # 24 documents in chunks of 5
    # the stored matrix is the one-pass matrix in float32
    from safetensors.torch import load_file

    mat = torch.cat([load_file(str(tmp_path / "a" / s))["scores"] for s in shards], 1)
    assert torch.allclose(mat.double(), att.score(prepared, CORPUS).scores.float().double())

    with monkeypatch.context() as m:
        _kill_after(att, m, 2)
        with pytest.raises(_Killed):
            att.attribute(prepared, CORPUS, scores_out=tmp_path / "b", **kw)
    assert len(list((tmp_path / "b").glob("shard-*.safetensors"))) == 2
    assert not list((tmp_path / "b").glob(".*"))  # no temporary left behind
    with monkeypatch.context() as m:
        calls = _kill_after(att, m, 99)
        resumed = att.attribute(prepared, CORPUS, scores_out=tmp_path / "b", **kw)
    assert len(calls) == 3  # only the 3 missing chunks were scored
    _same(resumed, full)
    # a shard lost in the middle is recomputed, the others reused
    (tmp_path / "b" / "shard-00001.safetensors").unlink()
    with monkeypatch.context() as m:
        calls = _kill_after(att, m, 99)
        again = att.attribute(prepared, CORPUS, scores_out=tmp_path / "b", **kw)
    assert len(calls) == 1
    _same(again, full)


def test_changed_inputs_are_refused(world, tmp_path):  # noqa: F811
    att = attributor(world)
    prepared = att.prepare(_queries(2))
    att.attribute(prepared, CORPUS, top=3, chunk_size=8, scores_out=tmp_path / "s")
    with pytest.raises(InputError, match=r"\(queries changed\).*new --scores-out folder or delete"):
        att.attribute(att.prepare(_queries(3)), CORPUS, top=3, chunk_size=8, scores_out=tmp_path / "s")
    with pytest.raises(InputError, match=r"corpus changed"):
        att.attribute(prepared, CORPUS[:-1] + ["a different text"], top=3, chunk_size=8, scores_out=tmp_path / "s")
    att.damping_pt = 1e-2
    with pytest.raises(InputError, match=r"dampings changed"):
        att.attribute(prepared, CORPUS, top=3, chunk_size=8, scores_out=tmp_path / "s")


def test_max_memory_switches_to_low_rank(world):  # noqa: F811
    att = attributor(world)
    prepared = att.prepare(_queries(2))
    lines = []
    tms = att.vector_modules("ms-if")
    dense = 2 * sum(tm.out_features * tm.in_dim for tm in tms) * 8
    assert att.choose_rank(2, "ms-if", max_memory=dense, log=lines.append) is None and not lines
    r = att.choose_rank(2, "ms-if", max_memory=dense // 2, log=lines.append)
    assert r is not None and len(lines) == 1 and f"rank {r}" in lines[0] and "low-rank" in lines[0]
    assert att.choose_rank(2, "ms-if", rank=3, max_memory=1, log=lines.append) == 3  # --rank wins
    with pytest.raises(InputError, match="even at rank 1"):
        att.choose_rank(2, "ms-if", max_memory=16)
    auto = att.attribute(prepared, CORPUS, top=4, chunk_size=7, max_memory=dense // 2, log=lines.append)
    forced = att.attribute(prepared, CORPUS, top=4, chunk_size=7, rank=r)
    assert auto.rows == forced.rows and auto.scores == forced.scores


def test_query_vectors_batched_equal_all_at_once(world):  # noqa: F811
    att = attributor(world, batch_size=2)  # batches of 2, 2 and 1 queries
    prepared = att.prepare(_queries(5))
    U = att.make_query_vectors(prepared, "ms-if")
    att.batch_size = 8
    ref = att.query_vectors(att.query_gradients(prepared), "ms-if")
    assert U.keys() == ref.keys() and all(torch.allclose(U[n].dense(), ref[n], rtol=1e-10, atol=1e-14) for n in U)
    att.batch_size = 2
    lr = att.make_query_vectors(prepared, "ms-if", rank=2)
    lr_ref = low_rank(ref, att.shared, 2)
    for n in lr:
        a, b = lr[n], lr_ref[n]
        if hasattr(b, "X"):  # low-rank: the products agree (singular vectors are defined up to sign)
            assert torch.allclose(a.X @ a.Y.transpose(-1, -2), b.X @ b.Y.transpose(-1, -2), rtol=1e-8, atol=1e-12)
        else:
            assert torch.allclose(a.dense(), b, rtol=1e-10, atol=1e-14)


def test_precision_report():
    hi = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert precision_report(hi * (1 + 1e-3), hi, "bfloat16")["warning"] is None
    rep = precision_report(hi.flip(1), hi, "bfloat16")
    assert rep["spearman"] == pytest.approx(-1.0) and "--dtype float32" in rep["warning"] and "Spearman -1.00" in rep["warning"]


def test_low_precision_check_warns_only_when_scores_disagree(world, monkeypatch):  # noqa: F811
    import copy

    w = dict(world, pt=copy.deepcopy(world["pt"]).float())
    att = attributor(w)
    prepared = att.prepare(_queries(1))
    real = att.score_texts

    def broken(U, texts, method, per_token=False):  # a low-precision model whose ranking is reversed
        res = real(U, texts, method, per_token)
        if next(att.pt.parameters()).dtype == torch.bfloat16:
            res.scores = -res.scores
        return res

    for fake, expect in ((None, False), (broken, True)):
        lines = []
        with monkeypatch.context() as m:
            if fake is not None:
                m.setattr(att, "score_texts", fake)
            att.attribute(prepared, CORPUS, top=2, chunk_size=24, dtype=torch.bfloat16, log=lines.append, per_token=False)
        assert next(att.pt.parameters()).dtype == torch.bfloat16
        warned = [x for x in lines if "disagree with float32" in x]
        assert bool(warned) == expect, lines
        att.pt.float()


def test_scoring_creates_no_tensor_on_the_default_device(world):  # noqa: F811
    """Model, data and query vectors on the CPU, default device meta: any tensor made without an
    explicit device lands on meta, and meta is contagious (an op mixing meta and CPU gives meta), so a
    single one shows in the results' device."""
    att = attributor(world)
    prepared = att.prepare(_queries(2))
    U = att.query_vectors(att.query_gradients(prepared), "ms-if")  # dense (Q, out, in_dim) tensors
    tok = world["tok"]
    b = collate([encode_text(tok, t, index=i) for i, t in enumerate(CORPUS[:4])])
    ref = score_batches(att.pt, att.shared, U, [b], per_token=True)
    torch.set_default_device("meta")
    try:
        lr = low_rank(U, att.shared, 1)
        res = score_batches(att.pt, att.shared, U, [b], per_token=True)
        res_lr = score_batches(att.pt, att.shared, lr, [b])
        top = TopK(2, 2)
        top.update(res.scores, [0, 1, 2, 3])
    finally:
        torch.set_default_device(None)
    assert all(v.X.device.type == "cpu" for v in lr.values() if hasattr(v, "X"))
    assert res.scores.device.type == "cpu" and res_lr.scores.device.type == "cpu" and top.scores.device.type == "cpu"
    assert torch.allclose(res.scores, ref.scores)


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2e9") == 2 * 10**9
    with pytest.raises(InputError, match="--max-memory"):
        parse_bytes("lots")


def test_closed_form_head_gradient_equals_the_full_logits_pass(world, monkeypatch):  # noqa: F811
    """Scoring contracts each module as its gradient arrives, with the head's gradient in closed form;
    the model's own forward over the (B, T, V) logits gives the same scores."""
    import msif.curvature.hooks as hooksmod

    att = attributor(world)
    U = att.make_query_vectors(att.prepare(_queries(2)), "ms-if")
    b = collate([encode_text(world["tok"], t, index=i) for i, t in enumerate(CORPUS[:6])])
    fast = score_batches(att.pt, att.shared, U, [b], per_token=True)
    monkeypatch.setattr(hooksmod, "plain_lm_head", lambda model: None)
    full = score_batches(att.pt, att.shared, U, [b], per_token=True)
    assert torch.allclose(fast.per_module, full.per_module, rtol=1e-10, atol=1e-14)
    assert all(torch.allclose(x, y, rtol=1e-10, atol=1e-14) for x, y in zip(fast.per_token, full.per_token))


def test_release_frees_factors_and_the_finetuned_model(world):  # noqa: F811
    att = attributor(world)
    res = att.attribute(att.prepare(_queries(1)), CORPUS, top=2, release=True, per_token=False)
    assert att.pt_factors is None and att.ft_factors is None and att.ft is None and att.pt is not None
    assert res.dampings and len(res.rows[0]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_attribution_on_cuda_equals_cpu(world):  # noqa: F811
    import copy

    att = attributor(world)
    prepared = att.prepare(_queries(2))
    refs = {r: att.attribute(prepared, CORPUS, top=4, chunk_size=5, rank=r) for r in (None, 1)}
    w = {k: copy.deepcopy(v) for k, v in world.items() if k in ("pt", "ft", "fpt", "fft")}
    for fs in (w["fpt"], w["fft"]):
        for d in (fs.QA, fs.QS, fs.eigA, fs.eigS):
            for k in d:
                d[k] = d[k].cuda()
        for st in fs.stats.values():
            st.lambda_sum = None if st.lambda_sum is None else st.lambda_sum.cuda()
    gpu_att = attributor(dict(world, **w), device="cuda")
    for r, ref in refs.items():
        gpu = gpu_att.attribute(prepared, CORPUS, top=4, chunk_size=5, rank=r)
        assert gpu.rows == ref.rows
        assert torch.allclose(torch.tensor(gpu.scores), torch.tensor(ref.scores), rtol=1e-8)
