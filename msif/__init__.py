"""msif: multi-stage influence functions for large language models.

Answers, for a fine-tuned language model and one of its outputs, which pre-training documents made
it say this, and how much (arXiv 2505.05017), with EK-FAC curvature fitted for the pre-trained and
the fine-tuned model.
"""

__version__ = "0.1.0"
