"""qt runtime core: model, checkpoint, tokenizer, sampling, generation."""
