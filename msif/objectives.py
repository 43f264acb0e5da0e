"""Objectives: LM loss, answer-only loss, classification loss, and label sampling for curvature.

Three objectives share one shape (see :mod:`msif.data.encoding` for the masks):

* ``"lm"``: pre-training loss, ``ℓ(z) = −Σ_t log p(z_{t+1} | z_≤t)`` over every non-padding prediction;
* ``"answer"``: the same sum restricted to the answer tokens (prompt tokens are masked);
* ``"classification"``: ``−log p(label | x)`` from a sequence-classification head.

The per-sequence loss is **summed** over its tokens and the batch loss is the sum over sequences, so
that the gradient of the batch loss w.r.t. a layer output at sequence ``n`` is exactly the gradient
of ``ℓ(z_n)``. For curvature (the GGN / true Fisher), the labels are **sampled from the model's own
predictive distribution** at the very positions whose logits produced them (the logits at position
``t`` give the label of position ``t``, i.e. the stand-in for token ``t + 1``), and only where the
objective counts a prediction. ``labels="empirical"`` uses the data labels instead.

Sampling is seeded per example (``seed``, the example's dataset index and a pass number) so that the
labels of an example do not depend on the batch it is in, its padding, or the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data.encoding import Batch

OBJECTIVES = ("lm", "answer", "classification")
LABEL_MODES = ("sampled", "empirical")


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    return objective


def model_logits(model, batch: Batch) -> torch.Tensor:
    """Logits ``(B, T, V)`` of a causal LM, or ``(B, C)`` of a sequence classifier."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits


def _example_generator(seed: int, index: int, stream: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + index * 7_919 + stream * 104_729) % (2**63 - 1))
    return g


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)`` in the logits' dtype, at least float32."""
    x = logits.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return torch.softmax(x, dim=-1)


#: vocabulary entries per block of the two-level inverse CDF of :func:`sample_from_probs`
CDF_BLOCK = 256


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index whose cumulative sum reaches ``u``, for rows ``p (n, K)`` and ``u (n,)``; the
    last index when rounding leaves ``u`` above the row's total."""
    cdf = p.cumsum(-1)
    idx = torch.searchsorted(cdf, u.unsqueeze(-1).contiguous()).squeeze(-1)
    return idx.clamp_max(p.shape[-1] - 1)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``probs (..., V)``, ``uniforms (...)`` in [0, 1) → indices ``(...)``.

    Two levels, so that no ``(..., V)`` cumulative sum is formed (a sequential scan, 5 ms for 1k
    tokens of an 8k vocabulary here, more than the softmax): the block of :data:`CDF_BLOCK` entries
    holding ``u`` is found from the blocks' cumulative sums, then the entry inside it. The same
    distribution as one scan over the vocabulary; ``u`` above the total (rounding) picks the last
    entry, as in a guarded single scan.
    """
    V = probs.shape[-1]
    p = probs.reshape(-1, V)
    u = uniforms.reshape(-1).to(p.dtype)
    k = CDF_BLOCK
    if V <= 2 * k:
        return _inverse_cdf(p, u).reshape(uniforms.shape)
    full = V // k * k
    sums = p[:, :full].reshape(p.shape[0], -1, k).sum(-1)
    if full < V:
        sums = torch.cat([sums, p[:, full:].sum(-1, keepdim=True)], 1)
    blk = _inverse_cdf(sums, u)  # (n,)
    below = sums.cumsum(-1).gather(1, (blk - 1).clamp_min(0)[:, None]).squeeze(1)
    rest = torch.where(blk > 0, u - below, u)
    cols = blk[:, None] * k + torch.arange(k, device=p.device)  # (n, k)
    inside = p.gather(1, cols.clamp_max(V - 1)) * (cols < V)
    j = torch.minimum(_inverse_cdf(inside, rest), (V - 1 - blk * k).clamp_max(k - 1))
    return (blk * k + j).reshape(uniforms.shape)


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``logits (..., V)``, ``uniforms (...)`` in [0, 1) → indices ``(...)``.

    Computed in the logits' dtype (at least float32): a float64 copy of ``(B, T, V)`` logits cost
    ~15% of a factor fit; the float32 CDF's rounding (~1e-5 typical) is far below the Monte-Carlo
    noise of the sampled Fisher.
    """
    return sample_from_probs(_probs(logits), uniforms)


def position_uniforms(batch: Batch, seed: int, stream: int = 0) -> torch.Tensor:
    """The uniforms ``(B, T)`` (float64, on the CPU) that pick the sampled labels: example ``i`` draws
    one per position of its unpadded length from its own generator ``(seed, batch.indices[i], stream)``."""
    B, T = batch.input_ids.shape
    lengths = batch.attention_mask.sum(1).tolist()
    u = torch.zeros(B, T, dtype=torch.float64, device="cpu")
    for i in range(B):
        g = _example_generator(seed, int(batch.indices[i]), stream)
        u[i, : lengths[i]] = torch.rand(lengths[i], generator=g, dtype=torch.float64, device="cpu")
    return u


