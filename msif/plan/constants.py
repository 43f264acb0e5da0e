"""The measured and nominal constants the plan's memory and time estimates rest on."""


#: copies of the ``(B, T, V)`` logits alive at once in a backward through the model's own head (logits,
#: log-softmax saved by cross-entropy, the gradient of the log-softmax output, the gradient of the logits);
#: a fit of a plain-head LM forms them in chunks of ``LOGIT_CHUNK`` elements instead (logits, softmax,
#: its cumulative sum for the sampled labels, the log-sum-exp temporary: also four copies)
LOGIT_COPIES = 4
LOGIT_CHUNK = 1 << 24  # msif.objectives.LOGIT_CHUNK
#: float values autograd keeps per token and layer for an activation-only backward of a GPT-style
#: block, in units of the hidden size ``d`` (layer-norm inputs, q/k/v before and after the rotary
#: embedding, attention output, the tracked outputs the hooks hold) plus one MLP width ``f`` (GELU input)
ACT_PER_TOKEN_D, ACT_PER_TOKEN_F = 11, 1
#: RSS of the Python + torch + transformers + msif runtime, tokenizer and data besides the model's
#: weights: RSS at the start of `msif fit`'s covariance pass minus the weights, measured on the Pythia-70m
#: probe (benchmarks/probe.py; 519 MB − 269 MB, torch CPU, transformers 5). The older 410 MB was the
#: peak of a whole small command, allocator caching included.
CPU_RUNTIME_BYTES = 250 * 2**20
#: candidate batches are right-padded to a multiple of this many tokens (msif.influence.attribute.PAD_MULTIPLE)
PAD_MULTIPLE = 32
#: documents `msif attribute` reads, tokenises and scores at a time (its --chunk-size default)
ATTRIBUTE_CHUNK = 1024
#: elements of per-sequence gradients formed at once (msif.curvature.passes._CHUNK_ELEMS)
CHUNK_ELEMS = 1 << 26
#: nominal throughputs (FLOP/s) when not calibrated
NOMINAL_FLOPS = {"cpu": 2.0e10, "cuda": {"float32": 2.0e13, "other": 1.5e14}}
#: all-MiniLM-L6-v2: parameters, embedding width, tokens per text it reads at most
EMBEDDER_PARAMS, EMBED_DIM, EMBED_MAX_TOKENS = 22_713_216, 384, 256
#: architectures whose fit forms the head's gradient in closed form (msif.objectives.PLAIN_HEAD_TYPES)
PLAIN_HEAD_TYPES = ("gpt_neox", "gpt2", "llama", "mistral", "qwen2", "qwen3", "bloom", "opt")
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
