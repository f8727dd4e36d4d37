"""The Hugging Face sweep: ``patch()`` on every causal-LM model type of the installed transformers
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and on the image-text-to-text families with their vision
inputs, each model built tiny and random (nothing downloaded), and judged against its unpatched
twin in training mode with padding, masked labels and logits scaled to tens (so a misread head
transform moves the loss far beyond the tolerance).

Each model type ends in one outcome:

- ``patched-ok``: patched, and the loss, every parameter's gradient, the loss with
  ``num_items_in_batch``, the logits without labels (and, for a forward that takes
  ``output_router_logits``, the loss and gradients with the router's auxiliary loss on) match;
- ``patched-wrong``: patched, and one of those differs (the reason says which);
- ``declined``: ``patch`` returned False (the reason is its warning);
- ``error``: ``patch`` or the patched model raised;
- ``not-built``: the sweep could not build a tiny model of that type (a missing optional
  package, say): no outcome for ``patch``.

Run it (TRITON_INTERPRET=1 is set where there is no CUDA)::

    python tests/hf_sweep.py                # every model type, a table and the counts
    python tests/hf_sweep.py llama gemma3   # some
    python tests/hf_sweep.py --dtype bf16 llama gemma2

``tests/test_integrations_transformers_sweep.py`` runs a representative subset in the suite and
all of them with ``PROBACT_HF_SWEEP=all``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import sys
import time
import warnings

if __name__ == "__main__":
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

VOCAB = 1000
# The sizes every config gets where it has the key (under its own name or its attribute_map's).
SIZES = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
    topk_group=1, first_k_dense_replace=1, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_layers=2, decoder_layers=2,
)
# Per model type: keys over SIZES that make the tiny config valid (what its validators ask).
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
EXTRA: dict[str, dict] = {
    "axk2": {"num_key_value_heads": 4},
    "codegen": {"rotary_dim": 8},
    "glm_moe_dsa": {"num_key_value_heads": 4},
    "gptj": {"rotary_dim": 8},
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention"]},
    "longcat_flash": {"num_key_value_heads": 4},
    "cohere_compass_text": {"rope_parameters": {"full_attention": _ROPE,
                                                "sliding_attention": _ROPE}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "deepseek_v32": {"num_key_value_heads": 4},
    "dots1": {"n_shared_experts": 1},
    "dots3_note": {"num_key_value_heads": 4},
    "dots3_note_text": {"num_key_value_heads": 4},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "kolibri1_1": {"index_num_heads": 2, "layer_types": ["sliding_attention", "indexed_attention"],
                   "index_layers": [1], "kv_source_layers": [0, 1], "mlp_only_layers": [0]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "mamba2": {"num_heads": 8},
    "reformer": {"is_decoder": True},
    "zaya": {"num_experts_per_tok": 1},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "zamba2": {"hybrid_layer_ids": [1]},
    "recurrent_gemma": {"num_hidden_layers": 3},
}
# Sizes a type must keep (its config derives them per layer).
KEEP: dict[str, set] = {
    "gemma4": {"head_dim"}, "gemma4_text": {"head_dim"}, "gemma4_unified": {"head_dim"},
    "gemma4_unified_assistant": {"head_dim"}, "gemma4_unified_text": {"head_dim"},
}


def _fields(cls) -> dict:
    try:
        return {f.name: f for f in dataclasses.fields(cls)}
    except TypeError:
        return {}


def _get(config, key):
    try:  # some keys raise on a config whose layers differ (Gemma 4's head_dim)
        return getattr(config, key, None)
    except Exception:
        return None


def make_config(cls, extra=None, keep=frozenset()):
    """A tiny config of class ``cls``: SIZES where it has the keys, ``extra`` over them, its
    sub-configs made tiny in turn, token ids beyond the vocabulary moved inside it."""
    from transformers import PreTrainedConfig

    names = _fields(cls)
    aliases = getattr(cls, "attribute_map", None) or {}
    kwargs = {}
    for key, value in SIZES.items():
        key = aliases.get(key, key)
        if key in names and key not in keep:
            kwargs[key] = value
    extra = dict(extra or {})
    subs = getattr(cls, "sub_configs", None) or {}
    sub_extra = {k: extra.pop(k) for k in list(extra) if k in subs and isinstance(extra[k], dict)}
    kwargs.update(extra)
    config = cls(**kwargs)
    more = {}
    for key in names:
        value = _get(config, key)
        if isinstance(value, PreTrainedConfig) and key not in kwargs:
            more[key] = make_config(type(value), sub_extra.get(key))
    next_id = VOCAB - 1
    for key in sorted(names):
        value = _get(config, key)
        if (key.endswith(("_id", "_index")) and type(value) is int and value >= VOCAB
                and key not in kwargs):
            more[key] = next_id
            next_id -= 1
    return cls(**kwargs, **more) if more else config


IMAGE_TEXT = "image-text:"  # a sweep entry: that model type's image-text-to-text class


def model_class(model_type):
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type.startswith(IMAGE_TEXT):
        name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type[len(IMAGE_TEXT):]]
    else:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return getattr(transformers, name)


def make_model(model_type, dtype=torch.float32, seed=0):
    from transformers import CONFIG_MAPPING, PreTrainedConfig

    cls = model_class(model_type)
    base = model_type.removeprefix(IMAGE_TEXT)
    config_cls = cls.config_class
    if config_cls in (None, PreTrainedConfig):  # a class that names no config class of its own
        config_cls = CONFIG_MAPPING[base]
    extra = VLM_EXTRA.get(base) if model_type.startswith(IMAGE_TEXT) else EXTRA.get(base)
    config = make_config(config_cls, extra, KEEP.get(base, set()))
    torch.manual_seed(seed)
    model = cls(config)
    return model.to(dtype)


# --------------------------------------------------------------------------- inputs


def _forbidden_ids(config) -> set:
    """Token ids the config names (image, pad, special tokens): never drawn as text."""
    ids = set()

    def walk(d):
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(key, str) and (key.endswith(("_id", "_index", "_ids"))):
                for v in value if isinstance(value, list) else [value]:
                    if type(v) is int:
                        ids.add(v)

    walk(config.to_dict())
    return ids


def text_batch(model, batch=2, seq=12, seed=1, padding=True):
    config = model.config
    n_ids = min(model.get_input_embeddings().weight.shape[0],
                getattr(config.get_text_config(), "vocab_size", VOCAB) or VOCAB)
    allowed = torch.tensor(sorted(set(range(min(n_ids, 4 * VOCAB))) - _forbidden_ids(config)))
    generator = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (batch, seq), generator=generator)]
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    out = dict(input_ids=ids, labels=labels)
    if "use_cache" in inspect.signature(type(model).forward).parameters:
        out["use_cache"] = False  # training
    if padding:
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding
        labels[1, :2] = -100
        out["attention_mask"] = mask
    return out


# --------------------------------------------------------------------------- one model type


@dataclasses.dataclass
class Result:
    model_type: str
    outcome: str
    reason: str = ""
    seconds: float = 0.0


TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def _mismatch(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bad = (err > atol + rtol * want.abs()) | (got.isnan() != want.isnan())
    if bad.any():
        return f"{what}: max abs error {err.nan_to_num(float('inf')).max().item():.3g}"
    return None


def _scale_head(model, batch, target=10.0):
    """Scale the head so the logits' spread is ~``target``: a softcap of 30 or a divisor of 4
    read wrongly then moves the loss far beyond the tolerance."""
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        return  # a list of heads (patch declines it)
    with torch.no_grad():
        model.eval()
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**kwargs).logits.float()
        model.train()
        spread = logits.std()
        if not torch.isfinite(spread) or spread == 0:
            return
        head.weight.mul_(target / spread)
        if getattr(head, "bias", None) is not None:
            head.bias.mul_(target / spread)


def _step(model, batch, seed, **kwargs):
    torch.manual_seed(seed)
    out = model(**batch, **kwargs)
    model.zero_grad(set_to_none=True)
    if out.loss is not None:
        out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, grads


def compare(model, ref, batch, dtype=torch.float32, num_items=False) -> str | None:
    """The first difference between the patched ``model`` and the unpatched ``ref`` (training
    mode, same seeds), or None: the loss and every gradient (with ``num_items_in_batch`` too
    when ``num_items``; the router's auxiliary loss on too where the forward takes
    ``output_router_logits``), then the logits without labels."""
    model.train()
    ref.train()
    cases = [{}]
    if num_items:
        n_items = int((batch["labels"][..., 1:] != -100).sum())
        cases.append({"num_items_in_batch": torch.tensor(n_items)})
    if "output_router_logits" in inspect.signature(type(ref).forward).parameters:
        cases.append({"output_router_logits": True})
    for kwargs in cases:
        try:
            want, want_grads = _step(ref, batch, 7, **kwargs)
        except Exception:
            if not kwargs:
                raise
            continue  # the unpatched model fails with that argument: nothing to compare
        out, grads = _step(model, batch, 7, **kwargs)
        what = "loss" + (f" with {sorted(kwargs)}" if kwargs else "")
        if out.logits is not None:
            return f"{what}: the patched model returned logits"
        bad = _mismatch(out.loss, want.loss, dtype, what)
        if bad:
            return bad
        for key in set(want.keys()) - {"logits", "loss"}:
            if key not in out.keys():
                return f"{what}: the output lacks {key!r}"
        # gradients of every size, each relative to its own scale — but not below a 1e-3 of
        # the largest: a gradient that is zero in exact arithmetic (an attention key's bias)
        # is rounding noise on both sides
        top = max((float(g.abs().max()) for g in want_grads.values() if g is not None),
                  default=0.0)
        for name, g in want_grads.items():
            mine = grads[name]
            if (g is None) != (mine is None):
                return f"grad of {name} ({what}): one side has none"
            if g is not None:
                scale = g.abs().max().clamp_min(max(1e-3 * top, 1e-30))
                bad = _mismatch(mine / scale, g / scale, dtype, f"grad of {name} ({what})")
                if bad:
                    return bad
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    torch.manual_seed(3)
    out = model(**unlabeled)
    torch.manual_seed(3)
    want = ref(**unlabeled)
    if out.logits is None or not torch.equal(out.logits, want.logits):
        return "labels=None: the logits differ from the unpatched model's"
    return None


def run(model_type, dtype=torch.float32, batch_fn=None, num_items=False,
        device="cpu") -> Result:
    """One model type's outcome (see the module docstring)."""
    from probact_gpu.integrations import transformers as hf

    def on_device(batch):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    start = time.perf_counter()
    try:
        model = make_model(model_type, dtype).to(device)
        batch = on_device((batch_fn or text_batch)(model))
        try:
            _scale_head(model, batch)
            _step(copy.deepcopy(model), batch, 7)
        except Exception:
            if batch_fn is not None:
                raise
            batch = on_device(text_batch(model, padding=False))  # no padding mask taken
            _scale_head(model, batch)
            _step(copy.deepcopy(model), batch, 7)
        ref = copy.deepcopy(model)
    except Exception as exc:
        return Result(model_type, "not-built", f"{type(exc).__name__}: {exc}".splitlines()[0],
                      time.perf_counter() - start)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patched = hf.patch(model)
        if not patched:
            reasons = [str(w.message) for w in caught if "left unpatched" in str(w.message)]
            reason = reasons[0].split(": ", 2)[-1] if reasons else "(no warning)"
            return Result(model_type, "declined", reason, time.perf_counter() - start)
        bad = compare(model, ref, batch, dtype, num_items)
    except Exception as exc:
        return Result(model_type, "error", f"{type(exc).__name__}: {exc}".splitlines()[0],
                      time.perf_counter() - start)
    outcome = "patched-wrong" if bad else "patched-ok"
    return Result(model_type, outcome, bad or "", time.perf_counter() - start)


