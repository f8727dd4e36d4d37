"""The Hugging Face sweep (tests/hf_sweep.py) in the suite: each model type built tiny and random,
patched, and judged against its unpatched twin in training mode with padding and masked labels
(loss, every gradient, the router's auxiliary loss on and off, the logits without labels).

By default a representative subset: one model type for each reason the adapter used to decline
(the router loss of mixture-of-experts models, composite and vision-language models run with
their images, config keys naming the head's transforms, keys that only look like one, backbone
discovery, heads that are not a plain nn.Linear) and models it must keep declining.
``PROBACT_HF_SWEEP=all`` runs every causal-LM model type of the installed transformers and the
vision-language families instead (slow: about an hour on two cores; ``python tests/hf_sweep.py``
prints the same as a table with the counts)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")


def _load_sweep():
    """tests/hf_sweep.py, loaded by path (the importlib import mode puts no test dir on
    sys.path)."""
    spec = importlib.util.spec_from_file_location("hf_sweep", Path(__file__).with_name(
        "hf_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_sweep"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()

# model type -> the outcome it must have, and why it is in the subset
SUBSET = {
    "mixtral": "patched-ok",  # a router loss added when output_router_logits is on
    "gemma3": "patched-ok",  # a composite model (its language model under a wrapper)
    "opt": "patched-ok",  # the decoder under model.model.decoder
    "recurrent_gemma": "patched-ok",  # logits_soft_cap: a softcap under another name
    "hyperclovax": "patched-ok",  # logits_scaling as a multiplier (Granite's is a divisor)
    "falcon_h1": "patched-ok",  # lm_head_multiplier; num_logits_to_keep (generation only)
    "minicpm3": "patched-ok",  # a divisor on the hidden states, before the head
    "llama4": "patched-ok",  # base_model_prefix names another attribute
    "gpt_neo": "patched-ok",  # a stale return annotation
    "ergo": "patched-ok",  # a head that accumulates in fp32 (nn.Linear subclass)
    "bert": "patched-ok",  # a prediction head's transform before the decoder
    "dory": "declined",  # a learned per-class logit scale: no kernel for it
    "bart": "declined",  # computes its loss without model.loss_function
    sweep.IMAGE_TEXT + "llava": "patched-ok",  # the vision tower run by the model's forward
    sweep.IMAGE_TEXT + "qwen2_vl": "patched-ok",  # image grids, mrope positions
}

if os.environ.get("PROBACT_HF_SWEEP") == "all":
    CASES = [pytest.param(t, None, marks=pytest.mark.slow)
             for t in sweep.all_model_types() + list(sweep.VLM_BATCHES)]
else:
    CASES = list(SUBSET.items())


@pytest.mark.parametrize(("model_type", "expected"), CASES)
def test_transformers_sweep(model_type, expected, device):
    base = model_type.removeprefix(sweep.IMAGE_TEXT)
    mapping = (transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
               if model_type.startswith(sweep.IMAGE_TEXT) else
               transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if base not in mapping:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    result = sweep.run(model_type, batch_fn=sweep.VLM_BATCHES.get(model_type), device=device)
    if expected is None:  # the full sweep: anything but a wrong patch or an error
        if result.outcome == "not-built":
            pytest.skip(f"the sweep cannot build {model_type}: {result.reason}")
        assert result.outcome in ("patched-ok", "declined"), result
    else:
        assert result.outcome == expected, result
