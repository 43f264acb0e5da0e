"""msif: multi-stage influence functions for large language models.

Answers, for a fine-tuned language model and one of its outputs, which pre-training documents made
it say this, and how much (arXiv 2505.05017), with EK-FAC curvature fitted for the pre-trained and
the fine-tuned model.
"""

import os as _os

# Passive OpenMP waiting: with busy-waiting (the default), torch's small CPU kernels slow down by an
# order of magnitude as soon as the machine is shared (measured here: a factor fit took 45 s instead of
# 3.7 s with other processes running). Only takes effect if torch is not imported yet; an explicit
# OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