def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main(argv=None) -> int:
    import argparse

    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: every causal LM)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    types = args.types or all_model_types() + list(VLM_BATCHES)
    results = []
    for model_type in types:
        result = run(model_type, dtype, VLM_BATCHES.get(model_type))
        results.append(result)
        print(f"{result.model_type:28s} {result.outcome:14s} {result.seconds:6.1f}s  "
              f"{result.reason[:160]}", flush=True)
    counts = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    print(f"\ntransformers {transformers.__version__}, {len(results)} model types, {args.dtype}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("patched-wrong") or counts.get("error") else 0


# --------------------------------------------------------------------------- vision-language

# The image-text-to-text families, each with a tiny vision tower, and their image inputs: an
# image's placeholder tokens at the start of each row (labels -100 there), then text.
_TINY_VISION = {"image_size": 16, "patch_size": 4}
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
VLM_EXTRA: dict[str, dict] = {
    "gemma3": {"mm_tokens_per_image": 4, "vision_config": _TINY_VISION},
    "llava": {"image_seq_length": 16, "vision_config": _TINY_VISION},
    "paligemma": {"projection_dim": 64, "vision_config": {**_TINY_VISION, "projection_dim": 64}},
    "qwen2_vl": {"vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 4},
                 "text_config": {"rope_parameters": _MROPE}},
    "qwen2_5_vl": {"vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64,
                                     "num_heads": 2, "patch_size": 4, "out_hidden_size": 64,
                                     "fullatt_block_indexes": [1], "window_size": 16},
                   "text_config": {"rope_parameters": _MROPE}},
    "idefics2": {"vision_config": _TINY_VISION,
                 "perceiver_config": {"resampler_n_latents": 4, "resampler_depth": 1,
                                      "resampler_n_heads": 2, "resampler_head_dim": 8,
                                      "num_key_value_heads": 1}},
    "idefics3": {"scale_factor": 2, "vision_config": _TINY_VISION},
    "mllama": {"vision_config": {**_TINY_VISION, "max_num_tiles": 1, "num_global_layers": 1,
                                 "intermediate_layers_indices": [0], "vision_output_dim": 128,
                                 "supported_aspect_ratios": [[1, 1]]},
               "text_config": {"cross_attention_layers": [1]}},
}


