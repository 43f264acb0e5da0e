"""Exact dense curvature (msif.curvature.exact) on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
)

from msif.curvature.exact import (
    block_diagonal,
    damped_solve,
    exact_ggn,
    flat_example_grads,
    flat_params,
    flatten,
    ggn_vector_product,
    mean_eigenvalue,
    param_layout,
    per_example_losses,
    unflatten,
)
from msif.data.encoding import Encoded, collate
from msif.models.adapters import Block, TrackedModule, tracked_modules

V = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _neox_cfg(layers=1, **kw):
    return GPTNeoXConfig(
        hidden_size=8,
        num_attention_heads=2,
        num_hidden_layers=layers,
        intermediate_size=16,
        vocab_size=V,
        max_position_embeddings=32,
        pad_token_id=0,
        **kw,
    )


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Larger-than-default random weights so that logits, gradients and curvature are not tiny."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model.double().eval()


@pytest.fixture(scope="module")
def neox1():
    return _init(GPTNeoXForCausalLM(_neox_cfg(1)), 0)


@pytest.fixture(scope="module")
def neox2():
    return _init(GPTNeoXForCausalLM(_neox_cfg(2)), 1)


@pytest.fixture(scope="module")
def gpt2():
    cfg = GPT2Config(n_embd=8, n_head=2, n_layer=1, vocab_size=V, n_positions=32, pad_token_id=0)
    return _init(GPT2LMHeadModel(cfg), 2)


@pytest.fixture(scope="module")
def classifier():
    return _init(GPTNeoXForSequenceClassification(_neox_cfg(1, num_labels=3)), 3)


def _lm_examples():
    # pad id 0 never occurs as a real token (the classifier finds the last real token by it)
    return [
        Encoded([1, 5, 7, 2, 9, 4], [True] * 5 + [False], index=0),
        Encoded([3, 8, 11], [True, True, False], index=1),
        Encoded([6, 2, 2, 13, 19], [True] * 4 + [False], index=2),
    ]


def _answer_examples():
    # prompt tokens masked: only the predictions of the answer tokens count
    return [
        Encoded([4, 9, 1, 15, 3], [False, False, True, True, False], index=0),
        Encoded([7, 12, 18, 5], [False, False, True, False], index=1),
    ]


def _cls_examples():
    return [
        Encoded([1, 5, 7, 2], [False] * 4, label=2, index=0),
        Encoded([3, 8], [False] * 2, label=0, index=1),
        Encoded([6, 2, 9, 13, 19], [False] * 5, label=1, index=2),
    ]


def _reference_grad(model, tms, ex: Encoded, objective: str) -> torch.Tensor:
    """∇θ ℓ(z) by plain autograd on the *unpadded* example, placed by hand into the layout."""
    ids = torch.tensor([ex.input_ids])
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if objective == "classification":
        loss = nn.functional.cross_entropy(out, torch.tensor([ex.label]), reduction="sum")
    else:
        m = torch.tensor(ex.target_mask[:-1])
        ce = nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="none")
        loss = (ce * m).sum()
    params = []
    for tm in tms:
        mod = model.get_submodule(tm.name)
        params.append(mod.weight)
        if tm.bias:
            params.append(mod.bias)
    grads = iter(torch.autograd.grad(loss, params))
    parts = []
    for tm in tms:
        gw = next(grads)
        if tm.transposed:  # Conv1D stores (in, out)
            gw = gw.T
        if tm.bias:
            gw = torch.cat([gw, next(grads)[:, None]], dim=1)
        assert gw.shape == (tm.out_features, tm.in_dim)
        parts.append(gw.reshape(-1))
    return torch.cat(parts)


def _set_params(model, tms, theta):
    """Write θ into the model's real weight/bias tensors (Conv1D transposed)."""
    with torch.no_grad():
        for tm, m in zip(tms, unflatten(theta, tms).values()):
            mod = model.get_submodule(tm.name)
            w = m[:, : tm.in_features]
            mod.weight.copy_(w.T if tm.transposed else w)
            if tm.bias:
                mod.bias.copy_(m[:, tm.in_features])


# ------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("which", ["neox2", "gpt2"])
def test_layout_offsets_blocks_and_flat_params(which, request):
    model = request.getfixturevalue(which)
    tms = tracked_modules(model, per_head=True)
    offsets, blocks, D = param_layout(tms)
    o = 0
    for tm in tms:
        assert offsets[tm.name] == o
        covered = []
        for b in tm.blocks:
            s, e = blocks[b.name]
            assert (s, e) == (o + b.row_start * tm.in_dim, o + b.row_stop * tm.in_dim)
            covered.append((s, e))
        covered.sort()
        assert covered[0][0] == o and covered[-1][1] == o + tm.out_features * tm.in_dim
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        o += tm.out_features * tm.in_dim
    assert D == o
    theta = flat_params(model, tms)
    assert theta.shape == (D,)
    # element (r, c) of W_eff sits at offset + r * in_dim + c; bias is the last column
    for tm in tms:
        mod = model.get_submodule(tm.name)
        W = mod.weight.detach()
        for r, c in [(0, 0), (tm.out_features - 1, 1), (2, tm.in_features - 1)]:
            want = W[c, r] if tm.transposed else W[r, c]
            assert theta[offsets[tm.name] + r * tm.in_dim + c] == want
        if tm.bias:
            r = tm.out_features - 2
            assert theta[offsets[tm.name] + r * tm.in_dim + tm.in_features] == mod.bias[r]
    if which == "gpt2":
        assert any(tm.transposed for tm in tms)
    x = torch.randn(D, 3, dtype=torch.float64)
    assert torch.equal(flatten(unflatten(x, tms), tms), x)
    assert torch.equal(flatten(unflatten(x[:, 0], tms), tms), x[:, 0])


