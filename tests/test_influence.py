"""Multi-stage influence scores against dense math (float64, tiny models), and their meaning."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPTNeoXForSequenceClassification

from msif.curvature.exact import flat_example_grads as flat_grads, param_layout
from msif.curvature.fit import FitConfig, fit_factors
from msif.curvature.hooks import per_example_grads
from msif.data.encoding import InputError, collate, encode_classification, encode_prompt_answer, encode_text
from msif.influence.attribute import Attributor, Query
from msif.influence.scoring import low_rank, score_batches
from msif.objectives import data_targets, model_logits, summed_loss

from helpers import WORDS_CORPUS, neox_config, train_steps, word_tokenizer

QA = [("what is the capital of france", " paris"), ("what is the capital of spain", " madrid"),
      ("berlin is in", " germany"), ("rome is the capital of", " italy"), ("lisbon is in", " portugal"),
      ("paris is a city in", " france")]


def finetune(model, qa_batches, steps=40, lr=0.05):
    """Full-parameter SGD fine-tuning on the answer loss (deterministic)."""
    torch.manual_seed(1)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(steps):
        b = qa_batches[i % len(qa_batches)]
        opt.zero_grad()
        summed_loss(model_logits(model, b), data_targets(b, "answer")).mean().backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = neox_config(vocab_size=len(tok), max_position_embeddings=32)
    from transformers import GPTNeoXForCausalLM

    pt = GPTNeoXForCausalLM(cfg).double()
    docs = [encode_text(tok, s, index=i) for i, s in enumerate(WORDS_CORPUS)]
    pt = train_steps(pt, [collate(docs[i : i + 4]) for i in range(0, len(docs), 4)], "lm", steps=60, lr=2e-2)
    qa = [encode_prompt_answer(tok, p, a, index=i) for i, (p, a) in enumerate(QA)]
    qa_b = [collate(qa[i : i + 3]) for i in range(0, len(qa), 3)]
    ft = finetune(copy.deepcopy(pt), qa_b)
    cls = GPTNeoXForSequenceClassification(neox_config(vocab_size=len(tok), max_position_embeddings=32, num_labels=3)).double()
    cls.load_state_dict(pt.state_dict(), strict=False)  # backbone from θ_pt, new head
    cl = [encode_classification(tok, s, i % 3, index=i) for i, s in enumerate(WORDS_CORPUS)]
    cls = train_steps(cls, [collate(cl[i : i + 4]) for i in range(0, len(cl), 4)], "classification", steps=15, lr=5e-3, seed=2)
    doc_b = [collate(docs[i : i + 4]) for i in range(0, len(docs), 4)]
    fpt = fit_factors(pt, doc_b, FitConfig(objective="lm"), fingerprint="pt")
    fft = fit_factors(ft, qa_b, FitConfig(objective="answer"), fingerprint="ft")
    fcl = fit_factors(cls, [collate(cl[i : i + 4]) for i in range(0, len(cl), 4)], FitConfig(objective="classification"), fingerprint="cl")
    yield dict(tok=tok, pt=pt, ft=ft, cls=cls, fpt=fpt, fft=fft, fcl=fcl, qa_b=qa_b)
    torch.set_num_threads(2)


def attributor(w, ft="ft", fft="fft", **kw):
    return Attributor(w["pt"], w[ft], w["tok"], pt_factors=w["fpt"], ft_factors=w[fft], check_fingerprints=False, **kw)


def dense_preconditioner(fs, tms, damping):
    """Block-diagonal dense (G + λI) over the flat layout, from the factors' own blocks."""
    lay = param_layout(tms)
    M = torch.zeros(lay.D, lay.D, dtype=torch.float64)
    for b, (s, e) in lay.blocks.items():
        M[s:e, s:e] = fs.dense_block(b, damping)
    return M