def _image_token(config):
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return value
    raise KeyError("no image token id in the config")


def vlm_batch(model_type):
    """A batch function for ``run``: text_batch with ``n`` image tokens in front and the
    family's image inputs."""
    def make(model):
        config = model.config
        batch = text_batch(model, seq=20)
        ids, labels = batch["input_ids"], batch["labels"]
        n, image = _VLM_IMAGE[model_type](config, ids.shape[0])
        ids[:, 2:2 + n] = _image_token(config)
        labels[:, 2:2 + n] = -100
        if "attention_mask" in batch:  # the padded row's first two tokens: no image there
            batch["attention_mask"][1, :2] = 0
        params = inspect.signature(type(model).forward).parameters
        for key in ("token_type_ids", "mm_token_type_ids"):
            if key in params:
                batch[key] = (ids == _image_token(config)).long()
        batch.update(image)
        return batch
    return make


def _pixels(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


def _qwen_image(config, batch):
    vision = config.vision_config
    grid = 4  # patches per side; merged 2 × 2 into 4 tokens
    patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    thw = torch.tensor([[1, grid, grid]] * batch)
    tokens = grid * grid // vision.spatial_merge_size ** 2
    return tokens, {"pixel_values": _pixels(batch * grid * grid, patch), "image_grid_thw": thw}


_VLM_IMAGE = {
    "gemma3": lambda c, b: (4, {"pixel_values": _pixels(b, 3, 16, 16)}),
    "llava": lambda c, b: (16, {"pixel_values": _pixels(b, 3, 16, 16)}),
    "paligemma": lambda c, b: (16, {"pixel_values": _pixels(b, 3, 16, 16)}),
    "qwen2_vl": _qwen_image,
    "qwen2_5_vl": _qwen_image,
    "idefics2": lambda c, b: (4, {"pixel_values": _pixels(b, 1, 3, 16, 16),
                                  "pixel_attention_mask": torch.ones(b, 1, 16, 16, dtype=bool)}),
    "idefics3": lambda c, b: (4, {"pixel_values": _pixels(b, 1, 3, 16, 16),
                                  "pixel_attention_mask": torch.ones(b, 1, 16, 16, dtype=bool)}),
    "mllama": lambda c, b: (1, {"pixel_values": _pixels(b, 1, 1, 3, 16, 16),
                                "aspect_ratio_ids": torch.ones(b, 1, dtype=torch.long),
                                "aspect_ratio_mask": torch.ones(b, 1, 1, dtype=torch.long),
                                "cross_attention_mask": torch.ones(b, 20, 1, 1,
                                                                   dtype=torch.long)}),
}
VLM_BATCHES = {IMAGE_TEXT + t: vlm_batch(t) for t in _VLM_IMAGE}

if __name__ == "__main__":
    sys.exit(main())