# ------------------------------------------------------------------------------------------------
# Per-example gradients


@pytest.mark.parametrize(
    "which,objective,examples",
    [
        ("neox2", "lm", _lm_examples),
        ("neox1", "answer", _answer_examples),
        ("gpt2", "lm", _lm_examples),
        ("classifier", "classification", _cls_examples),
    ],
)
def test_flat_example_grads_match_autograd(which, objective, examples, request):
    model = request.getfixturevalue(which)
    tms = tracked_modules(model)
    exs = examples()
    batch = collate(exs, pad_id=0)  # right-padded: the padding must not change anything
    G = flat_example_grads(model, tms, batch, objective)
    D = param_layout(tms).D
    assert G.shape == (len(exs), D) and G.dtype == torch.float64
    for n, ex in enumerate(exs):
        ref = _reference_grad(model, tms, ex, objective)
        assert torch.allclose(G[n], ref, rtol=1e-9, atol=1e-11), (n, (G[n] - ref).abs().max())
    assert G.abs().max() > 1e-3  # not vacuous
    losses = per_example_losses(model, tms, batch, objective)
    assert losses.shape == (len(exs),) and bool((losses > 0).all())


def test_float32_model_is_converted_on_a_copy_and_train_mode_restored(neox1):
    import copy

    m32 = copy.deepcopy(neox1).float().train()
    tms = tracked_modules(m32)
    batch = collate(_lm_examples())
    g32 = flat_example_grads(m32, tms, batch, "lm")
    assert g32.dtype == torch.float64
    assert next(m32.parameters()).dtype == torch.float32 and m32.training  # caller's model untouched
    ref = flat_example_grads(copy.deepcopy(m32).double().eval(), tms, batch, "lm")
    assert torch.allclose(g32, ref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# GGN


class _EmbedLinear(nn.Module):
    """Frozen embedding followed by one tracked linear layer: logits are linear in θ, so GGN = Hessian."""

    def __init__(self, d=6):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.proj = nn.Linear(d, V)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(self.emb(input_ids))


def test_ggn_equals_hessian_for_linear_model():
    torch.manual_seed(0)
    model = _EmbedLinear().double()
    tms = [TrackedModule("proj", "mlp", 6, V, True, False, (Block("proj", "proj", "mlp", 0, V),))]
    exs = _lm_examples()
    batches = [collate(exs[:2]), collate(exs[2:])]
    G = exact_ggn(model, tms, batches, "lm")
    theta0 = flat_params(model, tms)

    def L(theta):
        W = theta.view(V, 7)
        total = 0.0
        for ex in exs:
            ids = torch.tensor(ex.input_ids)
            logits = model.emb(ids).detach() @ W[:, :6].T + W[:, 6]
            ce = nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
            total = total + (ce * torch.tensor(ex.target_mask[:-1])).sum()
        return total / len(exs)

    Hs = torch.autograd.functional.hessian(L, theta0)
    assert torch.allclose(G, Hs, rtol=1e-10, atol=1e-12), (G - Hs).abs().max()
    assert Hs.abs().max() > 1e-2


def test_ggn_is_true_fisher_over_model_labels(neox1):
    """With one counted position per example, G = Σ_y p(y) g_y g_yᵀ exactly (labels from the model)."""
    tms = tracked_modules(neox1)
    prompts = [[4, 9, 1], [7, 12]]
    G = exact_ggn(neox1, tms, collate([Encoded(p + [1], [False] * (len(p) - 1) + [True, False]) for p in prompts]), "answer")
    F = torch.zeros_like(G)
    for p in prompts:
        # every possible label y at the last position (its input never affects the prediction before it)
        exs = [Encoded(p + [y], [False] * (len(p) - 1) + [True, False]) for y in range(V)]
        batch = collate(exs)
        g = flat_example_grads(neox1, tms, batch, "answer")  # (V, D): g_y = ∇ −log p(y)
        with torch.no_grad():
            logits = neox1(input_ids=torch.tensor([p])).logits[0, -1]
        prob = torch.softmax(logits, -1)
        F += torch.einsum("y,yd,ye->de", prob, g, g)
    F /= len(prompts)
    assert torch.allclose(G, F, rtol=1e-9, atol=1e-12), (G - F).abs().max()


def test_ggn_symmetric_psd_and_equals_linearised_second_derivative(neox2):
    model = neox2
    tms = tracked_modules(model)
    exs = _lm_examples()
    batch = collate(exs)
    G = exact_ggn(model, tms, batch, "lm")
    D = G.shape[0]
    assert torch.equal(G, G.T)
    ev = torch.linalg.eigvalsh(G)
    assert ev.min() > -1e-10 * ev.max() and ev.max() > 1e-2

    theta0 = flat_params(model, tms)
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(D, dtype=torch.float64, generator=gen)
    v /= v.norm()
    ids = batch.input_ids
    mask = batch.target_mask[:, :-1]
    tgt = ids[:, 1:]

    def logits_at(theta):
        _set_params(model, tms, theta)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=batch.attention_mask).logits[:, :-1]

    def loss(z):
        ce = nn.functional.cross_entropy(z.reshape(-1, V), tgt.reshape(-1), reduction="none").view(tgt.shape)
        return (ce * mask).sum() / len(exs)

    try:
        h = 1e-5
        z0 = logits_at(theta0)
        Jv = (logits_at(theta0 + h * v) - logits_at(theta0 - h * v)) / (2 * h)  # central differences
        eps = 1e-3
        zp, zm = logits_at(theta0 + eps * v), logits_at(theta0 - eps * v)
    finally:
        _set_params(model, tms, theta0)
    lin = (loss(z0 + eps * Jv) - 2 * loss(z0) + loss(z0 - eps * Jv)) / eps**2
    vGv = v @ G @ v
    assert torch.isclose(vGv, lin, rtol=1e-5), (vGv, lin)
    # the full second derivative (not linearised) differs: the check above discriminates GGN from Hessian
    full = (loss(zp) - 2 * loss(z0) + loss(zm)) / eps**2
    assert not torch.isclose(vGv, full, rtol=1e-3)


