"""Corpora in and out, tokenisation with masks."""
