"""Tests for msif.models.loading: checkpoints saved to temporary folders and loaded back."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from msif.models.adapters import tracked_modules
from msif.models.loading import (
    FINGERPRINT_SAMPLE,
    BackboneMismatchError,
    ModelLoadError,
    TokenizerMismatchError,
    backbone_match,
    check_tokenizer,
    check_tokenizer_matches_model,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_fingerprint,
)

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "paris is the capital of france",
    "the capital of italy is rome",
]
SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]


def make_tokenizer(sentences=SENTENCES) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``sentences``."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def make_config(arch: str, vocab: int, **over):
    if arch == "gpt_neox":
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=32)
        kw.update(over)
        return transformers.GPTNeoXConfig(vocab_size=vocab, eos_token_id=2, bos_token_id=2, **kw)
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
    kw.update(over)
    return transformers.LlamaConfig(vocab_size=vocab, eos_token_id=2, bos_token_id=2, pad_token_id=0, **kw)


CAUSAL = {"gpt_neox": transformers.GPTNeoXForCausalLM, "llama": transformers.LlamaForCausalLM}
SEQCLS = {"gpt_neox": transformers.GPTNeoXForSequenceClassification, "llama": transformers.LlamaForSequenceClassification}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def checkpoints(request, tmp_path_factory, tokenizer):
    """``(arch, causal folder, classifier folder, causal model, classifier model)`` saved with the tokenizer."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    causal = CAUSAL[arch](make_config(arch, len(tokenizer))).eval()
    cfg = make_config(arch, len(tokenizer))
    cfg.num_labels = 3
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(1)
    seqcls = SEQCLS[arch](cfg).eval()
    for sub, model in (("causal", causal), ("seqcls", seqcls)):
        model.save_pretrained(root / sub)
        tokenizer.save_pretrained(root / sub)
    return arch, root / "causal", root / "seqcls", causal, seqcls


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


def test_load_causal_and_classifier(checkpoints):
    arch, causal_dir, seqcls_dir, causal, seqcls = checkpoints
    m = load_model(causal_dir)
    assert type(m) is type(causal) and not m.training
    assert_same_weights(m, causal)
    c = load_model(str(seqcls_dir), task="classification")
    assert type(c) is type(seqcls) and not c.training
    assert_same_weights(c, seqcls)
    # "auto" follows config.architectures
    assert type(load_model(causal_dir, task="auto")) is type(causal)
    assert type(load_model(seqcls_dir, task="auto")) is type(seqcls)
    # same outputs as the saved model
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, causal(x).logits)