def test_ms_if_equals_dense_formula_and_the_wrong_ones_differ(world):
    att = attributor(world, damping_pt=1e-3, damping_ft="0.5x")
    queries = att.prepare([Query(p, a) for p, a in QA[:3]])
    texts = WORDS_CORPUS
    got = att.score(queries, texts, method="ms-if").scores
    tms = att.shared
    Ppt = dense_preconditioner(world["fpt"], tms, 1e-3)
    Pft = dense_preconditioner(world["fft"], tms, "0.5x")
    q = flat_grads(world["ft"], tms, collate([p.encoded for p in queries]), "answer")  # (Q, D)
    g = flat_grads(world["pt"], tms, collate([encode_text(world["tok"], t, index=i) for i, t in enumerate(texts)]), "lm")
    want = torch.linalg.solve(Pft, q.T).T @ torch.linalg.solve(Ppt, g.T)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-8 * want.abs().max())
    raw_candidate = torch.linalg.solve(Pft, q.T).T @ g.T  # the paper code's bug: pt curvature never used
    ft_on_candidate = torch.linalg.solve(Pft, q.T).T @ torch.linalg.solve(Pft, g.T)
    for wrong in (raw_candidate, ft_on_candidate):
        rel = (wrong / wrong.norm() - want / want.norm()).norm()
        assert rel > 0.05, rel


def test_streamed_orders_equal_naive_per_candidate_ihvp(world):
    att = attributor(world)
    queries = att.prepare([Query(p, a) for p, a in QA])
    U = att.query_vectors(att.query_gradients(queries), "ms-if")
    enc = [encode_text(world["tok"], t, index=i) for i, t in enumerate(WORDS_CORPUS)]
    batches = [collate(enc[i : i + 5]) for i in range(0, len(enc), 5)]
    direct = score_batches(world["pt"], att.shared, U, batches, order="direct", per_token=True)
    grads = score_batches(world["pt"], att.shared, U, batches, order="grads")
    # naive: per-candidate gradient, per-candidate iHVP with the pt factors, dot with P_ft ∇m
    gq = world["fft"].precondition(att.query_gradients(queries), att.damping_ft)
    naive = torch.zeros(len(QA), len(enc), dtype=torch.float64)
    for b in batches:
        g = per_example_grads(world["pt"], att.shared, b, "lm")
        pg = world["fpt"].precondition(g, att.damping_pt)
        for n in g:
            naive[:, b.indices] += torch.einsum("qoi,boi->qb", gq[n], pg[n])
    for r in (direct, grads):
        assert torch.allclose(r.scores, naive, rtol=1e-8, atol=1e-10 * naive.abs().max())
    # per-token scores add up to the score; per-module scores too
    tok_tot = torch.stack([t.sum(-1) for t in direct.per_token], 1)
    assert torch.allclose(tok_tot, direct.scores, rtol=1e-9, atol=1e-12)
    assert torch.allclose(direct.per_module.sum(-1), direct.scores, rtol=1e-9, atol=1e-12)
    # low rank: full rank is exact, rank 1 keeps most of the ranking
    full = score_batches(world["pt"], att.shared, low_rank(U, att.shared, 10_000), batches)
    assert torch.allclose(full.scores, naive, rtol=1e-8, atol=1e-10 * naive.abs().max())
    errs = [float((score_batches(world["pt"], att.shared, low_rank(U, att.shared, r), batches).scores - naive).norm() / naive.norm())
            for r in (1, 4)]
    assert errs[1] < errs[0] and errs[1] < 0.5, errs


def test_factors_are_bit_identical_after_scoring(world):
    before = {k: v.clone() for k, v in world["fpt"]._tensors().items()}
    before_ft = {k: v.clone() for k, v in world["fft"]._tensors().items()}
    att = attributor(world)
    for d in ("0.1x", 1e-4):
        att.damping_pt = att.damping_ft = d
        att.attribute([Query(*QA[0])], WORDS_CORPUS, top=3)
    assert all(torch.equal(before[k], v) for k, v in world["fpt"]._tensors().items())
    assert all(torch.equal(before_ft[k], v) for k, v in world["fft"]._tensors().items())


