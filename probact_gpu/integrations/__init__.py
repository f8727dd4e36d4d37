"""Adapters to training frameworks. Each lives in its own module, imports its framework only
there (importing the module never needs the framework; using it does), calls probact_gpu's
public API only, and fails closed: a model it cannot reproduce exactly is left untouched, with
a warning that says why.

- ``probact_gpu.integrations.transformers``: ``patch(model)`` for Hugging Face causal LMs and
  image-text models; ``token_log_probs(model, input_ids)`` for RL loops.
"""
