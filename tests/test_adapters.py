"""Tests for msif.models.adapters on tiny models of every supported architecture.

The per-head layout is checked without trusting the adapter: the query / key / value states that each
attention layer actually computes are recorded (through a custom ``transformers`` attention function,
or, for BLOOM which does not route through the attention interface, by wrapping its ``_reshape``),
the weight rows (and bias entries) of one block are perturbed, and exactly one (head, q/k/v) slice of
that layer's states must change.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

from msif.models import adapters
from msif.models.adapters import (
    Block,
    TrackedModule,
    UnsupportedArchitectureError,
    register_adapter,
    supported_model_types,
    tracked_modules,
)

VOCAB = 64
B, T = 2, 5

# ----------------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------------

# name -> (config factory, CausalLM class, SequenceClassification class, how q/k/v are recorded)
ARCHS = {
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=32,
        ),
        transformers.GPTNeoXForCausalLM, transformers.GPTNeoXForSequenceClassification, "interface",
    ),
    "bloom": (
        lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        transformers.BloomForCausalLM, transformers.BloomForSequenceClassification, "bloom_reshape",
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=48, bos_token_id=1,
            eos_token_id=2,
        ),
        transformers.GPT2LMHeadModel, transformers.GPT2ForSequenceClassification, "interface",
    ),
    # head_dim deliberately != hidden_size / num_attention_heads, and grouped-query attention
    "llama": (
        lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=32,
        ),
        transformers.LlamaForCausalLM, transformers.LlamaForSequenceClassification, "interface",
    ),
    # multi-query attention (one K/V head)
    "mistral": (
        lambda: transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
        ),
        transformers.MistralForCausalLM, transformers.MistralForSequenceClassification, "interface",
    ),
    # grouped-query attention with q/k/v biases
    "qwen2": (
        lambda: transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        transformers.Qwen2ForCausalLM, transformers.Qwen2ForSequenceClassification, "interface",
    ),
    "qwen3": (
        lambda: transformers.Qwen3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        ),
        transformers.Qwen3ForCausalLM, transformers.Qwen3ForSequenceClassification, "interface",
    ),
    # word_embed_proj_dim != hidden_size adds project_in / project_out, which are not tracked
    "opt": (
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
            max_position_embeddings=32, word_embed_proj_dim=16,
        ),
        transformers.OPTForCausalLM, transformers.OPTForSequenceClassification, "interface",
    ),
}
ARCH_NAMES = list(ARCHS)


def make_model(arch: str, kind: str = "causal", seed: int = 0) -> nn.Module:
    """A tiny randomly initialised ``arch`` model; ``kind`` is ``"causal"`` or ``"seqcls"``."""
    cfg_fn, causal_cls, seqcls_cls, _ = ARCHS[arch]
    cfg = cfg_fn()
    cfg.pad_token_id = 0  # sequence classification with a batch needs one; inputs never use it
    if kind == "seqcls":
        cfg.num_labels = 3
    torch.manual_seed(seed)
    model = (causal_cls if kind == "causal" else seqcls_cls)(cfg)
    return model.eval()


def make_input(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (B, T), generator=g)


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, Conv1D))


def weight_out_in(mod: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, read from its weight (Conv1D stores (in, out))."""
    if isinstance(mod, Conv1D):
        return mod.weight.shape[1], mod.weight.shape[0]
    return mod.weight.shape[0], mod.weight.shape[1]


def num_heads(cfg) -> tuple[int, int]:
    nh = cfg.num_attention_heads
    return nh, getattr(cfg, "num_key_value_heads", None) or nh


# ----------------------------------------------------------------------------------------------------
# recording the q / k / v states each attention layer actually uses
# ----------------------------------------------------------------------------------------------------

_RECORDER = "msif_test_record_qkv"
_SINKS: list[dict] = []  # the innermost active recording receives the states