def test_top_candidates_lower_the_query_loss_more_than_bottom_ones(world):
    """Sign and meaning, as the multi-stage counterfactual: a few SGD steps of pre-training on the
    top-scored documents, then the same fine-tuning again, lower the query loss more than the same
    steps on the bottom-scored documents."""
    att = attributor(world, damping_pt="1x", damping_ft="1x")
    tok = world["tok"]

    def query_loss_after(doc_rows, qb):
        m = copy.deepcopy(world["pt"])
        opt = torch.optim.SGD(m.parameters(), lr=0.02)
        b = collate([encode_text(tok, WORDS_CORPUS[r], index=r) for r in doc_rows])
        for _ in range(3):
            opt.zero_grad()
            summed_loss(model_logits(m, b), data_targets(b, "lm")).sum().backward()
            opt.step()
        m = finetune(m, world["qa_b"])
        with torch.no_grad():
            return float(summed_loss(model_logits(m, qb), data_targets(qb, "answer")).sum())

    wins = 0
    for p, a in QA:
        rows = att.attribute([Query(p, a)], WORDS_CORPUS, method="ms-if", top=len(WORDS_CORPUS), per_token=False).rows[0]
        qb = collate([encode_prompt_answer(tok, p, a)])
        wins += query_loss_after(rows[:3], qb) < query_loss_after(rows[-3:], qb)
    assert wins >= 5, wins


def test_classification_finetune(world):
    att = attributor(world, ft="cls", fft="fcl")
    res = att.attribute([Query("berlin is in germany")], WORDS_CORPUS, method="ms-if", top=5)
    assert res.queries[0].label in (0, 1, 2) and len(res.rows[0]) == 5
    # dense check of the classification multi-stage score
    tms = att.shared
    q = flat_grads(world["cls"], tms, collate([res.queries[0].encoded]), "classification")
    g = flat_grads(world["pt"], tms, collate([encode_text(world["tok"], t, index=i) for i, t in enumerate(WORDS_CORPUS)]), "lm")
    want = torch.linalg.solve(dense_preconditioner(world["fcl"], tms, "0.1x"), q.T).T @ torch.linalg.solve(dense_preconditioner(world["fpt"], tms, "0.1x"), g.T)
    assert torch.allclose(torch.tensor(res.scores[0], dtype=torch.float64), want[0].sort(descending=True).values[:5], rtol=1e-8)
    for m in ("gdp", "repsim"):
        att.attribute([Query("berlin is in germany", label=1)], WORDS_CORPUS, method=m, top=3)
    with pytest.raises(InputError, match="classification head"):
        att.attribute([Query("berlin is in germany")], WORDS_CORPUS, method="ss-if")