def sampled_targets(logits: torch.Tensor, batch: Batch, seed: int, stream: int = 0) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution.

    For token-level objectives, ``logits (B, T, V)`` → targets ``(B, T)``: position ``t`` gets a label
    drawn from ``softmax(logits[:, t])`` where ``target_mask[:, t]``, and ``-100`` (ignored) elsewhere.
    For classification, ``logits (B, C)`` → ``(B,)``. Each example uses its own generator seeded by
    ``(seed, batch.indices[i], stream)``, drawing one uniform per position of its unpadded length.
    """
    B = logits.shape[0]
    if logits.dim() == 2:
        u = torch.stack([torch.rand((), generator=_example_generator(seed, int(batch.indices[i]), stream), device="cpu")
                         for i in range(B)])
        return sample_from_logits(logits, u.to(logits.device))
    y = sample_from_logits(logits, position_uniforms(batch, seed, stream).to(logits.device))
    return torch.where(batch.target_mask, y, torch.full_like(y, -100))


def data_targets(batch: Batch, objective: str) -> torch.Tensor:
    """The data's own labels in the layout of :func:`sampled_targets` (next tokens, or class labels)."""
    if objective == "classification":
        if batch.labels is None:
            raise ValueError("the classification objective needs labels in the batch")
        return batch.labels
    nxt = torch.full_like(batch.input_ids, -100)
    nxt[:, :-1] = batch.input_ids[:, 1:]
    return torch.where(batch.target_mask, nxt, torch.full_like(nxt, -100))


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed cross-entropy ``(B,)``; ``-100`` targets are ignored."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float() if logits.dtype == torch.float16 else logits, targets, reduction="none")
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), ignore_index=-100, reduction="none")
    return ce.view(B, T).sum(1)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy ``(B, T)`` (zero where the target is ``-100``)."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), ignore_index=-100, reduction="none")
    return ce.view(B, T)


def curvature_targets(logits, batch: Batch, objective: str, labels: str, seed: int, stream: int) -> torch.Tensor:
    """Targets for a curvature pass: sampled from the model (default) or the data's (``empirical``)."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    if labels == "empirical":
        return data_targets(batch, objective)
    return sampled_targets(logits, batch, seed, stream)


# --------------------------------------------------------------------------------------------------
# the output head without (B, T, V) logits
# --------------------------------------------------------------------------------------------------

#: causal LMs whose logits are exactly ``lm_head(base_model(...).last_hidden_state)`` (no scaling,
#: soft-capping or extra projection after the head): :func:`head_gradient` may stand in for them
PLAIN_HEAD_TYPES = ("gpt_neox", "gpt2", "llama", "mistral", "qwen2", "qwen3", "bloom", "opt")

#: elements of one chunk of logits ``(tokens, V)`` formed at once by :func:`head_gradient`
LOGIT_CHUNK = 1 << 24


def plain_lm_head(model) -> nn.Linear | None:
    """The output head of a registered causal LM whose logits are a plain linear map of the base
    model's last hidden state, else ``None`` (use the model's own forward)."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(cfg, "model_type", None) not in PLAIN_HEAD_TYPES or not name.endswith(("ForCausalLM", "LMHeadModel")):
        return None
    head = model.get_output_embeddings()
    return head if type(head) is nn.Linear else None


def last_hidden_state(model, batch: Batch) -> torch.Tensor:
    """``(B, T, d)``: the base model's output, the input of :func:`plain_lm_head`."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_gradient(hidden: torch.Tensor, head: nn.Linear, batch: Batch, objective: str, labels: str, seed: int,
                  stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂hidden (B, T, d), L)`` of the summed cross-entropy ``L`` of the head's logits, with the
    labels of :func:`curvature_targets`, in chunks of :data:`LOGIT_CHUNK` logits.

    The gradient of a summed softmax cross-entropy w.r.t. the logits is ``softmax(z) − onehot(y)``,
    so no ``(B, T, V)`` tensor and no autograd graph of the head is ever formed: only the target
    positions' logits, a chunk of tokens at a time (the largest tensor of a fit on a big vocabulary).
    Labels and loss equal those of the model's own forward with :func:`curvature_targets`.
    """
    sel = batch.target_mask
    h = hidden.detach()[sel]  # (n, d)
    V = head.out_features
    if labels == "empirical":
        y_all = data_targets(batch, objective)[sel]
    else:
        u_all = position_uniforms(batch, seed, stream)[sel.cpu()].to(h.device)
    g = torch.empty_like(h)
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    step = max(1, LOGIT_CHUNK // V)
    for i in range(0, h.shape[0], step):
        z = torch.nn.functional.linear(h[i : i + step], head.weight, head.bias)  # (c, V)
        p = _probs(z)
        y = y_all[i : i + step] if labels == "empirical" else sample_from_probs(p, u_all[i : i + step])
        rows = torch.arange(p.shape[0], device=p.device)
        zmax, top = z.max(-1)
        # logsumexp(z) = max(z) − log softmax(z)[argmax]: no second pass of exponentials over the vocabulary
        loss += (zmax.to(p.dtype) - p[rows, top].log() - z[rows, y].to(p.dtype)).sum().double()
        del z
        p[rows, y] -= 1.0
        g[i : i + step] = p.to(head.weight.dtype) @ head.weight
    grad = torch.zeros_like(hidden)
    grad[sel] = g
    return grad, loss
