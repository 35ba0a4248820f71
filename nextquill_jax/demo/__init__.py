"""The offline demo: the synthetic benchmark, a tokenizer trained on it, several loss variants trained and
compared in one table."""
