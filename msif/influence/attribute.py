"""Attribution of a fine-tuned model's outputs to pre-training documents (PAPER_NOTES §3-4).

Methods (score of a pre-training document ``z`` for a query ``x`` with answer ``y``; larger = more
supportive, i.e. up-weighting ``z`` lowers the query loss ``m = −log p(y | x)``):

* ``ms-if`` — multi-stage influence ``∇m(θ_ft)ᵀ (G_ft+λ_ft)⁻¹ (G_pt+λ_pt)⁻¹ ∇ℓ_pt(z, θ_pt)``, over the
  backbone blocks the two models share. Works when fine-tuning replaced the head.
* ``ss-if`` — single-stage ``∇m(θ_ft)ᵀ (G_ft+λ_ft)⁻¹ ∇ℓ_pt(z, θ_ft)``; needs a fine-tuned causal LM.
* ``gdp`` — gradient dot product ``∇m(θ_ft)ᵀ ∇ℓ_pt(z, θ_pt)`` (no curvature; candidates on θ_pt so that
  it also applies to a classification fine-tune).
* ``repsim`` — cosine of mean last-layer hidden states, query on θ_ft, candidate on θ_pt.

A query is turned once into ``U = P_pt P_ft ∇m`` per block; candidates are streamed in batches through
θ_pt with hooks (:mod:`msif.influence.scoring`). No per-candidate iHVP, no parameter gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..curvature.factors import FactorError, FactorSet
from ..curvature.fit import per_example_grads
from ..data.encoding import Encoded, InputError, collate, encode_classification, encode_prompt, encode_prompt_answer, encode_text, pad_token_id
from ..models.adapters import tracked_modules
from .scoring import ScoreResult, low_rank, score_batches

METHODS = ("ms-if", "ss-if", "gdp", "repsim")


@dataclass
class Query:
    """A question to the fine-tuned model: ``prompt`` and its ``answer`` (None: greedy-decode one).

    For a classification fine-tune, ``label`` (None: the model's predicted class) replaces the answer.
    """

    prompt: str
    answer: str | None = None
    label: int | None = None
    id: str | None = None


@dataclass
class PreparedQuery:
    query: Query
    prompt_text: str  # after the template
    answer: str | None
    label: int | None
    encoded: Encoded
    generated: bool = False


@dataclass
class Attribution:
    """Result of :meth:`Attributor.attribute`: scores of candidates (corpus rows) for each query."""

    method: str
    queries: list[PreparedQuery]
    rows: list[list[int]]  # per query: candidate corpus rows, best first
    doc_ids: list[list[str]]
    scores: list[list[float]]
    texts: list[list[str]] = field(default_factory=list)
    token_scores: list[list[list[float]]] | None = None  # per query, per candidate, per token
    tokens: list[list[list[str]]] | None = None
    role_share: list[dict[str, float]] | None = None  # per query: share of |influence| by mlp / attention
    layer_share: list[dict[str, float]] | None = None
    dampings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> list[dict]:
        out = []
        for qi, pq in enumerate(self.queries):
            hits = []
            for r in range(len(self.rows[qi])):
                h = {"rank": r + 1, "doc_id": self.doc_ids[qi][r], "row": self.rows[qi][r], "score": self.scores[qi][r]}
                if self.texts:
                    h["text"] = self.texts[qi][r]
                if self.token_scores is not None:
                    h["tokens"] = self.tokens[qi][r]
                    h["token_scores"] = self.token_scores[qi][r]
                hits.append(h)
            d = {"query_id": pq.query.id, "prompt": pq.query.prompt, "answer": pq.answer, "label": pq.label,
                 "generated": pq.generated, "method": self.method, "results": hits, "damping": self.dampings}
            if self.role_share is not None:
                d["role_share"] = self.role_share[qi]
                d["layer_share"] = self.layer_share[qi]
            out.append(d)
        return out


def _load(model, task):
    if isinstance(model, (str, os.PathLike)):
        from ..models.loading import load_model

        return load_model(str(model), task=task)
    return model


def _is_classifier(model: nn.Module) -> bool:
    return "ForSequenceClassification" in type(model).__name__


class Attributor:
    """Everything needed to attribute a fine-tuned model's outputs to pre-training documents.

    ``pretrained`` / ``finetuned``: models or checkpoint paths (the fine-tuned one may be a sequence
    classifier built on the pre-trained causal LM). ``pt_factors`` / ``ft_factors``: :class:`FactorSet`
    or folders (``None`` when the method needs none). Dampings: absolute floats or ``"0.1x"`` (relative
    to the factors' mean eigenvalue).
    """

    def __init__(
        self,
        pretrained,
        finetuned,
        tokenizer,
        pt_factors: FactorSet | str | None = None,
        ft_factors: FactorSet | str | None = None,
        ft_tokenizer=None,
        damping_pt="0.1x",
        damping_ft="0.1x",
        template: str = "plain",
        batch_size: int = 8,
        max_length: int | None = None,
        truncate: bool = False,
        max_new_tokens: int = 16,
        device: str = "cpu",
        check_fingerprints: bool = True,
    ):
        from ..models.loading import load_tokenizer

        self.pt = _load(pretrained, "causal_lm").to(device).eval()
        self.ft = _load(finetuned, "auto").to(device).eval()
        self.tok = load_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        ftt = ft_tokenizer if ft_tokenizer is not None else self.tok
        self.ft_tok = load_tokenizer(str(ftt)) if isinstance(ftt, (str, os.PathLike)) else ftt
        self.pt_factors = FactorSet.load(pt_factors) if isinstance(pt_factors, (str, os.PathLike)) else pt_factors
        self.ft_factors = FactorSet.load(ft_factors) if isinstance(ft_factors, (str, os.PathLike)) else ft_factors
        self.damping_pt, self.damping_ft = damping_pt, damping_ft
        if template not in ("plain", "chat"):
            raise ValueError("template must be 'plain' or 'chat'")
        self.template = template
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.pt.config, "max_position_embeddings", None)
        self.truncate = truncate
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.classifier = _is_classifier(self.ft)
        per_head = True
        for f in (self.pt_factors, self.ft_factors):
            if f is not None:
                per_head = f.meta.get("per_head", True)
        self.tms_pt = tracked_modules(self.pt, per_head=per_head)
        self.tms_ft = tracked_modules(self.ft, per_head=per_head)
        from ..models.loading import backbone_match, model_fingerprint

        self.shared = backbone_match(self.ft, self.pt, self.tms_ft, self.tms_pt)
        if check_fingerprints:
            if self.pt_factors is not None:
                self._check(self.pt_factors, self.pt, "pre-trained model", model_fingerprint)
            if self.ft_factors is not None:
                self._check(self.ft_factors, self.ft, "fine-tuned model", model_fingerprint)

    @staticmethod
    def _check(fs: FactorSet, model, what, model_fingerprint):
        tms = tracked_modules(model, per_head=fs.meta.get("per_head", True), modules=fs.meta.get("module_subset", "all"))
        fs.check_model(model_fingerprint(model, tms), what)

    # ------------------------------------------------------------------------------ queries
    def _prompt_text(self, prompt: str) -> str:
        if self.template == "plain":
            return prompt
        if not getattr(self.ft_tok, "chat_template", None):
            raise InputError("the fine-tuned tokenizer has no chat template; use template='plain' (CLI: --template plain)")
        return self.ft_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, prompt_text: str) -> tuple[Encoded, str]:
        """Greedy-decode an answer from the fine-tuned model; returns the encoded pair and its text."""
        if self.classifier:
            raise InputError("a classification model does not generate text")
        prompt_ids = encode_prompt(self.ft_tok, prompt_text)
        if not prompt_ids:
            raise InputError("the prompt is empty")
        n_prompt = len(prompt_ids)
        room = self.max_new_tokens if self.max_length is None else min(self.max_new_tokens, self.max_length - n_prompt)
        if room < 1:
            raise InputError(f"the prompt is {n_prompt} tokens long, leaving no room for an answer within max_length={self.max_length}")
        ids = torch.tensor([prompt_ids], device=self.device)
        eos = self.ft_tok.eos_token_id
        out = self.ft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=room, do_sample=False,
                               pad_token_id=pad_token_id(self.ft_tok), eos_token_id=eos)
        new = out[0, n_prompt:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        text = self.ft_tok.decode(new)
        if "\n" in text:  # stop at the end of the line
            text = text[: text.index("\n")]
            new = self.ft_tok(text, add_special_tokens=False)["input_ids"]
        if not text.strip() or not new:
            raise InputError(f"the fine-tuned model generated an empty answer to {prompt_text!r}; give an answer explicitly")
        ids_all = prompt_ids + new
        tm = [False] * len(ids_all)
        for t in range(n_prompt - 1, len(ids_all) - 1):
            tm[t] = True
        return Encoded(ids_all, tm), text

    def prepare(self, queries: Sequence[Query]) -> list[PreparedQuery]:
        """Apply the template, generate missing answers (or predict missing labels), encode."""
        if not queries:
            raise InputError("no queries given")
        out = []
        for i, q in enumerate(queries):
            if not isinstance(q.prompt, str) or not q.prompt.strip():
                raise InputError(f"query {i}: the prompt is empty")
            pt = self._prompt_text(q.prompt)
            if self.classifier:
                label = q.label
                if label is None:
                    enc = encode_classification(self.ft_tok, pt, 0, max_length=self.max_length, index=i)
                    with torch.no_grad():
                        b = collate([enc], pad_id=pad_token_id(self.ft_tok)).to(self.device)
                        label = int(self.ft(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.argmax(-1))
                n_labels = self.ft.config.num_labels
                if not 0 <= int(label) < n_labels:
                    raise InputError(f"query {i}: label {label} is outside the classifier's {n_labels} classes")
                enc = encode_classification(self.ft_tok, pt, int(label), max_length=self.max_length, index=i)
                out.append(PreparedQuery(q, pt, None, int(label), enc, generated=q.label is None))
                continue
            if q.answer is None:
                enc, ans = self.generate(pt)
                enc.index = i
                out.append(PreparedQuery(q, pt, ans, None, enc, generated=True))
            else:
                enc = encode_prompt_answer(self.ft_tok, pt, q.answer, max_length=self.max_length, index=i)
                out.append(PreparedQuery(q, pt, q.answer, None, enc))
        return out

    def query_gradients(self, prepared: list[PreparedQuery]) -> dict[str, torch.Tensor]:
        """``∇m(θ_ft)`` per shared module, ``(Q, out, in_dim)``, ``m = −log p(answer | prompt)``."""
        objective = "classification" if self.classifier else "answer"
        grads: dict[str, list] = {}
        for i in range(0, len(prepared), self.batch_size):
            b = collate([p.encoded for p in prepared[i : i + self.batch_size]], pad_id=pad_token_id(self.ft_tok)).to(self.device)
            g = per_example_grads(self.ft, self.shared, b, objective)
            for n, x in g.items():
                if not torch.isfinite(x).all():
                    raise FloatingPointError("the query gradient is NaN or infinite: check the fine-tuned model")
                grads.setdefault(n, []).append(x)
        return {n: torch.cat(v) for n, v in grads.items()}

    def _need(self, fs, which):
        if fs is None:
            raise FactorError(f"method needs the {which} factors: fit them with `msif fit` and pass them")
        return fs

    def query_vectors(self, grads: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
        """``U`` per module: ``P_pt P_ft g`` (ms-if), ``P_ft g`` (ss-if) or ``g`` (gdp)."""
        if method == "gdp":
            return {n: g.double() for n, g in grads.items()}
        ft = self._need(self.ft_factors, "fine-tuned")
        missing = [n for n in grads if n not in ft.modules]
        if missing:
            raise FactorError(f"the fine-tuned factors do not cover module {missing[0]!r}; re-fit with --modules all")
        u = ft.precondition(grads, self.damping_ft)
        if method == "ss-if":
            return u
        pt = self._need(self.pt_factors, "pre-trained")
        common = [n for n in u if n in pt.modules]
        if not common:
            raise FactorError("the pre-trained and fine-tuned factors share no module")
        for n in common:
            if [b.out_dim for b in pt.modules[n].blocks] != [b.out_dim for b in ft.modules[n].blocks]:
                raise FactorError(f"module {n!r} is split into different blocks in the two factor sets (fit both with the same --per-head setting)")
        return pt.precondition({n: u[n] for n in common}, self.damping_pt)

    # ---------------------------------------------------------------------------- candidates
    def encode_candidates(self, texts: Sequence[str], rows: Sequence[int]) -> list[Encoded]:
        return [encode_text(self.tok, t, max_length=self.max_length, truncate=self.truncate, index=int(r)) for t, r in zip(texts, rows)]

    def _candidate_batches(self, encoded: list[Encoded]):
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        pid = pad_token_id(self.tok)
        for i in range(0, len(order), self.batch_size):
            yield collate([encoded[j] for j in order[i : i + self.batch_size]], pad_id=pid).to(self.device)

    def score(self, prepared: list[PreparedQuery], texts: Sequence[str], rows: Sequence[int] | None = None,
              method: str = "ms-if", per_token: bool = False, rank: int | None = None) -> ScoreResult:
        """Scores ``(Q, N)`` of candidate ``texts`` (in the given order) for prepared queries."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if len(texts) == 0:
            raise InputError("no candidate documents to score")
        rows = list(range(len(texts))) if rows is None else [int(r) for r in rows]
        if method == "repsim":
            return self._repsim(prepared, texts, rows)
        cand_model, tms = self.pt, self.shared
        if method == "ss-if":
            if self.classifier:
                raise InputError(
                    "single-stage IF needs the fine-tuned model to be a language model over the pre-training vocabulary; "
                    f"{type(self.ft).__name__} has a classification head. Use --method ms-if (or gdp / repsim)."
                )
            cand_model, tms = self.ft, self.shared
        U = self.query_vectors(self.query_gradients(prepared), method)
        if rank is not None:
            U = low_rank(U, tms, rank)
        enc = self.encode_candidates(texts, range(len(texts)))
        res = score_batches(cand_model, tms, U, self._candidate_batches(enc), objective="lm", per_token=per_token)
        # back to the caller's order; indices are positions in ``texts``
        order = torch.argsort(res.indices)
        res.scores = res.scores[:, order]
        res.per_module = res.per_module[:, order]
        if res.per_token is not None:
            res.per_token = [res.per_token[int(i)] for i in order]
        res.indices = torch.tensor(rows)
        return res

    @torch.no_grad()
    def _mean_hidden(self, model, batches) -> torch.Tensor:
        out = []
        for b in batches:
            h = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states[-1]
            m = b.attention_mask.unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1)).double())
        return torch.cat(out)

    def _repsim(self, prepared, texts, rows) -> ScoreResult:
        pid_q = pad_token_id(self.ft_tok)
        q = self._mean_hidden(self.ft, [collate([p.encoded], pad_id=pid_q).to(self.device) for p in prepared])
        enc = self.encode_candidates(texts, range(len(texts)))
        pid = pad_token_id(self.tok)
        c = self._mean_hidden(self.pt, [collate(enc[i : i + self.batch_size], pad_id=pid).to(self.device) for i in range(0, len(enc), self.batch_size)])
        if q.shape[1] != c.shape[1]:
            raise InputError("the two models' hidden sizes differ; RepSim needs the same backbone")
        s = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
        return ScoreResult(scores=s, per_module=s.unsqueeze(-1), modules=["hidden_states[-1]"], indices=torch.tensor(rows), roles=["representation"])

    def self_influence(self, texts: Sequence[str], damping=None) -> torch.Tensor:
        """``∇ℓ(z)ᵀ (G_pt+λ)⁻¹ ∇ℓ(z)`` for each text on θ_pt (``(N,)``)."""
        pt = self._need(self.pt_factors, "pre-trained")
        damping = self.damping_pt if damping is None else damping
        enc = self.encode_candidates(texts, range(len(texts)))
        out = torch.empty(len(texts), dtype=torch.float64)
        for b in self._candidate_batches(enc):
            g = per_example_grads(self.pt, [tm for tm in self.shared if tm.name in pt.modules], b, "lm")
            p = pt.precondition(g, damping)
            out[b.indices] = sum((p[n] * g[n].double()).sum((-1, -2)) for n in g)
        return out

    # --------------------------------------------------------------------------- whole thing
    def attribute(self, queries: Sequence[Query | PreparedQuery], corpus, candidates: Sequence[Sequence[int]] | None = None,
                  method: str = "ms-if", top: int = 10, per_token: bool = True, rank: int | None = None,
                  text_field: str = "text") -> Attribution:
        """Rank candidate rows of ``corpus`` (a :class:`msif.data.corpus.Corpus` or a list of texts) per query.

        ``candidates``: per query, the corpus rows to rerank (e.g. from the embedding index); ``None``
        scores every document (fine for small corpora). Queries sharing a candidate set share one pass.
        Already prepared queries (:meth:`prepare`) are used as they are (their answers are not re-generated).
        """
        todo = [q for q in queries if not isinstance(q, PreparedQuery)]
        done = iter(self.prepare(todo)) if todo else iter(())
        prepared = [q if isinstance(q, PreparedQuery) else next(done) for q in queries]
        texts_of = (lambda rows: corpus.texts(rows)) if hasattr(corpus, "texts") else (lambda rows: [corpus[r] for r in rows])
        ids_of = (lambda rows: corpus.doc_ids(rows)) if hasattr(corpus, "doc_ids") else (lambda rows: [str(r) for r in rows])
        n_docs = len(corpus)
        if candidates is None:
            candidates = [list(range(n_docs))] * len(prepared)
        if len(candidates) != len(prepared):
            raise ValueError("give one candidate list per query")
        groups: dict[tuple, list[int]] = {}
        for qi, c in enumerate(candidates):
            groups.setdefault(tuple(int(r) for r in c), []).append(qi)
        att = Attribution(method, prepared, [None] * len(prepared), [None] * len(prepared), [None] * len(prepared),
                          texts=[None] * len(prepared), dampings=self._resolved_dampings(method))
        if per_token and method != "repsim":
            att.token_scores, att.tokens = [None] * len(prepared), [None] * len(prepared)
        if method != "repsim":
            att.role_share, att.layer_share = [None] * len(prepared), [None] * len(prepared)
        for rows, qis in groups.items():
            rows = list(rows)
            texts = texts_of(rows)
            res = self.score([prepared[q] for q in qis], texts, rows, method=method, per_token=per_token and method != "repsim", rank=rank)
            for j, qi in enumerate(qis):
                s = res.scores[j]
                k = min(top, len(rows))
                best = torch.argsort(s, descending=True)[:k].tolist()
                att.rows[qi] = [rows[b] for b in best]
                att.doc_ids[qi] = ids_of(att.rows[qi])
                att.scores[qi] = [float(s[b]) for b in best]
                att.texts[qi] = [texts[b] for b in best]
                if att.token_scores is not None:
                    att.token_scores[qi] = [res.per_token[b][j].tolist() for b in best]
                    att.tokens[qi] = [self._token_strings(texts[b]) for b in best]
                if att.role_share is not None:
                    att.role_share[qi] = {r: float(v[j]) for r, v in res.role_shares().items()}
                    att.layer_share[qi] = _layer_shares(res, j)
        return att

    def _token_strings(self, text: str) -> list[str]:
        enc = encode_text(self.tok, text, max_length=self.max_length, truncate=True)
        return [self.tok.decode([t]) for t in enc.input_ids]

    def _resolved_dampings(self, method: str) -> dict[str, float]:
        d = {}
        if method in ("ms-if", "ss-if") and self.ft_factors is not None:
            d["ft"] = self.ft_factors.resolve_damping(self.damping_ft)
        if method == "ms-if" and self.pt_factors is not None:
            d["pt"] = self.pt_factors.resolve_damping(self.damping_pt)
        return d


def _layer_shares(res: ScoreResult, q: int) -> dict[str, float]:
    """Share of |influence| per (layer, role), e.g. ``{"layer 0 mlp": 0.4, ...}``."""
    import re

    absm = res.per_module[q].abs().sum(0)
    tot = float(absm.sum()) or 1.0
    out: dict[str, float] = {}
    for name, role, v in zip(res.modules, res.roles, absm.tolist()):
        m = re.search(r"\.(\d+)\.", name)
        key = f"layer {m.group(1) if m else '?'} {role}"
        out[key] = out.get(key, 0.0) + v / tot
    return out