def _record_attention(module, query, key, value, attention_mask, **kwargs):
    if _SINKS:
        _SINKS[-1][id(module)] = {"q": query.detach().clone(), "k": key.detach().clone(), "v": value.detach().clone()}
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_RECORDER, _record_attention)
AttentionMaskInterface.register(_RECORDER, sdpa_mask)


@contextlib.contextmanager
def recording(model: nn.Module, how: str):
    """Record ``{attention module name: {"q"|"k"|"v": (B, heads, T, head_dim)}}`` during forwards."""
    names = {id(m): n for n, m in model.named_modules()}
    sink: dict = {}
    out: dict = {}
    patched = []
    old_impl = model.config._attn_implementation
    if how == "interface":
        model.config._attn_implementation = _RECORDER
    elif how == "bloom_reshape":
        # BloomAttention computes attention itself (ALiBi + baddbmm); its own split of the fused
        # output, ``_reshape``, returns q, k, v as (B, heads, T, head_dim).
        for mod in model.modules():
            if type(mod).__name__ == "BloomAttention":
                orig = mod._reshape

                def wrapped(fused_qkv, _orig=orig, _mod=mod):
                    q, k, v = _orig(fused_qkv)
                    sink[id(_mod)] = {"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone()}
                    return q, k, v

                mod._reshape = wrapped
                patched.append(mod)
    else:
        raise ValueError(how)
    _SINKS.append(sink)
    try:
        yield out
    finally:
        _SINKS.pop()
        model.config._attn_implementation = old_impl
        for mod in patched:
            del mod._reshape
        out.update({names[k]: v for k, v in sink.items()})


def record_qkv(model: nn.Module, how: str, x: torch.Tensor) -> dict:
    with torch.no_grad(), recording(model, how) as rec:
        model(input_ids=x, use_cache=False)
    return rec


# ----------------------------------------------------------------------------------------------------
# per-head blocks are exactly one (head, q/k/v) slice
# ----------------------------------------------------------------------------------------------------


def _perturb(mod: nn.Module, rows: slice, gen: torch.Generator) -> None:
    """Add noise to the weight rows (output features) ``rows`` of ``mod`` and to its bias entries."""
    with torch.no_grad():
        w = mod.weight
        if isinstance(mod, Conv1D):  # weight is (in, out): output features are columns
            w[:, rows] += torch.randn(w[:, rows].shape, generator=gen)
        else:
            w[rows] += torch.randn(w[rows].shape, generator=gen)
        if getattr(mod, "bias", None) is not None:
            mod.bias[rows] += torch.randn(mod.bias[rows].shape, generator=gen)


@pytest.mark.parametrize("kind", ["causal", "seqcls"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_each_attention_block_is_one_head_slice(arch, kind):
    model = make_model(arch, kind)
    how = ARCHS[arch][3]
    nh, nkv = num_heads(model.config)
    x = make_input()
    tms = tracked_modules(model)
    head_tms = [tm for tm in tms if any(b.proj is not None for b in tm.blocks)]
    attn_names = sorted({tm.name.rsplit(".", 1)[0] for tm in head_tms})
    assert len(attn_names) == model.config.num_hidden_layers

    base = record_qkv(model, how, x)
    # the recorder saw every attention layer, with the head counts of the config
    assert sorted(base) == attn_names
    for states in base.values():
        assert states["q"].shape[:3] == (B, nh, T)
        assert states["k"].shape[:3] == (B, nkv, T)
        assert states["v"].shape[:3] == (B, nkv, T)

    gen = torch.Generator().manual_seed(123)
    n_checked = 0
    for attn in attn_names:
        blocks = [b for tm in head_tms if tm.name.startswith(attn + ".") for b in tm.blocks]
        # the blocks of one layer are in bijection with its (proj, head) pairs
        pairs = sorted((b.proj, b.head) for b in blocks)
        expected_pairs = sorted([("q", h) for h in range(nh)] + [(p, h) for p in "kv" for h in range(nkv)])
        assert pairs == expected_pairs
        for blk in blocks:
            mod = model.get_submodule(blk.module)
            saved = {k: v.detach().clone() for k, v in mod.state_dict().items()}
            _perturb(mod, blk.rows, gen)
            try:
                new = record_qkv(model, how, x)[attn]
            finally:
                mod.load_state_dict(saved)
            head_dim = base[attn][blk.proj].shape[-1]
            assert blk.out_dim == head_dim, f"{blk.name}: {blk.out_dim} rows, head_dim {head_dim}"
            changed = set()
            for p in "qkv":
                for h in range(base[attn][p].shape[1]):
                    if not torch.equal(new[p][:, h], base[attn][p][:, h]):
                        changed.add((p, h))
            assert changed == {(blk.proj, blk.head)}, f"perturbing {blk.name} changed {sorted(changed)}"
            diff = (new[blk.proj][:, blk.head] - base[attn][blk.proj][:, blk.head]).abs().max()
            assert diff > 1e-3
            n_checked += 1
    assert n_checked == model.config.num_hidden_layers * (nh + 2 * nkv)
    # restored exactly
    after = record_qkv(model, how, x)
    assert all(torch.equal(after[a][p], base[a][p]) for a in attn_names for p in "qkv")


def test_recorder_detects_a_wrong_layout(monkeypatch):
    """The perturbation check must fail for an adapter with a wrong head layout (here: GPT-2's
    ``[Q | K | V]`` layout applied to GPT-NeoX, whose heads are interleaved)."""
    model = make_model("gpt_neox")
    x = make_input()
    nh = model.config.num_attention_heads
    hd = model.config.hidden_size // nh
    d = model.config.hidden_size
    base = record_qkv(model, "interface", x)
    name = "gpt_neox.layers.0.attention.query_key_value"
    mod = model.get_submodule(name)
    # what a [Q | K | V] layout would call head 1's key
    rows = slice(d + hd, d + 2 * hd)
    _perturb(mod, rows, torch.Generator().manual_seed(0))
    new = record_qkv(model, "interface", x)["gpt_neox.layers.0.attention"]
    old = base["gpt_neox.layers.0.attention"]
    changed = {(p, h) for p in "qkv" for h in range(nh) if not torch.equal(new[p][:, h], old[p][:, h])}
    assert changed and changed != {("k", 1)}


# ----------------------------------------------------------------------------------------------------
# structure: tiling, shapes, roles, what is (not) tracked
# ----------------------------------------------------------------------------------------------------


def _layer_linears(model: nn.Module) -> set[str]:
    """Names of the linear layers inside the numbered transformer layers of the backbone."""
    base_prefix = model.base_model_prefix
    out = set()
    for n, m in model.named_modules():
        if is_linear(m) and (n.startswith(base_prefix + ".") or model.base_model is model) and re.search(r"\.\d+\.", n):
            out.add(n)
    return out


@pytest.mark.parametrize("kind", ["causal", "seqcls"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_tracked_modules_structure(arch, kind):
    model = make_model(arch, kind)
    tms = tracked_modules(model)
    names = [tm.name for tm in tms]
    assert len(names) == len(set(names))
    # every linear of every transformer layer, and nothing else
    assert set(names) == _layer_linears(model)

    excluded = {id(model.get_input_embeddings())}
    if kind == "causal":
        excluded.add(id(model.get_output_embeddings()))
    else:
        excluded.add(id(model.score))
    block_names = set()
    for tm in tms:
        mod = model.get_submodule(tm.name)
        assert id(mod) not in excluded
        assert is_linear(mod), f"{tm.name} is a {type(mod).__name__}"
        assert not isinstance(mod, (nn.Embedding, nn.LayerNorm)) and "norm" not in tm.name.lower()
        assert tm.name.split(".")[-1] not in ("lm_head", "embed_out", "score", "classifier")
        # shapes read from the weight itself
        out_f, in_f = weight_out_in(mod)
        assert (tm.out_features, tm.in_features) == (out_f, in_f)
        assert tm.bias == (getattr(mod, "bias", None) is not None)
        assert tm.transposed == isinstance(mod, Conv1D)
        assert tm.in_dim == in_f + int(tm.bias)
        # role from the module tree: inside an *Attention module or not
        parent = model.get_submodule(tm.name.rsplit(".", 1)[0])
        assert tm.role == ("attention" if "Attention" in type(parent).__name__ else "mlp"), tm.name
        # blocks tile the output rows exactly, in order
        pos = 0
        for blk in tm.blocks:
            assert isinstance(blk, Block)
            assert blk.module == tm.name and blk.role == tm.role
            assert blk.row_start == pos and blk.row_stop > blk.row_start
            assert blk.rows == slice(blk.row_start, blk.row_stop)
            pos = blk.row_stop
            assert blk.name not in block_names
            block_names.add(blk.name)
        assert pos == out_f
        # either per-head q/k/v blocks (attention input projections only) or one whole block
        if tm.blocks[0].proj is not None:
            assert tm.role == "attention"
            assert all(b.proj in ("q", "k", "v") and b.head is not None for b in tm.blocks)
        else:
            assert len(tm.blocks) == 1 and tm.blocks[0].head is None
    assert {tm.role for tm in tms} == {"mlp", "attention"}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_weight_matrix_reproduces_the_layer(arch):
    """``weight_matrix`` is the effective (out, in[+1]) matrix: ``[W | b] @ [a; 1]`` is the layer output."""
    model = make_model(arch)
    gen = torch.Generator().manual_seed(5)
    for tm in tracked_modules(model):
        mod = model.get_submodule(tm.name)
        a = torch.randn(3, tm.in_features, generator=gen)
        wm = tm.weight_matrix(mod)
        assert wm.shape == (tm.out_features, tm.in_dim)
        a_aug = torch.cat([a, torch.ones(3, 1)], dim=1) if tm.bias else a
        with torch.no_grad():
            torch.testing.assert_close(a_aug @ wm.T, mod(a), rtol=1e-5, atol=1e-5)
        # a new tensor: editing it does not touch the model
        with torch.no_grad():
            before = mod.weight.detach().clone()
            wm.add_(1.0)
            assert torch.equal(mod.weight, before)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_causal_and_classifier_backbones_match(arch):
    causal = tracked_modules(make_model(arch, "causal"))
    seqcls = tracked_modules(make_model(arch, "seqcls"))
    assert causal == seqcls  # same names, shapes, roles and blocks


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "qwen2", "opt"])
def test_module_subsets(arch):
    model = make_model(arch)
    all_ = tracked_modules(model)
    mlp = tracked_modules(model, modules="mlp")
    attn = tracked_modules(model, modules="attention")
    assert mlp and attn
    assert all(t.role == "mlp" for t in mlp) and all(t.role == "attention" for t in attn)
    assert mlp == [t for t in all_ if t.role == "mlp"]
    assert attn == [t for t in all_ if t.role == "attention"]
    assert len(mlp) + len(attn) == len(all_)
    with pytest.raises(ValueError, match="modules must be"):
        tracked_modules(model, modules="embeddings")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_per_head_false_gives_one_block_per_projection(arch):
    model = make_model(arch)
    per_head = tracked_modules(model)
    whole = tracked_modules(model, per_head=False)
    assert [t.name for t in whole] == [t.name for t in per_head]
    for t, tp in zip(whole, per_head):
        assert (t.in_features, t.out_features, t.role) == (tp.in_features, tp.out_features, tp.role)
        assert len(t.blocks) == 1
        (blk,) = t.blocks
        assert (blk.row_start, blk.row_stop, blk.head, blk.proj) == (0, t.out_features, None, None)
    assert sum(len(t.blocks) for t in per_head) > len(whole)


# ----------------------------------------------------------------------------------------------------
# unknown architectures, generic mode, custom adapters
# ----------------------------------------------------------------------------------------------------


def make_gpt_neo(kind: str = "causal") -> nn.Module:
    cfg = transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
        intermediate_size=48, max_position_embeddings=32, pad_token_id=0,
    )
    torch.manual_seed(0)
    cls = transformers.GPTNeoForCausalLM if kind == "causal" else transformers.GPTNeoForSequenceClassification
    return cls(cfg).eval()


def test_unknown_architecture_raises_clear_error():
    model = make_gpt_neo()
    assert model.config.model_type not in supported_model_types()
    with pytest.raises(UnsupportedArchitectureError) as exc:
        tracked_modules(model)
    msg = str(exc.value)
    assert "gpt_neo" in msg and "register_adapter" in msg and "generic=True" in msg
    assert isinstance(exc.value, ValueError)


def test_model_without_config_raises():
    with pytest.raises(UnsupportedArchitectureError, match="register_adapter"):
        tracked_modules(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("kind", ["causal", "seqcls"])
def test_generic_warns_and_tracks_backbone_linears(kind):
    model = make_gpt_neo(kind)
    with pytest.warns(UserWarning, match="no adapter"):
        tms = tracked_modules(model, generic=True)
    backbone = {n for n, m in model.transformer.named_modules() if is_linear(m)}
    assert {t.name for t in tms} == {f"transformer.{n}" for n in backbone}
    assert len(tms) == 2 * 6  # q, k, v, out_proj, c_fc, c_proj per layer
    for t in tms:
        assert len(t.blocks) == 1 and t.blocks[0].rows == slice(0, t.out_features)
        assert t.role == ("attention" if ".attn." in t.name else "mlp")
    with pytest.warns(UserWarning):
        mlp = tracked_modules(model, generic=True, modules="mlp")
    assert {t.name for t in mlp} == {t.name for t in tms if t.role == "mlp"}


@pytest.mark.parametrize("cls_name", ["RobertaForCausalLM", "RobertaForSequenceClassification"])
def test_generic_never_tracks_heads_with_inner_linears(cls_name):
    """RoBERTa's LM head (``lm_head.dense`` + ``lm_head.decoder``, the unembedding) and classification
    head (``classifier.dense`` + ``classifier.out_proj``) are modules *containing* linears."""
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        is_decoder=True, max_position_embeddings=40, num_labels=3,
    )
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with pytest.warns(UserWarning, match="no adapter"):
        tms = tracked_modules(model, generic=True)
    names = {t.name for t in tms}
    backbone = {f"roberta.{n}" for n, m in model.roberta.named_modules() if is_linear(m)}
    assert names == backbone and len(names) == 2 * 6
    assert not any(n.startswith(("lm_head", "classifier")) for n in names)
    out_emb = model.get_output_embeddings()
    assert all(model.get_submodule(n) is not out_emb for n in names)


def test_generic_equal_for_causal_and_classifier():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = tracked_modules(make_gpt_neo("causal"), generic=True)
        b = tracked_modules(make_gpt_neo("seqcls"), generic=True)
    assert a == b


def test_register_custom_adapter(monkeypatch):
    monkeypatch.setattr(adapters, "_ADAPTERS", dict(adapters._ADAPTERS))
    model = make_gpt_neo()
    calls = []

    @register_adapter("gpt_neo")
    def neo_adapter(m, per_head):
        calls.append(per_head)
        out = []
        for i in range(m.config.num_layers):
            name = f"transformer.h.{i}.mlp.c_fc"
            mod = m.get_submodule(name)
            out.append(
                TrackedModule(name, "mlp", mod.in_features, mod.out_features, True, False,
                              (Block(name, name, "mlp", 0, mod.out_features),))
            )
        return out

    assert callable(neo_adapter)
    assert "gpt_neo" in supported_model_types()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a registered adapter does not warn
        tms = tracked_modules(model, per_head=False)
    assert calls == [False]
    assert [t.name for t in tms] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert tracked_modules(model, modules="attention") == []

    # function form, and an adapter that finds nothing is an error
    fn = lambda m, per_head: []  # noqa: E731
    assert register_adapter("gpt_neo", fn) is fn
    with pytest.raises(UnsupportedArchitectureError, match="found no layers"):
        tracked_modules(model)


def test_registration_does_not_leak():
    assert "gpt_neo" not in supported_model_types()
    for t in ("gpt_neox", "bloom", "gpt2", "llama", "mistral", "qwen2", "opt"):
        assert t in supported_model_types()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_fit_does_not_depend_on_the_batch_size(arch):
    """Padded batches of 4 give the factors of one sequence at a time (OPT flattens its MLP tokens to
    (B·T, d): the hooks put them back to (B, T, d))."""
    from msif.curvature.fit import FitConfig, fit_factors
    from msif.data.encoding import Encoded, collate

    model = make_model(arch).double()
    g = torch.Generator().manual_seed(3)
    exs = [Encoded(torch.randint(1, VOCAB, (int(L),), generator=g).tolist(), [True] * (int(L) - 1) + [False], index=i)
           for i, L in enumerate(torch.randint(3, 9, (8,), generator=g))]
    f4 = fit_factors(model, [collate(exs[i : i + 4]) for i in range(0, 8, 4)], FitConfig(), progress=False)
    f1 = fit_factors(model, [collate([e]) for e in exs], FitConfig(), progress=False)
    for k in f1.A_sum:
        torch.testing.assert_close(f4.A_sum[k], f1.A_sum[k], rtol=1e-10, atol=1e-12)
    for k in f1.stats:  # the covariances (basis-free: Λ lives in eigenbases that degenerate directions leave free)
        torch.testing.assert_close(f4.stats[k].S_sum, f1.stats[k].S_sum, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_scores_do_not_depend_on_the_batch_size(arch):
    """Candidates scored in padded batches of 4 get the scores they get one at a time, and both equal
    ⟨u, ∇ℓ⟩ with dense float64 per-example gradients (so OPT's flattened MLP tokens are scored right)."""
    from msif.curvature.exact import param_layout, unflatten
    from msif.data.encoding import Encoded, collate
    from msif.influence.scoring import score_batches

    model = make_model(arch).double()
    tms = tracked_modules(model)
    g = torch.Generator().manual_seed(5)
    exs = [Encoded(torch.randint(1, VOCAB, (int(L),), generator=g).tolist(), [True] * (int(L) - 1) + [False], index=i)
           for i, L in enumerate(torch.randint(3, 9, (8,), generator=g))]
    flat = torch.randn(2, param_layout(tms).D, generator=g, dtype=torch.float64)
    per_q = [unflatten(u, tms) for u in flat]
    U = {tm.name: torch.stack([m[tm.name] for m in per_q]) for tm in tms}
    s4 = score_batches(model, tms, U, [collate(exs[i : i + 4]) for i in range(0, 8, 4)]).scores
    s1 = score_batches(model, tms, U, [collate([e]) for e in exs]).scores
    dense = flat @ torch.stack([_autograd_grad(model, tms, e) for e in exs]).T
    torch.testing.assert_close(s1, dense, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s4, dense, rtol=1e-9, atol=1e-10)


def _autograd_grad(model, tms, e) -> torch.Tensor:
    """∇θ of one example's summed next-token loss at its counted positions, by plain autograd (not
    torch.func: BLOOM's GELU is an autograd.Function), in the flat layout of ``msif.curvature.exact``:
    ``weight_matrix`` only rearranges a layer's parameters, so applied to their gradients it gives the
    gradient of the effective matrix."""
    import copy

    from msif.curvature.exact import flatten

    ids = torch.tensor([e.input_ids])
    model.zero_grad()
    logits = model(input_ids=ids).logits[0, :-1]
    keep = torch.tensor(e.target_mask[:-1])
    torch.nn.functional.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum").backward()
    grads = copy.deepcopy(model)
    for pg, p in zip(grads.parameters(), model.parameters()):
        pg.data = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    with torch.no_grad():
        return flatten({tm.name: tm.weight_matrix(grads.get_submodule(tm.name)) for tm in tms}, tms)