def test_ss_if_gdp_repsim_match_their_definitions(world):
    att = attributor(world)
    queries = att.prepare([Query(*QA[0])])
    tms = att.shared
    q = flat_grads(world["ft"], tms, collate([queries[0].encoded]), "answer")
    enc = collate([encode_text(world["tok"], t, index=i) for i, t in enumerate(WORDS_CORPUS)])
    g_ft = flat_grads(world["ft"], tms, enc, "lm")
    g_pt = flat_grads(world["pt"], tms, enc, "lm")
    ss = att.score(queries, WORDS_CORPUS, method="ss-if").scores[0]
    want = torch.linalg.solve(dense_preconditioner(world["fft"], tms, "0.1x"), q[0]) @ g_ft.T
    assert torch.allclose(ss, want, rtol=1e-8)
    gdp = att.score(queries, WORDS_CORPUS, method="gdp").scores[0]
    assert torch.allclose(gdp, q[0] @ g_pt.T, rtol=1e-8)
    rep = att.score(queries, WORDS_CORPUS, method="repsim").scores[0]
    with torch.no_grad():
        hq = world["ft"](input_ids=collate([queries[0].encoded]).input_ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        hc = [world["pt"](input_ids=collate([encode_text(world["tok"], t)]).input_ids, output_hidden_states=True).hidden_states[-1][0].mean(0) for t in WORDS_CORPUS]
    want = torch.stack([torch.nn.functional.cosine_similarity(hq, h, dim=0) for h in hc])
    assert torch.allclose(rep, want, rtol=1e-8)


def test_self_influence_and_generation(world):
    att = attributor(world)
    si = att.self_influence(WORDS_CORPUS[:4], damping=1e-3)
    tms = [tm for tm in att.shared]
    g = flat_grads(world["pt"], tms, collate([encode_text(world["tok"], t, index=i) for i, t in enumerate(WORDS_CORPUS[:4])]), "lm")
    P = dense_preconditioner(world["fpt"], tms, 1e-3)
    want = (g * torch.linalg.solve(P, g.T).T).sum(1)
    assert torch.allclose(si, want, rtol=1e-8)
    (pq,) = att.prepare([Query("what is the capital of france")])
    assert pq.generated and pq.answer.strip()
    # the generated answer is the greedy continuation
    ids = collate([pq.encoded]).input_ids
    with torch.no_grad():
        logits = world["ft"](input_ids=ids).logits[0]
    n_prompt = len(pq.encoded.input_ids) - sum(pq.encoded.target_mask)
    for t in range(n_prompt - 1, ids.shape[1] - 1):
        assert int(logits[t].argmax()) == int(ids[0, t + 1])


def test_bad_queries(world):
    att = attributor(world)
    with pytest.raises(InputError, match="answer is empty"):
        att.prepare([Query("what is the capital of france", "")])
    with pytest.raises(InputError, match="prompt is empty"):
        att.prepare([Query("  ")])
    with pytest.raises(InputError, match="no candidate"):
        att.score(att.prepare([Query(*QA[0])]), [], method="ms-if")
    with pytest.raises(InputError, match="max_length"):
        att.prepare([Query("paris " * 40, " paris")])


def test_chat_template_prompt(world):
    tok = copy.deepcopy(world["tok"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} capital of{% endfor %}"
    att = Attributor(world["pt"], world["ft"], tok, pt_factors=world["fpt"], ft_factors=world["fft"], check_fingerprints=False,
                     template="chat")
    (pq,) = att.prepare([Query("what is the", " france")])
    assert pq.prompt_text == "what is the capital of"
    assert tok.decode(pq.encoded.input_ids) == "what is the capital of france"
    plain = Attributor(world["pt"], world["ft"], world["tok"], check_fingerprints=False)
    with pytest.raises(InputError, match="chat template"):
        Attributor(world["pt"], world["ft"], world["tok"], check_fingerprints=False, template="chat").prepare([Query("x y", " z")])
    assert plain.prepare([Query("what is the", " france")])[0].prompt_text == "what is the"


def test_score_batches_per_query_subsets_match_autograd():
    """``subsets``: each query row scored on its own candidates only (NaN elsewhere), each score equal to
    ⟨u, ∇ℓ(z)⟩ from autograd in float64; rows sharing a set, contiguous or not, and a bias column."""
    from helpers import random_lm_examples, tiny_neox
    from msif.models.adapters import tracked_modules

    model = tiny_neox(seed=3).double().eval()
    tms = tracked_modules(model)
    examples = random_lm_examples(9, seed=4)
    gen = torch.Generator().manual_seed(5)
    U = {tm.name: torch.randn(5, tm.out_features, tm.in_dim, generator=gen, dtype=torch.float64) for tm in tms}
    subsets = [[0, 3, 8], [1, 2], [0, 3, 8], [7], [1, 2]]  # rows 0/2 and 1/4 share sets (not contiguous)
    res = score_batches(model, tms, U, [collate(examples[i : i + 4]) for i in range(0, 9, 4)], subsets=subsets)
    assert res.per_module is None
    params = {tm.name: model.get_submodule(tm.name) for tm in tms}
    for col, n in enumerate(res.indices.tolist()):
        b = collate([examples[n]])
        model.zero_grad()
        summed_loss(model_logits(model, b), data_targets(b, "lm")).sum().backward()
        for q, sub in enumerate(subsets):
            got = float(res.scores[q, col])
            if n not in sub:
                assert got != got  # NaN: not asked for
                continue
            ref = 0.0
            for tm in tms:
                lin = params[tm.name]
                gw = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1) if tm.bias else lin.weight.grad
                ref += float((U[tm.name][q] * gw).sum())
            assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
