"""Evaluation: embedders, metrics on embeddings, and the protocols that generate and score images."""
