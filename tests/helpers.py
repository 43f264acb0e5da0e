"""Tiny models and data shared by the tests (float64, built from configs, no downloads)."""

from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

from msif.data.encoding import Encoded, collate

VOCAB = 50


def neox_config(**kw) -> GPTNeoXConfig:
    base = dict(
        hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=32, vocab_size=VOCAB,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    base.update(kw)
    return GPTNeoXConfig(**base)


def tiny_neox(seed: int = 0, **kw) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(neox_config(**kw)).double().eval()


def tiny_neox_classifier(seed: int = 0, num_labels: int = 3, **kw) -> GPTNeoXForSequenceClassification:
    torch.manual_seed(seed)
    return GPTNeoXForSequenceClassification(neox_config(num_labels=num_labels, **kw)).double().eval()


def random_lm_examples(n: int, seed: int = 0, min_len: int = 3, max_len: int = 10, vocab: int = VOCAB) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(min_len, max_len + 1, (), generator=g))
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append(Encoded(ids, [True] * (L - 1) + [False], index=i))
    return out


def random_answer_examples(n: int, seed: int = 0, vocab: int = VOCAB) -> list[Encoded]:
    """Prompt of 2-5 tokens then an answer of 1-3 tokens; only answer tokens count."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P = int(torch.randint(2, 6, (), generator=g))
        A = int(torch.randint(1, 4, (), generator=g))
        ids = torch.randint(3, vocab, (P + A,), generator=g).tolist()
        tm = [False] * (P + A)
        for t in range(P - 1, P + A - 1):
            tm[t] = True
        out.append(Encoded(ids, tm, index=i))
    return out


def batches(examples: list[Encoded], batch_size: int, pad_id: int = 0) -> list:
    return [collate(examples[i : i + batch_size], pad_id=pad_id) for i in range(0, len(examples), batch_size)]


WORDS_CORPUS = [
    "the capital of france is paris", "the capital of spain is madrid", "berlin is in germany",
    "rome is the capital of italy", "lisbon is in portugal", "what is the capital of france",
    "paris is a city in france", "madrid is a city in spain", "the river in paris is long",
    "germany has a capital called berlin", "italy is in europe", "portugal is next to spain",
]


def word_tokenizer(sentences=WORDS_CORPUS):
    """A word-level tokenizer over ``sentences`` with [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")


def train_steps(model, batches_, objective: str, steps: int, lr: float = 1e-2, seed: int = 0):
    """A few Adam steps on the summed loss of ``objective`` (data labels); returns the model."""
    from msif.objectives import data_targets, model_logits, summed_loss

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(steps):
        b = batches_[i % len(batches_)]
        opt.zero_grad()
        summed_loss(model_logits(model, b), data_targets(b, objective)).mean().backward()
        opt.step()
    return model.eval()


def sigkill_when(child, ready, what: str, timeout: float = 120.0) -> None:
    """SIGKILL the subprocess ``child`` as soon as ``ready()`` is true (polled); fail if it ends first or
    never gets there. ``what`` names the run in the failure message."""
    import signal
    import time

    import pytest

    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                break
            assert child.poll() is None, child.stdout.read()
            time.sleep(0.01)
        else:
            pytest.fail(f"the child {what} never reached the kill point")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
