"""EK-FAC / K-FAC / diagonal factors against brute-force and dense computation (float64)."""

from __future__ import annotations


import pytest
import torch

from msif.curvature.factors import Damping, FactorError, FactorSet
from msif.curvature.fit import FitConfig, fit_factors
from msif.curvature.hooks import per_example_grads
from msif.data.encoding import Encoded, collate
from msif.models.adapters import tracked_modules
from msif.objectives import model_logits, sampled_targets, summed_loss

from helpers import batches, random_answer_examples, random_lm_examples, tiny_neox, tiny_neox_classifier


def _rand_grads(fs: FactorSet, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*lead, tm.out_features, tm.in_dim, generator=g, dtype=torch.float64) for n, tm in fs.modules.items()}


# ------------------------------------------------------------------------------------------------
# exactly Kronecker: one example of one token, empirical Fisher ⇒ G_block = (s sᵀ) ⊗ (a aᵀ)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_exact_kronecker_block(strategy):
    model = tiny_neox_classifier(seed=1)
    ex = Encoded([7], [False], label=2, index=0)
    data = [collate([ex])]
    fs = fit_factors(model, data, FitConfig(objective="classification", strategy=strategy, labels="empirical"), fingerprint="t")
    dw = per_example_grads(model, list(fs.modules.values()), data[0], "classification")
    lam = 1e-3
    v = _rand_grads(fs, seed=3)
    got = fs.precondition(v, lam)
    for tm in fs.modules.values():
        for blk in tm.blocks:
            g = dw[tm.name][0, blk.rows, :].reshape(-1)
            G = torch.outer(g, g)  # the exact (empirical-Fisher) block: rank one, exactly Kronecker
            want = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), v[tm.name][blk.rows].reshape(-1))
            out = got[tm.name][blk.rows].reshape(-1)
            assert torch.allclose(out, want, rtol=1e-8, atol=1e-8 * want.abs().max()), blk.name


# ------------------------------------------------------------------------------------------------
# brute force A, S, Λ from autograd on a 2-layer GPT-NeoX
# ------------------------------------------------------------------------------------------------
def _brute_force(model, tms, examples, objective, seed):
    """Per example: plain forward hooks for a, retain_grad for s, and real parameter gradients for DW."""
    A = {tm.name: 0 for tm in tms}
    S = {b.name: 0 for tm in tms for b in tm.blocks}
    ntok = 0
    dws = []
    for ex in examples:
        batch = collate([ex])
        rec = {}
        hs = []
        for tm in tms:
            mod = model.get_submodule(tm.name)

            def hook(m, args, out, name=tm.name, bias=tm.bias):
                a = args[0][0]
                rec[name] = (torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a, out)
                out.retain_grad()

            hs.append(mod.register_forward_hook(hook))
        model.zero_grad()
        logits = model_logits(model, batch)
        y = sampled_targets(logits, batch, seed, stream=0)
        summed_loss(logits, y).sum().backward()
        for h in hs:
            h.remove()
        ntok += len(ex.input_ids)
        for tm in tms:
            a, out = rec[tm.name]
            A[tm.name] = A[tm.name] + a.T @ a
            s = out.grad[0]
            for b in tm.blocks:
                S[b.name] = S[b.name] + s[:, b.rows].T @ s[:, b.rows]
    # Λ uses the second stream of labels: real parameter gradients per example
    for ex in examples:
        batch = collate([ex])
        model.zero_grad()
        logits = model_logits(model, batch)
        y = sampled_targets(logits, batch, seed, stream=1)
        summed_loss(logits, y).sum().backward()
        d = {}
        for tm in tms:
            mod = model.get_submodule(tm.name)
            w = mod.weight.grad.T if tm.transposed else mod.weight.grad
            d[tm.name] = torch.cat([w, mod.bias.grad[:, None]], 1) if tm.bias else w.clone()
        dws.append(d)
    model.zero_grad()
    return {k: v / ntok for k, v in A.items()}, {k: v / ntok for k, v in S.items()}, dws


