"""Tiny LLaVA and Qwen2.5-VL models built from configs: test fixtures and the embedded model's architecture."""
