"""Teacher logits: a model scores the corpus and its top-K next-token distributions are stored.

The models run through ``fusion.backends`` (transformers or vLLM); the store's format is in
``fusion.artifacts.logit_store``.
"""
