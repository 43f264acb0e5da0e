"""Rerun the world's own training on other inputs, bit for bit: the QA fine-tune on a patched θ_pt
(:func:`finetune_qa`), the pre-training on a subset of the documents (:func:`pretrain_lm`)."""

from __future__ import annotations

from msif.data.encoding import encode_text
from msif.worldfacts.config import TrainConfig
from msif.worldfacts.qa import qa_examples
from msif.worldfacts.training import torch_state, train_model
from msif.worldfacts.world import World


def finetune_qa(world: World, model, progress: bool = False) -> list[float]:
    """Rerun the world's QA fine-tuning on ``model`` in place (θ_pt, or a patched copy of it): the same
    examples, data order, seed, schedule and one thread, so the world's own θ_pt gives the world's θ_ft.
    Returns the mean loss per epoch."""
    cfg = TrainConfig(**world.meta["config"]["finetune"])
    tok = world.load_tokenizer()
    with torch_state(1, world.seed):
        return train_model(model, qa_examples(tok, world.finetune_facts), cfg, tok.pad_token_id, world.seed + 1,
                           "QA fine-tuning", progress)


def pretrain_lm(world: World, rows: list[int] | None = None, progress: bool = False):
    """Rerun the world's pre-training on the documents ``rows`` (default: all): the same initialisation,
    data-order seed, schedule and one thread, so all rows give the world's θ_pt. Returns the model."""
    from transformers import GPTNeoXForCausalLM

    cfg = world.meta["config"]
    tok = world.load_tokenizer()
    texts = [d["text"] for d in world.documents]
    keep = range(len(texts)) if rows is None else sorted(rows)
    docs = [encode_text(tok, texts[i], max_length=cfg["max_positions"], index=i) for i in keep]
    with torch_state(1, world.seed):
        model = GPTNeoXForCausalLM(world.load_pretrained().config)  # the same architecture, initialised as in the build
        train_model(model, docs, TrainConfig(**cfg["pretrain"]), tok.pad_token_id, world.seed, "pre-training", progress)
    return model