@pytest.mark.parametrize("objective", ["lm", "answer"])
def test_factors_equal_brute_force(objective):
    model = tiny_neox(seed=2)
    examples = random_lm_examples(12, seed=5) if objective == "lm" else random_answer_examples(12, seed=5)
    fs = fit_factors(model, batches(examples, 4), FitConfig(objective=objective, seed=11), fingerprint="t")
    tms = list(fs.modules.values())
    A, S, dws = _brute_force(model, tms, examples, objective, seed=11)
    for tm in tms:
        assert torch.allclose(fs.A_sum[tm.name] / fs.n_tokens, A[tm.name], rtol=1e-10, atol=1e-12)
        QA = fs.QA[tm.name]
        for b in tm.blocks:
            assert torch.allclose(fs.stats[b.name].S_sum / fs.n_tokens, S[b.name], rtol=1e-10, atol=1e-14)
            QS = fs.QS[b.name]
            lam = sum((QS.T @ d[tm.name][b.rows] @ QA) ** 2 for d in dws) / len(dws)
            assert torch.allclose(fs.lambdas(b.name), lam, rtol=1e-9, atol=1e-14), b.name


def test_ihvp_equals_dense_formula():
    model = tiny_neox(seed=3)
    fs = fit_factors(model, batches(random_lm_examples(10, seed=1), 5), FitConfig(), fingerprint="t")
    v = _rand_grads(fs, seed=9)
    for damping in (1e-4, "0.1x"):
        lam = fs.resolve_damping(damping)
        got = fs.precondition(v, damping)
        for tm in fs.modules.values():
            for b in tm.blocks:
                K = torch.kron(fs.QS[b.name], fs.QA[tm.name])
                dense = K @ torch.diag(1.0 / (fs.lambdas(b.name).reshape(-1) + lam)) @ K.T
                want = dense @ v[tm.name][b.rows].reshape(-1)
                assert torch.allclose(got[tm.name][b.rows].reshape(-1), want, rtol=1e-10, atol=1e-12 * want.abs().max())


def test_kfac_scale_matches_ggn_scale_and_diagonal():
    model = tiny_neox(seed=4)
    data = batches(random_lm_examples(16, seed=2), 4)
    ek = fit_factors(model, data, FitConfig(strategy="ekfac"), fingerprint="t")
    kf = fit_factors(model, data, FitConfig(strategy="kfac"), fingerprint="t")
    dg = fit_factors(model, data, FitConfig(strategy="diagonal"), fingerprint="t")
    # trace(G) is estimated by all three; K-FAC only approximately (Kronecker assumption), EK-FAC and
    # diagonal exactly the same quantity (the rotation preserves the trace of E[vec DW vec DWᵀ])
    assert ek.mean_eigenvalue() == pytest.approx(dg.mean_eigenvalue(), rel=1e-9)
    assert 0.2 < kf.mean_eigenvalue() / ek.mean_eigenvalue() < 5


# ------------------------------------------------------------------------------------------------
# labels: sampled at the right positions, never at padding or prompt positions
# ------------------------------------------------------------------------------------------------
def test_sampled_labels_come_from_the_same_position_and_only_counted_ones():
    V = 11
    exs = [Encoded([3, 4, 5, 6, 7, 8], [False, False, True, True, True, False], index=0),
           Encoded([3, 4, 5], [True, True, False], index=1)]
    batch = collate(exs)
    T = batch.input_ids.shape[1]
    logits = torch.full((2, T, V), -60.0, dtype=torch.float64)
    for t in range(T):
        logits[:, t, (3 * t + 1) % V] = 60.0  # position t predicts token (3t+1) mod V, deterministically
    y = sampled_targets(logits, batch, seed=0)
    for i in range(2):
        for t in range(T):
            if batch.target_mask[i, t]:
                assert y[i, t] == (3 * t + 1) % V
            else:
                assert y[i, t] == -100  # prompt, last and padding positions carry no label


