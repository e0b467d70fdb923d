"""LVPruning: language-guided vision token pruning for LLaVA-style multimodal LLMs."""
