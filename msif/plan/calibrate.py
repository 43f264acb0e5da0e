"""Measurements that replace the plan's nominal inputs: a corpus's size and token count, and this
machine's throughput and runtime memory on a few real batches."""

from __future__ import annotations

import os
import resource
import time

from ..data.encoding import InputError
from .flops import forward_flops, stats_flops, train_flops
from .settings import PlanSettings
from .shape import ModelShape
from .stages import seq_len


def corpus_stats(path: str, tokenizer_dir: str | None, text_field: str = "text", sample: int = 256) -> tuple[int, int]:
    """(documents, mean tokens per document) of a corpus, tokens estimated from an evenly spaced sample
    (the model's tokenizer when the folder has one, else 1.3 tokens per word)."""
    from ..data.corpus import Corpus

    corp = Corpus(path, text_field=text_field)
    n = len(corp)
    if n == 0:
        raise InputError(f"the corpus {path} holds no documents")
    rows = sorted({int(i * n / min(n, sample)) for i in range(min(n, sample))})
    texts = corp.texts(rows)
    tok = None
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        from ..models.loading import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    if tok is not None:
        lens = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    else:
        lens = [max(2, round(1.3 * len(t.split()))) for t in texts]
    return n, max(2, round(sum(lens) / len(lens)))


def calibrate(shape: ModelShape, s: PlanSettings, repeats: int = 2) -> dict:
    """Measured throughputs (FLOP/s) of a plain training step and a fit batch on this machine, and the
    runtime's resident memory before the model is loaded. The model is loaded from the folder (random
    init from its config when it holds no weights)."""
    from ..curvature.hooks import record_batch
    from ..models.adapters import tracked_modules
    from ..objectives import curvature_targets, data_targets, model_logits, summed_loss

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, has_weights = _load_for_timing(shape, s)
    B, T = min(s.batch_size, 8), min(seq_len(shape, s), 256)
    batch = _random_batch(shape, s, B, T)
    tms = tracked_modules(model, per_head=s.per_head, modules=s.modules, generic=s.generic)

    def train():
        model.zero_grad(set_to_none=True)
        summed_loss(model_logits(model, batch), data_targets(batch, "lm")).sum().backward()
        model.zero_grad(set_to_none=True)

    def fit_batch():
        a, s_, _ = record_batch(model, tms, batch, lambda lg: curvature_targets(lg, batch, "lm", "sampled", 0, 0))
        for t in tms:
            x = a[t.name].reshape(-1, t.in_dim)
            _ = x.T @ x
            y = s_[t.name].reshape(-1, t.out_features)
            _ = y.T @ y

    t_train, t_fit = _best_time(train, repeats, s.device), _best_time(fit_batch, repeats, s.device)
    fit_f = B * (2 * forward_flops(shape, T) + stats_flops(shape, T, "cov"))
    return {"train": B * train_flops(shape, T) / t_train, "fit": fit_f / t_fit, "train_step_s": t_train,
            "fit_batch_s": t_fit, "batch": [B, T], "runtime_bytes": rss0, "weights_loaded": has_weights}


def _load_for_timing(shape: ModelShape, s: PlanSettings):
    """``(model in eval mode on s.device, whether the folder held weights)``: random init without them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dt = getattr(torch, shape.dtype)
    path = os.path.expanduser(s.model)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).to(dt)
    model.to(s.device).eval()
    return model, has_weights


def _random_batch(shape: ModelShape, s: PlanSettings, B: int, T: int):
    """``B`` sequences of ``T`` random tokens (seeded), every token but the last counted in the loss."""
    import torch

    from ..data.encoding import Batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, shape.vocab, (B, T), generator=g).to(s.device)
    mask = torch.ones_like(ids)
    tm = torch.ones_like(ids, dtype=torch.bool)
    tm[:, -1] = False
    return Batch(ids, mask, tm, None, torch.arange(B))


def _best_time(fn, repeats: int, device: str) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` after one warm-up (CUDA synchronised around each)."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out = min(out, time.perf_counter() - t0)
    return out