@pytest.mark.parametrize("path", ["head", "logits"])
def test_sampled_fisher_matches_analytic_expectation_and_detects_shift(monkeypatch, path):
    """E_y[DW DWᵀ] over sampled labels equals the GGN; a one-position shift of the labels does not.
    ``head``: the closed-form head gradient of registered causal LMs; ``logits``: the model's own forward."""
    import msif.curvature.hooks as hooksmod
    import msif.objectives as obj

    if path == "logits":
        monkeypatch.setattr(hooksmod, "plain_lm_head", lambda model: None)

    model = tiny_neox(seed=6, num_hidden_layers=1)
    torch.manual_seed(0)
    with torch.no_grad():  # peaked, position-dependent predictions make a shift visible
        model.get_output_embeddings().weight.mul_(8.0)
    ex = random_lm_examples(1, seed=3, min_len=6, max_len=6)[0]
    N = 600
    copies = [Encoded(ex.input_ids, ex.target_mask, index=i) for i in range(N)]
    data = batches(copies, 100)
    cfg = FitConfig(strategy="diagonal")
    fs = fit_factors(model, data, cfg, fingerprint="t")
    # analytic diagonal of the GGN: Σ_t Σ_k p_tk (∂ log p_k/∂θ)², via per-label gradients
    tms = list(fs.modules.values())
    batch = collate([ex])
    logits = model_logits(model, batch)[0]
    diag = {tm.name: 0 for tm in tms}
    Vv = logits.shape[-1]
    for t in range(len(ex.input_ids) - 1):
        p = torch.softmax(logits[t], -1)
        for k in range(Vv):
            y = torch.full((1, len(ex.input_ids)), -100)
            y[0, t] = k
            g = per_example_grads(model, tms, batch, "lm", targets=y)
            for n in diag:
                diag[n] = diag[n] + float(p[k]) * g[n][0] ** 2
    err = lambda f: sum(float((f.stats[b].lambda_sum / f.n_examples_lambda - diag[f.blocks[b].module][f.blocks[b].rows]).abs().sum()) for b in f.blocks) / sum(float(d.abs().sum()) for d in diag.values())
    good = err(fs)
    assert good < 0.1, good

    real = obj.sampled_targets

    def shifted(logits, batch, seed, stream=0):
        y = real(logits, batch, seed, stream)
        z = torch.full_like(y, -100)
        z[:, 1:] = y[:, :-1]  # label drawn at t used as the target of t + 1
        return torch.where(batch.target_mask, z, torch.full_like(z, -100))

    if path == "head":  # the head path equals the logits path (test_head_gradient_equals_the_models_own_loss)
        return
    monkeypatch.setattr(obj, "sampled_targets", shifted)
    bad = err(fit_factors(model, data, cfg, fingerprint="t"))
    assert bad > 3 * good and bad > 0.1, (good, bad)


@pytest.mark.parametrize("objective,labels", [("lm", "sampled"), ("lm", "empirical"), ("answer", "sampled")])
@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "llama"])
def test_head_gradient_equals_the_models_own_loss(monkeypatch, objective, labels, arch):
    """The closed-form head gradient (no (B, T, V) logits) gives the factors of the autograd path."""
    import msif.curvature.hooks as hooksmod
    import msif.objectives as obj

    model = _arch_model(arch)
    assert obj.plain_lm_head(model) is not None
    exs = random_lm_examples(12, seed=8) if objective == "lm" else random_answer_examples(12, seed=8)
    data = batches(exs, 5)
    monkeypatch.setattr(obj, "LOGIT_CHUNK", 3 * model.config.vocab_size)  # several chunks per batch
    # covariance sums (kfac) and per-sequence gradient squares (diagonal): basis-free, so comparable
    cfgs = [FitConfig(objective=objective, labels=labels, strategy=st) for st in ("kfac", "diagonal")]
    head = [fit_factors(model, data, c, fingerprint="t") for c in cfgs]
    monkeypatch.setattr(hooksmod, "plain_lm_head", lambda m: None)
    full = [fit_factors(model, data, c, fingerprint="t") for c in cfgs]
    for h, f in zip(head, full):
        sums = {k: x for k, x in f._tensors().items() if k.startswith(("A_sum/", "S_sum/", "lambda_sum/"))}
        assert sums and h.n_tokens == f.n_tokens
        for k, x in sums.items():
            assert torch.allclose(h._tensors()[k], x, rtol=1e-10, atol=1e-14), k