def test_load_dtype_and_bad_arguments(checkpoints):
    _, causal_dir, _, _, _ = checkpoints
    assert load_model(causal_dir, dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(causal_dir, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="task must be"):
        load_model(causal_dir, task="seq2seq")
    with pytest.raises(ValueError, match="dtype"):
        load_model(causal_dir, dtype="int8")


def test_classifier_from_causal_checkpoint(checkpoints, tokenizer):
    """A classifier built from a causal LM checkpoint (new head) shares its backbone and fingerprint."""
    arch, causal_dir, _, causal, _ = checkpoints
    clf, tok = load_model_and_tokenizer(causal_dir, task="classification", num_labels=2)
    assert type(clf) is SEQCLS[arch]
    assert clf.config.pad_token_id == tokenizer.pad_token_id
    tms_lm, tms_clf = tracked_modules(causal), tracked_modules(clf)
    shared = backbone_match(causal, clf, tms_lm, tms_clf)
    assert shared == tms_lm
    assert model_fingerprint(causal, tms_lm) == model_fingerprint(clf, tms_clf)
    # the backbone weights are the causal LM's
    for tm in shared:
        assert torch.equal(causal.get_submodule(tm.name).weight, clf.get_submodule(tm.name).weight)


def test_load_tokenizer_round_trip(checkpoints, tokenizer):
    _, causal_dir, _, causal, _ = checkpoints
    tok = load_tokenizer(causal_dir)
    assert len(tok) == len(tokenizer)
    assert tok("the cat sat")["input_ids"] == tokenizer("the cat sat")["input_ids"]
    model, tok2 = load_model_and_tokenizer(causal_dir)
    assert_same_weights(model, causal)
    assert tok2.pad_token == "[PAD]"


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no such tokenizer folder"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model(tmp_path / "empty")


def test_unreachable_hub_id_gives_clear_error(monkeypatch):
    # no network here; offline mode makes the failure immediate instead of a series of retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for fn in (load_model, load_tokenizer):
        with pytest.raises(ModelLoadError) as exc:
            fn("msif-test-org/no-such-model")
        msg = str(exc.value)
        assert "unreachable" in msg and "local folder" in msg and "msif-test-org/no-such-model" in msg
        assert isinstance(exc.value, OSError)
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model("msif-test-org/no-such-model", task="auto")


# ----------------------------------------------------------------------------------------------------
# tokenizer / model agreement
# ----------------------------------------------------------------------------------------------------


def test_tokenizer_check_accepts_matching_and_padded_vocab(tokenizer):
    check_tokenizer_matches_model(tokenizer, CAUSAL["llama"](make_config("llama", len(tokenizer))))
    # more embedding rows than tokens (Pythia pads its vocabulary) is fine
    check_tokenizer_matches_model(tokenizer, CAUSAL["gpt_neox"](make_config("gpt_neox", len(tokenizer) + 7)))


def test_mismatched_tokenizer_too_many_tokens(tokenizer, tmp_path):
    big = make_tokenizer(SENTENCES + ["zebras and giraffes graze on savanna grass near lakes"])
    assert len(big) > len(tokenizer)
    model = CAUSAL["gpt_neox"](make_config("gpt_neox", len(tokenizer)))
    with pytest.raises(TokenizerMismatchError, match=rf"mismatched tokenizer: it has {len(big)} tokens .* only {len(tokenizer)} rows"):
        check_tokenizer_matches_model(big, model)
    for args in ((model, big), (big, model)):
        with pytest.raises(TokenizerMismatchError, match="mismatched tokenizer"):
            check_tokenizer(*args)
    check_tokenizer(model, tokenizer)
    # load_model_and_tokenizer runs the check
    model.save_pretrained(tmp_path / "m")
    big.save_pretrained(tmp_path / "t")
    with pytest.raises(TokenizerMismatchError, match="mismatched tokenizer"):
        load_model_and_tokenizer(tmp_path / "m", tokenizer_path=tmp_path / "t")


def test_mismatched_tokenizer_special_tokens(tokenizer):
    model = CAUSAL["gpt_neox"](make_config("gpt_neox", len(tokenizer)))
    # an added special token gets an id past the model's embedding rows
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    with pytest.raises(TokenizerMismatchError, match="mismatched tokenizer"):
        check_tokenizer_matches_model(tok, model)
    # a special token that is not in the vocabulary (would silently become [UNK])
    tok = make_tokenizer()
    tok.pad_token = "<pad-not-in-vocab>"
    with pytest.raises(TokenizerMismatchError, match="not in its vocabulary"):
        check_tokenizer_matches_model(tok, model)


# ----------------------------------------------------------------------------------------------------
# fingerprint
# ----------------------------------------------------------------------------------------------------


def test_fingerprint_stable_across_loads(checkpoints):
    _, causal_dir, seqcls_dir, causal, seqcls = checkpoints
    a, b = load_model(causal_dir), load_model(causal_dir)
    fa = model_fingerprint(a, tracked_modules(a))
    assert isinstance(fa, str) and len(fa) == 20 and int(fa, 16) >= 0
    assert fa == model_fingerprint(b, tracked_modules(b)) == model_fingerprint(causal, tracked_modules(causal))
    # different random init -> different fingerprint
    c = load_model(seqcls_dir, task="classification")
    assert model_fingerprint(c, tracked_modules(c)) != fa
    # per-head split and module order do not matter; the set of modules does
    assert model_fingerprint(a, tracked_modules(a, per_head=False)) == fa
    assert model_fingerprint(a, list(reversed(tracked_modules(a)))) == fa
    assert model_fingerprint(a, tracked_modules(a, modules="mlp")) != fa
    # dtype matters
    assert model_fingerprint(a.to(torch.bfloat16), tracked_modules(a)) != fa


def test_fingerprint_changes_after_fine_tuning(checkpoints):
    _, causal_dir, _, _, _ = checkpoints
    model = load_model(causal_dir)
    tms = tracked_modules(model)
    before = model_fingerprint(model, tms)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 3, 4]])
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    model.eval()
    assert model_fingerprint(model, tms) != before


def test_fingerprint_sensitivity_to_single_elements(checkpoints):
    _, causal_dir, _, _, _ = checkpoints
    model = load_model(causal_dir)
    tms = tracked_modules(model)
    base = model_fingerprint(model, tms)
    tm = tms[-1]
    with torch.no_grad():
        w = model.get_submodule(tm.name).weight
        old = w[0, 1].item()
        w[0, 1] += 1e-3
        assert model_fingerprint(model, tms) != base
        w[0, 1] = old
        assert model_fingerprint(model, tms) == base
        # untracked weights (embeddings, head, norms) do not enter
        model.get_input_embeddings().weight.add_(1.0)
        model.get_output_embeddings().weight.add_(1.0)
        assert model_fingerprint(model, tms) == base


