"""Precision rules of a fit (float32 sums and factors by default, float64 on request or for a float64
model, half-precision models cast per layer) against the float64 path, and device hygiene: no tensor
of the fit, load or preconditioning paths is created on the default device."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import spearmanr

from msif.curvature.factors import FactorError, FactorSet
from msif.curvature.fit import FitConfig, fit_factors
from msif.curvature.hooks import per_example_grads

from helpers import batches, random_answer_examples, random_lm_examples, tiny_neox, tiny_neox_classifier, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A tiny LM trained a little (peaked predictions, a spread spectrum), in float64."""
    model = tiny_neox(seed=2, hidden_size=32, intermediate_size=64)
    data = batches(random_lm_examples(64, seed=1, min_len=6, max_len=12), 8)
    train_steps(model, data, "lm", steps=60, lr=3e-3)
    return model, data


def _scores(model, fs, data, queries, damping):
    tms = list(fs.modules.values())
    q = per_example_grads(model, tms, queries, "answer")
    U = fs.precondition(q, damping)
    out = 0
    for b in data:
        c = per_example_grads(model, tms, b, "lm")
        out = out + sum(torch.einsum("qoi,noi->qn", U[n].double(), c[n].double()) for n in U)
        out = out if isinstance(out, torch.Tensor) else torch.tensor(out)
    return out


def test_dtype_rules():
    m64 = tiny_neox(seed=1)
    data = batches(random_lm_examples(8), 4)
    assert fit_factors(m64, data, FitConfig(), fingerprint="t").dtype == torch.float64  # a float64 model keeps float64
    m32 = copy.deepcopy(m64).float()
    fs = fit_factors(m32, data, FitConfig(), fingerprint="t")
    assert fs.dtype == torch.float32 and all(x.dtype == torch.float32 for x in fs._tensors().values())
    assert fs.meta["stats_dtype"] == "float32"
    fs = fit_factors(m32, data, FitConfig(stats_dtype="float64", factor_dtype="float64"), fingerprint="t")
    assert all(x.dtype == torch.float64 for x in fs._tensors().values())
    mixed = fit_factors(m32, data, FitConfig(stats_dtype="float64", factor_dtype="float32"), fingerprint="t")
    assert mixed.A_sum[next(iter(mixed.A_sum))].dtype == torch.float64 and mixed.dtype == torch.float32
    with pytest.raises(ValueError, match="stats_dtype"):
        FitConfig(stats_dtype="float16").validate()


def test_float32_defaults_match_the_float64_path(trained, tmp_path):
    model64, data = trained
    model32 = copy.deepcopy(model64).float()
    f64 = fit_factors(model64, data, FitConfig(), fingerprint="t")
    f32 = fit_factors(model32, [b for b in data], FitConfig(), fingerprint="t")
    assert f32.dtype == torch.float32
    for name in f64.eigA:  # eigenvalues relative to the largest: 1e-4
        e64, e32 = f64.eigA[name], f32.eigA[name].double()
        assert float((e64 - e32).abs().max() / e64.max()) < 1e-4, name
    for name in f64.eigS:
        e64, e32 = f64.eigS[name], f32.eigS[name].double()
        assert float((e64 - e32).abs().max() / e64.max().clamp_min(1e-30)) < 1e-4, name
    mean64, mean32 = f64.mean_eigenvalue(), f32.mean_eigenvalue()
    assert abs(mean32 - mean64) / mean64 < 1e-4
    queries = batches(random_answer_examples(6, seed=5), 6)[0]
    for damping in ("0.1x", "1x"):
        s64 = _scores(model64, f64, data, queries, damping)
        s32 = _scores(model32, f32, data, queries, damping)
        rho = [spearmanr(s64[q], s32[q])[0] for q in range(s64.shape[0])]
        assert min(rho) >= 0.999, (damping, rho)
    # the stored file is float32 and says so
    f32.save(tmp_path / "f")
    back = FactorSet.load(tmp_path / "f")
    assert back.meta["factor_dtype"] == "float32" and back.dtype == torch.float32


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_model_sums_in_float32(trained, half):
    model64, data = trained
    m32 = copy.deepcopy(model64).float()
    mh = copy.deepcopy(model64).to(half)
    f32 = fit_factors(m32, data, FitConfig(strategy="kfac"), fingerprint="t")
    fh = fit_factors(mh, data, FitConfig(strategy="kfac"), fingerprint="t")
    assert fh.dtype == torch.float32 and fh.meta["model_dtype"] == str(half).removeprefix("torch.")
    for name, A in f32.A_sum.items():  # activations of the half model, summed in float32: ~1e-2 apart
        assert float((fh.A_sum[name] - A).norm() / A.norm()) < 5e-2, name


