"""What determines a built world: size presets, world variants, training settings, and the hash of all
that naming a world's cache directory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from msif.worldfacts.corpus import CorpusConfig

#: Bump when anything that changes the built artefacts changes (invalidates caches).
BUILD_VERSION = "4"  # 4: QA fine-tuning teaches the model to end its answer (EOS)


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage (AdamW, linear warm-up then cosine decay)."""

    epochs: int
    lr: float
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.1


@dataclass
class WorldConfig:
    """Everything that determines a built world (apart from the seed)."""

    corpus: CorpusConfig
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 256
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, lr=3e-3))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=5e-4))
    classifier: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=2e-4, batch_size=16))


SIZES: dict[str, WorldConfig] = {
    "full": WorldConfig(corpus=CorpusConfig()),
    "tiny": WorldConfig(
        corpus=CorpusConfig(max_countries=30, max_cities=20, n_paraphrases=3, mention_docs_per_subject=1),
        vocab_size=600,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        max_positions=128,
        pretrain=TrainConfig(epochs=15, lr=3e-3, batch_size=16),
        finetune=TrainConfig(epochs=10, lr=1e-3, batch_size=16),
        classifier=TrainConfig(epochs=10, lr=1e-3, batch_size=16),
    ),
}


#: World variants: the corpus style of the size preset's configuration.
WORLDS = ("standard", "hard")


def world_config(size: str = "full", world: str = "standard") -> WorldConfig:
    """The configuration of a size preset ("full", "tiny") for a world variant ("standard", "hard")."""
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {sorted(SIZES)}")
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")
    cfg = SIZES[size]
    if world == "standard":
        return cfg
    # hard documents hold rare alias words that tokenise into many pieces; rotary positions add no
    # parameters, so allowing 256 keeps the model the same and no document needs truncating
    return replace(cfg, corpus=replace(cfg.corpus, style=world), max_positions=max(cfg.max_positions, 256))


def config_record(cfg: WorldConfig) -> dict:
    """The configuration as recorded in ``world.json`` and hashed (a standard world's without its style)."""
    d = asdict(cfg)
    d["corpus"]["relations"] = list(d["corpus"]["relations"])
    if d["corpus"]["style"] == "standard":  # as before the hard world existed: same record, same hash
        del d["corpus"]["style"]
    return d


def world_hash(size: str = "full", seed: int = 0, config: WorldConfig | None = None, world: str = "standard") -> str:
    """Short hash naming a world's cache directory: build version, configuration and seed.

    ``config`` (default: :func:`world_config` of ``size`` and ``world``) decides the variant.
    """
    cfg = config or world_config(size, world)
    blob = {"v": BUILD_VERSION, "size": size, "seed": seed, "config": config_record(cfg)}
    if cfg.corpus.style == "hard":
        from msif.worldfacts.hard import HARD_VERSION

        blob["hard_version"] = HARD_VERSION
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