@pytest.mark.parametrize(
    "which,objective,examples",
    [("neox2", "lm", _lm_examples), ("gpt2", "answer", _answer_examples), ("classifier", "classification", _cls_examples)],
)
def test_ggn_vector_product_matches_dense(which, objective, examples, request):
    model = request.getfixturevalue(which)
    tms = tracked_modules(model)
    exs = examples()
    batches = [collate(exs[:1]), collate(exs[1:])]
    G = exact_ggn(model, tms, batches, objective)
    mv = ggn_vector_product(model, tms, batches, objective)
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(G.shape[0], 3, dtype=torch.float64, generator=gen)
    ref = G @ X
    assert torch.allclose(mv(X), ref, rtol=1e-9, atol=1e-11 * ref.abs().max())
    assert torch.allclose(mv(X[:, 1]), ref[:, 1], rtol=1e-9, atol=1e-11 * ref.abs().max())
    assert ref.abs().max() > 1e-3


def test_ggn_normalised_by_number_of_examples(neox1):
    tms = tracked_modules(neox1)
    exs = _lm_examples()
    b1, b2 = collate(exs[:1]), collate(exs[1:])
    G = exact_ggn(neox1, tms, [b1, b2], "lm")
    G1 = exact_ggn(neox1, tms, b1, "lm")
    G2 = exact_ggn(neox1, tms, b2, "lm")
    assert torch.allclose(G, (1 * G1 + 2 * G2) / 3, rtol=1e-10, atol=1e-13)
    # same data in one padded batch: identical
    assert torch.allclose(G, exact_ggn(neox1, tms, collate(exs), "lm"), rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# Dense helpers


def test_block_diagonal_levels_mean_eigenvalue_and_damped_solve(neox1):
    tms = tracked_modules(neox1, per_head=True)
    layout = param_layout(tms)
    D = layout.D
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(D, D, dtype=torch.float64, generator=gen)
    G = A @ A.T / D
    Bd = block_diagonal(G, layout)
    Md = block_diagonal(G, layout, level="module")
    Md3 = block_diagonal(G, tuple(layout[:3]), level="module")  # module ranges derived from offsets
    assert torch.equal(Md, Md3)
    inblock = torch.zeros(D, D, dtype=torch.bool)
    for s, e in layout.blocks.values():
        inblock[s:e, s:e] = True
    assert torch.equal(Bd[inblock], G[inblock]) and bool((Bd[~inblock] == 0).all())
    inmod = torch.zeros(D, D, dtype=torch.bool)
    for s, e in layout.modules.values():
        inmod[s:e, s:e] = True
    assert torch.equal(Md[inmod], G[inmod]) and bool((Md[~inmod] == 0).all())
    # per-head blocks are strictly finer than modules for the QKV projection
    assert int(inblock.sum()) < int(inmod.sum())
    assert torch.equal(Md * inblock, Bd)

    ev = torch.linalg.eigvalsh(G)
    assert mean_eigenvalue(G) == pytest.approx(float(ev.mean()), rel=1e-12)
    v = torch.randn(D, 2, dtype=torch.float64, generator=gen)
    lam = 0.1
    x = damped_solve(G, v, lam)
    assert torch.allclose(G @ x + lam * x, v, atol=1e-10)
    assert torch.allclose(damped_solve(G, v[:, 0], lam), x[:, 0], atol=1e-12)
