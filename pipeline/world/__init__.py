"""The embedded default: the synthetic fine-grained VQA world and the check of its model."""