def _arch_model(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    if arch == "gpt_neox":
        return tiny_neox(seed=3)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=64)).double().eval()
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=50, max_position_embeddings=64)).double().eval()


# ------------------------------------------------------------------------------------------------
# invariance to batch size and padding (per-example sampling seeds)
# ------------------------------------------------------------------------------------------------
def test_batch_size_and_padding_do_not_change_factors():
    model = tiny_neox(seed=7)
    exs = random_lm_examples(16, seed=4)
    f1 = fit_factors(model, batches(exs, 1), FitConfig(batch_size=1), fingerprint="t")
    f8 = fit_factors(model, batches(exs, 8), FitConfig(batch_size=8), fingerprint="t")
    padded = [collate(exs[i : i + 8], pad_to=14) for i in range(0, 16, 8)]
    fp = fit_factors(model, padded, FitConfig(batch_size=8), fingerprint="t")
    assert f1.n_tokens == f8.n_tokens == fp.n_tokens == sum(len(e.input_ids) for e in exs)
    v = _rand_grads(f1, seed=1)
    ref = f1.precondition(v, "0.1x")
    for other in (f8, fp):
        for m in f1.A_sum:
            assert torch.allclose(other.A_sum[m], f1.A_sum[m], rtol=1e-6, atol=1e-10)
        out = other.precondition(v, "0.1x")
        for m in ref:
            assert torch.allclose(out[m], ref[m], rtol=1e-6, atol=1e-6 * ref[m].abs().max())


# ------------------------------------------------------------------------------------------------
# store: immutable factors, round trip, truncated file, other model
# ------------------------------------------------------------------------------------------------
def test_save_load_apply_twice_is_exact_and_never_mutates(tmp_path):
    model = tiny_neox(seed=8)
    fs = fit_factors(model, batches(random_lm_examples(10, seed=6), 5), FitConfig(), fingerprint="fp-a")
    v = _rand_grads(fs, seed=2)
    fresh = {d: fs.precondition(v, d) for d in (1e-3, "1x")}
    fs.save(tmp_path / "f")
    loaded = FactorSet.load(tmp_path / "f")
    before = {k: x.clone() for k, x in loaded._tensors().items()}
    for _ in range(2):
        for d in (1e-3, "1x", 1e-3):
            out = loaded.precondition(v, d)
            for m in out:
                assert torch.equal(out[m], fresh[d][m])
    after = loaded._tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)
    loaded.check_model("fp-a")
    with pytest.raises(FactorError, match="fitted on model"):
        loaded.check_model("fp-b")


def test_truncated_or_corrupt_factor_file(tmp_path):
    model = tiny_neox(seed=8)
    fs = fit_factors(model, batches(random_lm_examples(6, seed=6), 3), FitConfig(), fingerprint="t")
    fs.save(tmp_path / "f")
    p = tmp_path / "f" / "factors.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FactorError, match="truncated"):
        FactorSet.load(tmp_path / "f")
    p.write_bytes(data[:-8] + b"\x00" * 8)
    with pytest.raises(FactorError, match="corrupt"):
        FactorSet.load(tmp_path / "f")
    with pytest.raises(FactorError, match="no msif factors"):
        FactorSet.load(tmp_path / "nothing")


