"""Pretraining from scratch: data shards, tokenizer, planner, trainer, recipes (see README.md)."""