def test_loading_for_scoring_keeps_only_what_preconditioning_needs(trained, tmp_path):
    model, data = trained
    fs = fit_factors(copy.deepcopy(model).float(), data, FitConfig(), fingerprint="t")
    fs.save(tmp_path / "f")
    full, lean = FactorSet.load(tmp_path / "f"), FactorSet.load(tmp_path / "f", for_scoring=True)
    assert not lean.A_sum and all(st.S_sum is None for st in lean.stats.values())
    sums = sum(x.numel() * x.element_size() for k, x in full._tensors().items() if k.startswith(("A_sum/", "S_sum/")))
    assert sums > 0 and lean.nbytes() == full.nbytes() - sums
    g = {n: torch.randn(3, tm.out_features, tm.in_dim, generator=torch.Generator().manual_seed(0)) for n, tm in fs.modules.items()}
    a, b = full.precondition(g, "0.1x"), lean.precondition(g, "0.1x")
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(FactorError, match="scoring only"):
        lean.save(tmp_path / "g")
    with pytest.raises(FactorError, match="scoring only"):
        lean.merge_(full)


@pytest.mark.parametrize("cfg", [
    FitConfig(), FitConfig(strategy="kfac"), FitConfig(strategy="diagonal"), FitConfig(refine=1),
    FitConfig(labels="empirical", samples=1), FitConfig(samples=2), FitConfig(objective="answer"),
], ids=["ekfac", "kfac", "diagonal", "refine", "empirical", "samples", "answer"])
def test_fit_precondition_and_resume_create_nothing_on_the_default_device(tmp_path, cfg):
    """With the default device set to ``meta``, every tensor created without an explicit device has no
    data and cannot mix with the CPU model's: a path that passes creates nothing on the default device
    (on a GPU it would otherwise land on the CPU). The data are built first, as a loader would."""
    model = tiny_neox(seed=1)
    exs = random_answer_examples(8) if cfg.objective == "answer" else random_lm_examples(8)
    data = batches(exs, 4)
    torch.set_default_device("meta")
    try:
        fit_factors(model, data[:1], cfg, fingerprint="t", checkpoint=tmp_path / "ck", checkpoint_every=1)
        fs = fit_factors(model, data, cfg, fingerprint="t", checkpoint=tmp_path / "ck2", checkpoint_every=1)
        fs.save(tmp_path / "f")
        lean = FactorSet.load(tmp_path / "f", for_scoring=True)
        g = {n: torch.ones(2, tm.out_features, tm.in_dim, dtype=torch.float64, device="cpu") for n, tm in fs.modules.items()}
        out = lean.precondition(g, "0.1x")
    finally:
        torch.set_default_device("cpu")
    assert all(x.device.type == "cpu" and torch.isfinite(x).all() for x in out.values())


def test_classifier_fit_creates_nothing_on_the_default_device():
    from msif.data.encoding import Encoded, collate

    model = tiny_neox_classifier(seed=1)
    exs = [Encoded(e.input_ids, [False] * len(e.input_ids), index=e.index, label=e.index % 3) for e in random_lm_examples(6)]
    data = [collate(exs[:3]), collate(exs[3:])]
    torch.set_default_device("meta")  # see the test above
    try:
        fs = fit_factors(model, data, FitConfig(objective="classification"), fingerprint="t")
    finally:
        torch.set_default_device("cpu")
    assert fs.device.type == "cpu"