def test_edited_or_inconsistent_factor_metadata_is_refused(tmp_path):
    """factors.json decides every score (the Λ normaliser, the strategy, the shapes): an edit, a missing
    entry or a claimed shape that disagrees with the tensors is one FactorError, not other scores."""
    import json

    model = tiny_neox(seed=8)
    fs = fit_factors(model, batches(random_lm_examples(6, seed=6), 3), FitConfig(), fingerprint="t")
    fs.save(tmp_path / "f")
    mp = tmp_path / "f" / "factors.json"
    good = json.loads(mp.read_text())
    FactorSet.load(tmp_path / "f")

    def write(meta):
        mp.write_text(json.dumps(meta))

    write({**good, "n_examples_lambda": good["n_examples_lambda"] * 2})
    with pytest.raises(FactorError, match="edited"):
        FactorSet.load(tmp_path / "f")
    unsealed = {k: v for k, v in good.items() if k != "meta_sha256"}  # without the checksum: still checked
    write({k: v for k, v in unsealed.items() if k != "modules"})
    with pytest.raises(FactorError, match="malformed.*modules"):
        FactorSet.load(tmp_path / "f")
    mods = json.loads(json.dumps(unsealed["modules"]))
    mods[0]["in_features"] += 1
    write({**unsealed, "modules": mods})
    with pytest.raises(FactorError, match="claims"):
        FactorSet.load(tmp_path / "f")
    write(good)
    assert FactorSet.load(tmp_path / "f").n_examples_lambda == good["n_examples_lambda"]


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    model = tiny_neox(seed=8)
    fs = fit_factors(model, batches(random_lm_examples(6, seed=6), 3), FitConfig(), fingerprint="t")
    fs.save(tmp_path / "f")
    good = (tmp_path / "f" / "factors.safetensors").read_bytes()
    import msif.curvature.factors as fmod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmod, "_sha256", boom)
    with pytest.raises(KeyboardInterrupt):
        fs.save(tmp_path / "f")
    assert (tmp_path / "f" / "factors.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_merge_of_partial_runs_equals_one_run():
    model = tiny_neox(seed=9)
    exs = random_lm_examples(12, seed=8)
    whole = fit_factors(model, batches(exs, 4), FitConfig(strategy="kfac"), fingerprint="t")
    a = fit_factors(model, batches(exs[:4], 4), FitConfig(strategy="kfac"), fingerprint="t")
    b = fit_factors(model, batches(exs[4:], 4), FitConfig(strategy="kfac"), fingerprint="t")
    a.merge_(b)
    a.eigendecompose()
    v = _rand_grads(whole)
    x, y = whole.precondition(v, 1e-3), a.precondition(v, 1e-3)
    assert all(torch.allclose(x[m], y[m], rtol=1e-8) for m in x)


def test_damping_parse_and_bad_values():
    assert Damping.parse("0.1x") == Damping(0.1, True)
    assert Damping.parse(1e-3) == Damping(1e-3, False)
    with pytest.raises(ValueError):
        Damping.parse(float("nan"))
    with pytest.raises(ValueError):
        Damping.parse(-1.0)


def test_modules_subset_and_identity():
    model = tiny_neox(seed=10)
    data = batches(random_lm_examples(6), 3)
    mlp = fit_factors(model, data, FitConfig(modules="mlp", strategy="kfac"), fingerprint="t")
    assert {tm.role for tm in mlp.modules.values()} == {"mlp"}
    idf = fit_factors(model, data, FitConfig(strategy="identity"), fingerprint="t")
    v = _rand_grads(idf)
    out = idf.precondition(v, 0.5)
    assert all(torch.equal(out[m], v[m]) for m in v)
    att = {n: x for n, x in _rand_grads(fit_factors(model, data, FitConfig(modules="attention", strategy="kfac"), fingerprint="t")).items()}
    with pytest.raises(FactorError, match="no factors for module"):
        mlp.precondition(att, 1e-3)


def test_empty_answer_batch_is_rejected():
    model = tiny_neox(seed=10)
    ex = Encoded([3, 4, 5], [False, False, False], index=0)
    with pytest.raises(ValueError, match="no token that counts"):
        fit_factors(model, [collate([ex])], FitConfig(objective="answer"), fingerprint="t")


def test_more_label_draws_per_example_reduce_monte_carlo_noise():
    """samples=k draws k labels per example: the sampled diagonal Fisher gets closer to the exact one."""
    model = tiny_neox(seed=6, num_hidden_layers=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    exs = random_lm_examples(4, seed=3, min_len=6, max_len=6)
    data = batches(exs, 4)
    tms = tracked_modules(model)
    exact = {tm.name: 0 for tm in tms}  # Σ_t Σ_k p_tk g_k², averaged over the 4 sequences
    for ex in exs:
        b = collate([ex])
        logits = model_logits(model, b)[0]
        for t in range(len(ex.input_ids) - 1):
            p = torch.softmax(logits[t], -1)
            for k in range(logits.shape[-1]):
                y = torch.full((1, len(ex.input_ids)), -100)
                y[0, t] = k
                g = per_example_grads(model, tms, b, "lm", targets=y)
                for n in exact:
                    exact[n] = exact[n] + float(p[k]) * g[n][0] ** 2 / len(exs)

    def err(samples, seed):
        f = fit_factors(model, data, FitConfig(strategy="diagonal", samples=samples, seed=seed), fingerprint="t")
        assert f.n_examples_lambda == 4 * samples
        return sum(float((f.lambdas(b) - exact[f.blocks[b].module][f.blocks[b].rows]).abs().sum()) for b in f.blocks) / sum(
            float(d.abs().sum()) for d in exact.values())

    one = sum(err(1, s) for s in range(3)) / 3
    many = sum(err(64, s) for s in range(3)) / 3
    assert many < 0.5 * one, (one, many)
    with pytest.raises(ValueError, match="sampled labels"):
        FitConfig(samples=2, labels="empirical").validate()


@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_zero_damping_with_zero_eigenvalues_is_refused(strategy):
    model = tiny_neox_classifier(seed=1)
    data = [collate([Encoded([7], [False], label=2, index=0)])]  # one token: rank-one blocks, many zero eigenvalues
    fs = fit_factors(model, data, FitConfig(objective="classification", strategy=strategy, labels="empirical"), fingerprint="t")
    with pytest.raises(FactorError, match="damping is 0"):
        fs.precondition(_rand_grads(fs), 0.0)
    fs.precondition(_rand_grads(fs), 1e-3)


# ------------------------------------------------------------------------------------------------
# basis refinement: alternating least squares towards the nearest Kronecker product of each block
# ------------------------------------------------------------------------------------------------
def _empirical_blocks(model, fs, examples):
    """Per-example gradients with the data labels (the empirical-Fisher pseudo-gradients), module → list."""
    tms = list(fs.modules.values())
    dws = [per_example_grads(model, tms, collate([e]), "lm") for e in examples]
    return {tm.name: torch.stack([d[tm.name][0] for d in dws]) for tm in tms}


@pytest.mark.parametrize("form", ["grads", "tokens"])
def test_one_refinement_pass_is_one_dense_als_step(form, monkeypatch):
    """Both forms of the products (through DW, or through token products, chosen by flop count) give one
    dense ALS step, with padded batches."""
    import msif.curvature.passes as passes_mod

    monkeypatch.setattr(passes_mod, "_REFINE_FORM", form)
    model = tiny_neox(seed=4)
    exs = random_lm_examples(10, seed=3)
    base = fit_factors(model, batches(exs, 5), FitConfig(labels="empirical"), fingerprint="t")
    ref = fit_factors(model, batches(exs, 5), FitConfig(labels="empirical", refine=1), fingerprint="t")
    assert all(passes_mod._token_space_cheaper(tm, 3) == (form == "tokens") for tm in base.modules.values())
    G = _empirical_blocks(model, base, exs)
    for tm in base.modules.values():
        A0 = base.A_sum[tm.name] / base.n_tokens
        dw = G[tm.name]  # (N, out, in_dim)
        A1 = sum(torch.einsum("noi,op,npj->ij", dw[:, b.rows], base.stats[b.name].S_sum / base.n_tokens, dw[:, b.rows]) for b in tm.blocks)
        A1 *= torch.trace(A0) / torch.trace(A1)
        assert torch.allclose(ref.A_sum[tm.name] / ref.n_tokens, A1, rtol=1e-9, atol=1e-13), tm.name
        for b in tm.blocks:
            S0 = base.stats[b.name].S_sum / base.n_tokens
            S1 = torch.einsum("noi,ij,npj->op", dw[:, b.rows], A0, dw[:, b.rows])
            S1 *= torch.trace(S0) / torch.trace(S1)
            assert torch.allclose(ref.stats[b.name].S_sum / ref.n_tokens, S1, rtol=1e-9, atol=1e-13), b.name
    # the refined basis is what gets used: Λ is refitted in it
    v = _rand_grads(ref, seed=2)
    assert not all(torch.allclose(base.precondition(v, 1e-3)[m], ref.precondition(v, 1e-3)[m]) for m in v)


def test_refinement_converges_to_the_nearest_kronecker_product_of_the_exact_block():
    """For a single-block module, many passes give the top Kronecker-SVD term of the dense block
    ``G_b = (1/N) Σ vec(DW_n) vec(DW_n)ᵀ`` (Van Loan–Pitsianis rearrangement + SVD). For a module whose
    blocks share ``A``, the fixed point of the least-squares problem ``Σ_b ‖G_b − S_b ⊗ A‖²`` holds."""
    model = tiny_neox(seed=6)
    exs = random_lm_examples(16, seed=7)
    fs = fit_factors(model, batches(exs, 8), FitConfig(labels="empirical", refine=60), fingerprint="t")
    G = _empirical_blocks(model, fs, exs)
    N = len(exs)

    def unit(x):
        x = x / x.norm()
        return x * torch.sign(x.reshape(-1)[x.reshape(-1).abs().argmax()])

    checked_single = checked_shared = 0
    for tm in fs.modules.values():
        A = fs.A_sum[tm.name] / fs.n_tokens
        n = A.shape[0]
        Rs = {}
        for b in tm.blocks:
            dw = G[tm.name][:, b.rows]  # (N, o, n)
            o = dw.shape[1]
            # rearranged block R[(i,k),(j,l)] = E[DW_ij DW_kl]
            Rs[b.name] = torch.einsum("nij,nkl->ikjl", dw, dw).reshape(o * o, n * n) / N
        if len(tm.blocks) == 1:
            b = tm.blocks[0]
            U, sv, Vh = torch.linalg.svd(Rs[b.name])
            assert float(sv[1] / sv[0]) < 0.9  # a gap, so that the power iteration has converged
            o = int(round(U.shape[0] ** 0.5))
            S = fs.stats[b.name].S_sum / fs.n_tokens
            assert torch.allclose(unit(S), unit(U[:, 0].reshape(o, o)), atol=1e-6), tm.name
            assert torch.allclose(unit(A), unit(Vh[0].reshape(n, n)), atol=1e-6), tm.name
            checked_single += 1
        else:
            Ss = {b.name: fs.stats[b.name].S_sum / fs.n_tokens for b in tm.blocks}
            for b in tm.blocks:  # S_b ∝ R_b vec(A)
                want = (Rs[b.name] @ A.reshape(-1)).reshape(Ss[b.name].shape)
                assert torch.allclose(unit(Ss[b.name]), unit(want), atol=1e-6), b.name
            want = sum(Rs[b.name].T @ Ss[b.name].reshape(-1) for b in tm.blocks).reshape(n, n)  # A ∝ Σ_b R_bᵀ vec(S_b)
            assert torch.allclose(unit(A), unit(want), atol=1e-6), tm.name
            checked_shared += 1
    assert checked_single and checked_shared


def test_refinement_settings_and_merge_are_guarded():
    with pytest.raises(ValueError, match="only applies to strategy 'ekfac'"):
        FitConfig(strategy="kfac", refine=1).validate()
    with pytest.raises(ValueError, match="refine"):
        FitConfig(refine=-1).validate()
    model = tiny_neox(seed=9)
    exs = random_lm_examples(8, seed=8)
    a = fit_factors(model, batches(exs[:4], 4), FitConfig(refine=1), fingerprint="t")
    b = fit_factors(model, batches(exs[4:], 4), FitConfig(refine=1), fingerprint="t")
    with pytest.raises(FactorError, match="cannot be merged"):
        a.merge_(b)


def test_saved_factor_folder_gets_the_users_umask(tmp_path):
    import os
    import stat

    model = tiny_neox(seed=8)
    fs = fit_factors(model, batches(random_lm_examples(4, seed=6), 2), FitConfig(), fingerprint="t")
    old = os.umask(0o022)
    try:
        fs.save(tmp_path / "f")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "f" / "factors.json").stat().st_mode) == 0o644
