"""Measurements: the knowledge benchmark, instruction following, chat quality, output shift, data patterns,
embeddings, statistics, and the whole evaluation of one model."""