class _Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(512, 300, bias=False)  # 153,600 elements > FINGERPRINT_SAMPLE


def test_fingerprint_of_large_tensor_covers_unsampled_elements():
    from msif.models.adapters import Block, TrackedModule

    model = _Big()
    n = model.fc.weight.numel()
    assert n > FINGERPRINT_SAMPLE
    tms = [TrackedModule("fc", "mlp", 512, 300, False, False, (Block("fc", "fc", "mlp", 0, 300),))]
    base = model_fingerprint(model, tms)
    stride = -(-n // FINGERPRINT_SAMPLE)
    assert stride > 1
    with torch.no_grad():
        flat = model.fc.weight.view(-1)
        flat[1] += 1e-4  # index 1 is not in the strided subsample
        assert 1 % stride != 0
        assert model_fingerprint(model, tms) != base
        flat[1] -= 1e-4
        flat[0] *= -1
        assert model_fingerprint(model, tms) != base
        flat[0] *= -1
        assert model_fingerprint(model, tms) == base
        # swapping two sampled elements keeps every sum; the subsample sees it
        a, b = flat[0].item(), flat[stride].item()
        flat[0], flat[stride] = b, a
        assert model_fingerprint(model, tms) != base


# ----------------------------------------------------------------------------------------------------
# backbone matching
# ----------------------------------------------------------------------------------------------------


def test_backbone_match_of_same_architecture(checkpoints):
    _, causal_dir, seqcls_dir, _, _ = checkpoints
    lm = load_model(causal_dir)
    clf = load_model(seqcls_dir, task="classification")
    tms_lm, tms_clf = tracked_modules(lm), tracked_modules(clf)
    assert backbone_match(lm, clf, tms_lm, tms_clf) == tms_lm
    # subsets: strict needs both lists to agree; non-strict returns the shared part
    mlp = tracked_modules(clf, modules="mlp")
    with pytest.raises(BackboneMismatchError, match="tracked in model A but not in model B"):
        backbone_match(lm, clf, tms_lm, mlp)
    with pytest.raises(BackboneMismatchError, match="tracked in model B but not in model A"):
        backbone_match(clf, lm, mlp, tms_lm)
    assert backbone_match(lm, clf, tms_lm, mlp, strict=False) == [t for t in tms_lm if t.role == "mlp"]
    with pytest.raises(BackboneMismatchError, match="blocks differ"):
        backbone_match(lm, clf, tms_lm, tracked_modules(clf, per_head=False))
    with pytest.raises(BackboneMismatchError, match="share no tracked module"):
        backbone_match(lm, clf, tracked_modules(lm, modules="attention"), mlp, strict=False)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_backbone_mismatch_names_first_module(arch, tokenizer):
    vocab = len(tokenizer)
    a = CAUSAL[arch](make_config(arch, vocab))
    b = SEQCLS[arch](make_config(arch, vocab, intermediate_size=40))
    first_mlp = next(t.name for t in tracked_modules(a) if t.role == "mlp")
    with pytest.raises(BackboneMismatchError, match=rf"at module '{first_mlp}'.*48.*40"):
        backbone_match(a, b, tracked_modules(a), tracked_modules(b))
    # fewer layers
    c = CAUSAL[arch](make_config(arch, vocab, num_hidden_layers=1))
    layer1 = next(t.name for t in tracked_modules(a) if ".1." in t.name)
    with pytest.raises(BackboneMismatchError, match=rf"'{layer1}' is tracked in model A but not in model B"):
        backbone_match(a, c, tracked_modules(a), tracked_modules(c))
    # the vocabulary (embeddings, head) may differ
    d = CAUSAL[arch](make_config(arch, vocab + 10))
    assert backbone_match(a, d, tracked_modules(a), tracked_modules(d)) == tracked_modules(a)


def test_backbone_mismatch_across_architectures_and_stale_lists(tokenizer):
    vocab = len(tokenizer)
    neox = CAUSAL["gpt_neox"](make_config("gpt_neox", vocab))
    llama = CAUSAL["llama"](make_config("llama", vocab))
    with pytest.raises(BackboneMismatchError, match="'gpt_neox' model and model B a 'llama' model"):
        backbone_match(neox, llama, tracked_modules(neox), tracked_modules(llama))
    # a tracked-module list computed for another model of the same type
    wide = CAUSAL["llama"](make_config("llama", vocab, intermediate_size=40))
    with pytest.raises(BackboneMismatchError, match="recompute the tracked modules"):
        backbone_match(llama, wide, tracked_modules(llama), tracked_modules(llama))
