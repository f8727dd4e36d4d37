"""Hugging Face transformers: train a causal LM without ever holding its (tokens × vocab) logits.

    from probact_gpu.integrations.transformers import patch
    patch(model)          # True: patched; False: left untouched, with a warning saying why

``patch`` changes one model *instance* (no class copies, no per-family forwards). When labels are
given in training, the model's **own forward** runs — its backbone, its vision or audio tower,
its router's auxiliary loss, its label handling — with two substitutions for that call:

- the output embedding (``model.get_output_embeddings()``) keeps its input, the hidden states
  it would turn into logits, and returns a (…, 1) placeholder instead of the logits;
- ``model.loss_function`` (transformers' ``ForCausalLMLoss``, which the forward calls with those
  "logits" and the labels) computes the same loss with ``probact_gpu.linear_cross_entropy``
  from the kept hidden states and the head's weight: per chunk of tokens the logits are formed,
  reduced and differentiated inside the fused op, so the (tokens × V) tensor never exists.

Whatever the forward does with the loss afterwards (a mixture-of-experts router's auxiliary
loss added when ``output_router_logits`` is on) it does as always; the output is the model's
own, with ``logits=None``.

What the fused loss reproduces from ``ForCausalLMLoss``: label shifting (or the pre-shifted
``shift_labels``), ``ignore_index``, ``num_items_in_batch`` (the summed loss divided by it),
an fp32 loss; and the head's transforms, read from the config and applied inside the kernels in
fp32 — ``final_logit_softcapping`` / ``logits_soft_cap`` / ``output_logit_soft_cap`` (a softcap),
``logit_scale`` (Cohere) and ``logits_scaling`` (HyperCLOVA X) and ``lm_head_multiplier``
(Falcon-H1) as multipliers, ``logits_scaling`` as a divisor in the Granite family — and the
head's bias. Transforms on the hidden states *before* the head (MiniCPM3's divisor) are the
model's own forward's, so nothing needs to be read for them.

Every fused call checks, without a host sync, that the forward did what the substitution needs:
the head called once, the loss computed once through ``loss_function`` on a tensor of the
placeholder's shape, and the placeholder transformed exactly when the config names a transform.
A forward that does otherwise raises ``RuntimeError`` instead of computing another loss.

``patch`` declines (returns False, warns, changes nothing) when it cannot be sure to compute the
same loss: a head that is not a plain ``nn.Linear`` (or a linear that accumulates in fp32, which
is the fused op's arithmetic), a custom loss function, a model class that is not transformers'
own, a config key that may change the logits that it does not understand, and — unless
``check=False`` — a parity probe at patch time (two random sequences through the patched and the
unpatched forward, with the router's auxiliary loss off and on where the forward takes
``output_router_logits``) whose loss or per-token losses differ beyond the dtype's tolerance, or
that raises.

Without labels (generation, evaluation that needs logits) the model's own forward runs
unchanged. In ``eval()`` mode with labels the own forward runs too (metrics may need logits)
unless ``patch(model, eval_skip_logits=True)`` or a call's ``skip_logits=True`` asks for the
fused loss only.

``return_token_log_probs=True`` / ``return_entropy=True`` on a call (with labels) add
``token_log_probs`` / ``token_entropy`` (fp32, the shifted labels' shape, 0 where ignored) to the
output, computed by ``probact_gpu.linear_token_log_probs`` without logits; the loss is then
``-Σ log p / n`` from those log-probs. ``token_log_probs(model, input_ids, ...)`` gives RL loops
the log-prob (and entropy) of every next token of a sequence the same way, without labels.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import warnings
from typing import Any

import torch
from torch import nn

import probact_gpu

__all__ = ["head_options", "is_patched", "patch", "token_log_probs", "unpatch"]

_STATE = "_probact_patch"  # in the model's __dict__: its _Patch
_HEAD_STATE = "_probact_head"  # in the head's __dict__: the same _Patch
_VERDICT = "_probact_probe"  # in an unpatched model's __dict__: token_log_probs' probe result

# Config keys whose name says they may act on the logits. Those read here, and those known to
# act elsewhere, are listed; any other one with a value that is not None or False makes patch
# decline.
_LOGIT_KEY = re.compile(r"logit|lm_head|output_mult|width_mult|(^|_)mup(_|$)")
# key -> (what it is in the kernels, the model types whose forward applies it that way; None:
# every model type). A key read for model types outside its tuple makes patch decline.
_READ_KEYS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "final_logit_softcapping": ("softcap", None),
    "logits_soft_cap": ("softcap", ("recurrent_gemma",)),
    "output_logit_soft_cap": ("softcap", ("xlstm",)),
    "logit_scale": ("multiplier", ("cohere",)),
    "lm_head_multiplier": ("multiplier", ("falcon_h1",)),
    "logits_scaling": ("divisor", ("granite",)),
}
# logits_scaling multiplies the logits in HyperCLOVA X and divides the hidden states before the
# head (which the model's own forward does) in MiniCPM3: the model types where it is not the
# Granite divisor.
_LOGITS_SCALING_OTHER = {"hyperclovax": "multiplier", "minicpm3": "before the head"}
# Keys that match _LOGIT_KEY and act inside the backbone or only when generating: those of the
# attention scores and of a mixture-of-experts router (inside the blocks), and these.
_ELSEWHERE_KEY = re.compile(r"attn|attention|router")
_ELSEWHERE_KEYS = frozenset({
    "num_logits_to_keep",  # generation only (Bamba, Nemotron-H, Zamba2, Falcon-H1)
    "logits_mup_width_multiplier",  # divides the hidden states before the head (Inkling)
})
# Heads that are not nn.Linear.forward but compute what the fused op computes: the product of
# operands rounded to the weight's dtype, accumulated in fp32.
_FP32_LINEAR_HEADS = frozenset({"ErgoLinearWithFP32Output"})

# (atol, rtol) of the patch-time parity probe, per dtype: the unpatched model rounds its logits
# (and, for a softcap, every step of the transform) to the dtype before upcasting; the kernels
# transform in fp32. A misread transform moves the loss far more than this.
_PROBE_TOLERANCE = {
    torch.float64: (1e-6, 1e-6),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


class _Decline(Exception):
    """Why a model cannot be patched (the message is the warning's text)."""


class FusedLossError(RuntimeError):
    """The model's forward did not do what computing its loss without the logits needs."""


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "probact_gpu.integrations.transformers needs the transformers package: "
            "pip install 'probact-gpu[transformers]'") from exc
    return transformers


# --------------------------------------------------------------------------- reading the model


def _config_items(config) -> dict[str, Any]:
    """The keys of the config and of its text config (a composite model's language model), the
    text config's winning; vision and audio configs do not act on the head."""
    items: dict[str, Any] = {}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config,) if text is config else (config, text):
        for key, value in cfg.to_dict().items():
            if isinstance(key, str) and not isinstance(value, dict):
                items[key] = value
    return items


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Decline(f"config.{name} = {value!r} is not a number")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise _Decline(f"config.{name} = {value!r} is not a positive finite number")
    return value


def _model_type(config) -> str:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))


def _read_head_options(model) -> dict[str, Any]:
    config = model.config
    items = _config_items(config)
    model_type = _model_type(config)
    top_type = str(getattr(config, "model_type", ""))

    def is_type(types_: tuple[str, ...] | None) -> bool:
        return types_ is None or any(t.startswith(types_) for t in (model_type, top_type))

    unknown = sorted(key for key, value in items.items()
                     if _LOGIT_KEY.search(key) and not _ELSEWHERE_KEY.search(key)
                     and key not in _READ_KEYS
                     and key not in _ELSEWHERE_KEYS and value is not None and value is not False)
    if unknown:
        shown = ", ".join(f"{key}={items[key]!r}" for key in unknown)
        raise _Decline(f"the config has keys that may change the logits and that patch does not "
                       f"understand: {shown}")
    options: dict[str, Any] = {"softcap": None, "logit_scale": 1.0, "logit_divisor": 1.0,
                               "named": False}
    for key, (kind, types_) in _READ_KEYS.items():
        value = items.get(key)
        if value is None or value is False:
            continue
        if key == "logits_scaling" and not is_type(types_):
            kind = next((k for t, k in _LOGITS_SCALING_OTHER.items() if is_type((t,))), None)
            if kind is None:
                raise _Decline(f"config.logits_scaling is a logit divisor in the Granite family "
                               f"and a multiplier in HyperCLOVA X; model_type {model_type!r} "
                               "may use it otherwise")
            if kind == "before the head":
                continue
        elif not is_type(types_):
            raise _Decline(f"config.{key} is read for model types {'/'.join(types_)} only; "
                           f"model_type {model_type!r} may use it otherwise")
        value = _number(key, value)
        options["named"] = True
        if kind == "softcap":
            if options["softcap"] is not None:
                raise _Decline("the config names more than one logit softcap")
            options["softcap"] = value
        elif kind == "multiplier":
            options["logit_scale"] *= value
        else:
            options["logit_divisor"] *= value
    own = getattr(model, "logit_scale", None)
    if items.get("logit_scale") is None and is_type(_READ_KEYS["logit_scale"][1]) and (
            type(own) is float):
        # a Cohere forward that multiplies by model.logit_scale, 1.0 where the config has None
        options["logit_scale"] *= own
        options["named"] = True
    if items.get("logit_scale") is not None:
        own = getattr(model, "logit_scale", items["logit_scale"])
        if not isinstance(own, (int, float)) or float(own) != float(items["logit_scale"]):
            raise _Decline(f"model.logit_scale = {own!r} differs from config.logit_scale = "
                           f"{items['logit_scale']!r}")
    return options


def _has_transform(options) -> bool | None:
    """True: the forward must transform the logits; False: it must not; None: either (the
    config names a transform whose value changes nothing, e.g. logits_scaling = 1, which a
    forward may apply or skip)."""
    if (options["softcap"] is not None or options["logit_scale"] != 1.0
            or options["logit_divisor"] != 1.0):
        return True
    return None if options["named"] else False


def _check_head(head) -> None:
    fp32_linear = type(head).__name__ in _FP32_LINEAR_HEADS and type(head).__module__.startswith(
        "transformers.")
    if not isinstance(head, nn.Linear) or not (type(head).forward is nn.Linear.forward
                                               or fp32_linear):
        raise _Decline(f"the output embedding is {type(head).__name__}, not a plain nn.Linear")
    if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
        raise _Decline("the output embedding has forward hooks or a replaced forward")
    if not head.weight.is_floating_point():
        raise _Decline(f"the output embedding's weight is {head.weight.dtype}, not floating point")


def _check_model(transformers, model):
    """The checks that need no forward pass; returns (positional names, head, options)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if not isinstance(model, transformers.PreTrainedModel):
        raise _Decline(f"{type(model).__name__} is not a transformers PreTrainedModel")
    cls = type(model)
    if not cls.__module__.startswith("transformers."):
        raise _Decline(f"{cls.__module__}.{cls.__name__} is not a transformers class (its forward "
                       "may compute the loss its own way)")
    if "_loss_function" in model.__dict__ or cls.loss_function is not (
            transformers.PreTrainedModel.loss_function):
        raise _Decline("the model has a custom loss function")
    if LOSS_MAPPING.get(getattr(model, "loss_type", None) or "ForCausalLM") is not ForCausalLMLoss:
        raise _Decline(f"the model's loss_type {getattr(model, 'loss_type', None)!r} is not "
                       "ForCausalLM")
    params = [p for name, p in _signature(cls.forward).items() if name != "self"]
    if "labels" not in {p.name for p in params}:
        raise _Decline(f"{cls.__name__}.forward takes no labels")
    positional = tuple(p.name for p in params
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    head = model.get_output_embeddings()
    _check_head(head)
    if _HEAD_STATE in head.__dict__:
        raise _Decline("the output embedding is patched for another model already")
    return positional, head, _read_head_options(model)


def _signature(fn):
    return inspect.signature(fn).parameters


def head_options(model) -> dict[str, Any]:
    """The head's transforms as ``linear_cross_entropy`` keywords (``softcap``, ``logit_scale``,
    ``logit_divisor``), read from a transformers causal LM's config — for trainers that compute
    their own loss from the hidden states the model feeds ``model.get_output_embeddings()``.
    Raises ValueError when ``patch``'s static checks would decline. On a model ``patch`` has
    patched, they are the options the patch uses."""
    transformers = _transformers()
    state = model.__dict__.get(_STATE) if isinstance(model, nn.Module) else None
    if state is not None:
        return {key: state.options[key] for key in ("softcap", "logit_scale", "logit_divisor")}
    try:
        options = dict(_check_model(transformers, model)[2])
    except _Decline as exc:
        raise ValueError(f"model: {exc}") from None
    del options["named"]
    return options


# --------------------------------------------------------------------------- the loss


def _linear_cross_entropy(h, weight, target, bias, options, *, reduction, normalizer=None):
    return probact_gpu.linear_cross_entropy(
        h, weight, target, linear_bias=bias, ignore_index=options["ignore_index"],
        reduction=reduction, softcap=options["softcap"], logit_scale=options["logit_scale"],
        logit_divisor=options["logit_divisor"], normalizer=normalizer,
        chunk_size=options["chunk_size"], memory_budget=options["memory_budget"],
        low_memory=options["low_memory"])


def _token_log_probs(h, weight, target, bias, options, *, return_entropy, temperature=1.0):
    try:
        fn = probact_gpu.linear_token_log_probs
    except (AttributeError, ImportError) as exc:
        raise RuntimeError(
            "token log-probs and entropy need probact_gpu.linear_token_log_probs, which this "
            f"installation does not provide ({exc})") from exc
    result = fn(h, weight, target, linear_bias=bias, ignore_index=options["ignore_index"],
                softcap=options["softcap"], logit_scale=options["logit_scale"],
                logit_divisor=options["logit_divisor"], temperature=temperature,
                return_entropy=return_entropy, chunk_size=options["chunk_size"],
                memory_budget=options["memory_budget"])
    if return_entropy:
        return result.logprobs, result.entropy
    return result, None


def _head_operands(h, head):
    """The head's operands as the model's head would multiply them: under autocast both in the
    autocast dtype (what autocast does to an nn.Linear, done before the op, which autocast
    leaves alone); else the hidden states in the weight's dtype (an nn.Linear would have raised
    on a mismatch; the fp32-accumulating heads cast so)."""
    weight, bias = head.weight, head.bias
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    return h, weight, bias


def _head_loss(h, head, target, options, num_items, want_logp, want_entropy):
    """The mean (or ``Σ / num_items``) loss of the flattened hidden states ``h`` (N, H) against
    ``target`` (N,), and the per-token extras asked for."""
    h, weight, bias = _head_operands(h, head)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(h.device)
    extras = {}
    with torch.autocast(h.device.type, enabled=False):
        if want_logp or want_entropy:
            logp, entropy = _token_log_probs(h, weight, target, bias, options,
                                             return_entropy=want_entropy)
            valid = target != options["ignore_index"]
            nll = torch.where(valid, -logp, torch.zeros_like(logp)).sum()
            loss = nll / (valid.sum() if num_items is None else num_items)
            if want_logp:
                extras["token_log_probs"] = logp
            if want_entropy:
                extras["token_entropy"] = entropy
        elif num_items is None:
            loss = _linear_cross_entropy(h, weight, target, bias, options, reduction="mean")
        else:
            loss = _linear_cross_entropy(h, weight, target, bias, options, reduction="sum",
                                         normalizer=num_items)
    # ForCausalLMLoss upcasts the logits and returns an fp32 loss; so do we (a tensor of our
    # own: a forward may add its router loss to it in place).
    return loss.float().clone(), extras


class _Call:
    """One forward run with the substitutions on. ``mode``: "loss" (the fused loss), "hidden"
    (token_log_probs: keep the head's input, no loss), "record" (the probe's reference run: keep
    the head's input and compute the real logits and loss)."""

    def __init__(self, mode, want_logp=False, want_entropy=False):
        self.mode = mode
        self.want_logp = want_logp
        self.want_entropy = want_entropy
        self.hidden = None
        self.placeholder = None
        self.head_calls = 0
        self.loss_calls = 0
        self.logits = None
        self.extras = {}
        self.extras_shape = None


class _Patch:
    """What one patched instance remembers: how to call its own forward, its head, its loss."""

    def __init__(self, prior, positional, head, options, eval_skip_logits, loss_fn):
        self.prior = prior  # an instance-level forward that was there before, else None
        self.positional = positional
        self.head = head
        self.head_forward = type(head).forward
        self.options = options
        self.has_transform = _has_transform(options)
        self.eval_skip_logits = eval_skip_logits
        self.loss_fn = loss_fn  # what model.loss_function was: ForCausalLMLoss
        self.call = None  # the _Call in progress

    def original(self, model, *args, **kwargs):
        if self.prior is not None:
            return self.prior(*args, **kwargs)
        return type(model).forward(model, *args, **kwargs)

    def run(self, model, call, kwargs):
        """The model's own forward with the substitutions of ``call``."""
        if self.call is not None:
            raise RuntimeError("probact_gpu: a patched model's forward called itself")
        self.call = call
        try:
            return self.original(model, **kwargs)
        finally:
            self.call = None


def _head_forward(head, input):
    state = head.__dict__[_HEAD_STATE]
    call = state.call
    if call is None:
        return state.head_forward(head, input)
    call.head_calls += 1
    call.hidden = input
    if call.mode == "record":
        return state.head_forward(head, input)
    # fp32: a forward's `.float()` keeps it, so an untransformed placeholder stays itself
    call.placeholder = input.new_zeros((*input.shape[:-1], 1), dtype=torch.float32)
    return call.placeholder


def _check_logits(state, call, logits, where) -> None:
    """What the forward did between the head and ``where`` is what the substitution allows."""
    if call.head_calls != 1:
        raise FusedLossError(f"the model's forward called its output embedding {call.head_calls} "
                             f"times before {where} (once is what the fused loss reproduces)")
    if not isinstance(logits, torch.Tensor) or logits.shape != call.placeholder.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise FusedLossError(f"the model's forward reshapes, slices or extends the logits before "
                             f"{where} (placeholder {tuple(call.placeholder.shape)}, got {shape})")
    transformed = logits is not call.placeholder
    if transformed and state.has_transform is False:
        raise FusedLossError(f"the model's forward transforms the logits before {where} and the "
                             "config names no transform patch knows")
    if state.has_transform is True and not transformed:
        raise FusedLossError(f"the config names a logit transform ({_transform_text(state)}) that "
                             f"the model's forward does not apply before {where}")


def _transform_text(state) -> str:
    o = state.options
    parts = [f"softcap={o['softcap']}"] if o["softcap"] is not None else []
    parts += [f"{k}={o[k]}" for k in ("logit_scale", "logit_divisor") if o[k] != 1.0]
    return ", ".join(parts)


def _loss_dispatch(model, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs):
    """``model.loss_function`` of a patched model: ForCausalLMLoss, fused during a fused call."""
    state = model.__dict__[_STATE]
    call = state.call
    if call is None or call.mode == "record":
        return state.loss_fn(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                             ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
    call.loss_calls += 1
    if call.mode != "loss" or call.loss_calls > 1:
        raise FusedLossError("the model's forward computes its loss more than once")
    _check_logits(state, call, logits, "its loss")
    call.logits = logits
    head = state.head
    # the forward passes vocab_size from its config, or from the logits' last dim (Inkling:
    # the placeholder's 1 stands for the head's rows)
    if vocab_size != head.weight.shape[0] and not (
            vocab_size == 1 and logits.shape[-1] == 1 and head.weight.shape[0] != 1):
        raise FusedLossError(f"the model's loss reads {vocab_size} classes, its output embedding "
                             f"has {head.weight.shape[0]}")
    hidden = call.hidden
    if shift_labels is None:
        # ForCausalLMLoss: pad with ignore_index, shift so that tokens < n predict n.
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden.device).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.shape[0] != target.numel():
        raise ValueError(f"labels: {target.numel()} shifted labels for {h.shape[0]} positions "
                         f"(hidden states {tuple(hidden.shape)})")
    options = dict(state.options, ignore_index=ignore_index)
    loss, extras = _head_loss(h, head, target, options, num_items_in_batch, call.want_logp,
                              call.want_entropy)
    call.extras = extras
    call.extras_shape = shift_labels.shape
    return loss


def _patched_forward(model, *args, **kwargs):
    state = model.__dict__[_STATE]
    skip = kwargs.pop("skip_logits", None)
    want_logp = bool(kwargs.pop("return_token_log_probs", False))
    want_entropy = bool(kwargs.pop("return_entropy", False))
    if len(args) > len(state.positional):
        raise TypeError(f"forward takes at most {len(state.positional)} positional arguments, "
                        f"got {len(args)}")
    call = dict(zip(state.positional[: len(args)], args, strict=True))
    for name in kwargs:
        if name in call:
            raise TypeError(f"forward got multiple values for argument {name!r}")
    call.update(kwargs)
    has_labels = call.get("labels") is not None
    if skip is None:
        skip = has_labels and (model.training or state.eval_skip_logits or want_logp
                               or want_entropy)
    if not skip:
        if want_logp or want_entropy:
            raise ValueError("return_token_log_probs / return_entropy need the fused path: "
                             "pass labels and do not set skip_logits=False")
        return state.original(model, *args, **kwargs)
    if not has_labels:
        raise ValueError("skip_logits=True needs labels: without them there is no loss to "
                         "compute and the logits are the only output")
    return _fused_forward(model, state, call, want_logp, want_entropy)


def _fused_forward(model, state, kwargs, want_logp, want_entropy):
    call = _Call("loss", want_logp, want_entropy)
    try:
        out = state.run(model, call, kwargs)
    except FusedLossError:
        raise
    except Exception as exc:
        if call.head_calls and not call.loss_calls:  # the placeholder met something else
            raise FusedLossError(
                "the model's forward uses its logits other than through model.loss_function "
                f"({type(exc).__name__}: {exc})") from exc
        raise
    if call.loss_calls != 1:
        raise FusedLossError("the model's forward did not compute its loss with "
                             "model.loss_function")
    return _without_logits(out, call, {k: v.reshape(call.extras_shape)
                                       for k, v in call.extras.items()})


def _without_logits(out, call, extras):
    """The model's output with its logits (the placeholder, or what the forward made of it)
    removed, and the extras added."""
    drop = [t for t in (call.placeholder, call.logits) if t is not None]
    if isinstance(out, tuple):
        return tuple(v for v in out if not any(v is t for t in drop))
    fields = {key: value for key, value in out.items() if key != "logits"}
    result = type(out)(**fields)
    for key, value in extras.items():
        result[key] = value
    return result


# --------------------------------------------------------------------------- the probe


def _probe_ids(model, weight) -> torch.Tensor:
    """Two random sequences of 8 tokens that avoid every token id the config names (image
    placeholders, padding, special tokens): text any model takes without its other inputs."""
    named = set()
    for key, value in _config_items(model.config).items():
        if key.endswith(("_id", "_index", "_ids")):
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if type(v) is int:
                    named.add(v)
    n_ids = min(weight.shape[0], model.get_input_embeddings().weight.shape[0])
    allowed = torch.tensor([i for i in range(min(n_ids, 4096)) if i not in named])
    generator = torch.Generator().manual_seed(0)
    return allowed[torch.randint(len(allowed), (2, 8), generator=generator)].to(weight.device)


def _probe(model, state) -> str | None:
    """Two random sequences through the unpatched and the patched forward, in eval mode without
    gradients (and with the router's auxiliary loss on as well, where the forward takes
    ``output_router_logits``); the reason for declining, or None when the loss and every
    per-token loss agree."""
    head = state.head
    weight = head.weight
    training = {module: module.training for module in model.modules()}
    model.eval()
    params = _signature(type(model).forward)
    base = {"use_cache": False} if "use_cache" in params else {}
    runs = [{}]
    if "output_router_logits" in params:
        runs.append({"output_router_logits": True})
    try:
        ids = _probe_ids(model, weight)
        labels = ids.clone()
        labels[0, 2] = labels[1, 5] = -100
        checks = []
        for flags in runs:
            with torch.no_grad():
                record = _Call("record")
                try:
                    ref = state.run(model, record, dict(input_ids=ids, labels=labels,
                                                        return_dict=True, **base, **flags))
                except Exception:
                    if not flags:
                        raise
                    continue  # the model itself fails with its router loss on: no parity there
                ours = model(input_ids=ids, labels=labels, return_dict=True, skip_logits=True,
                             **base, **flags)
                checks.append((flags, ref, ours, record))
        flags, ref, ours, record = checks[0]
        target = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
        with torch.no_grad():
            h, w, b = _head_operands(record.hidden.reshape(target.numel(), -1), head)
            ours_rows = _linear_cross_entropy(h, w, target, b,
                                              dict(state.options, ignore_index=-100),
                                              reduction="none")
            ref_rows = nn.functional.cross_entropy(
                ref.logits.float().reshape(target.numel(), -1), target, reduction="none")
    except Exception as exc:  # any failure of the probe is a reason to decline
        return f"the parity probe failed: {type(exc).__name__}: {exc}"
    finally:
        for module, mode in training.items():
            module.train(mode)
    atol, rtol = _PROBE_TOLERANCE.get(weight.dtype, _PROBE_TOLERANCE[torch.float32])
    pairs = [("per-token loss", ours_rows.float(), ref_rows)]
    for flags, ref, ours, _ in checks:
        what = "loss" + (" with output_router_logits=True" if flags else "")
        if type(ours) is not type(ref):
            return f"the model returns {type(ref).__name__}, the patch {type(ours).__name__}"
        extra = sorted(k for k in set(ref.keys()) - set(ours.keys()) - {"logits"})
        if extra:
            return f"the model's output has {extra}, which the patched forward does not compute"
        pairs.insert(0, (what, ours.loss.float(), ref.loss.float()))
    for what, got, want in pairs:
        err = (got - want).abs()
        bad = err > atol + rtol * want.abs()
        if bool(bad.any()) or not bool(torch.isfinite(got).all()):
            return (f"the parity probe's {what} differs from the unpatched model's: max abs "
                    f"error {float(err.max()):.3g} (atol {atol:g}, rtol {rtol:g})")
    return None


# --------------------------------------------------------------------------- public API


def _validate(check, eval_skip_logits, low_memory, chunk_size, memory_budget) -> None:
    for name, value in (("check", check), ("eval_skip_logits", eval_skip_logits),
                        ("low_memory", low_memory)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool)
                                      or not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got "
                         f"{memory_budget!r}")


def _install(transformers, model, *, eval_skip_logits=False, chunk_size=None, memory_budget=None,
             low_memory=False) -> _Patch:
    """Put the substitutions in place (raises _Decline from the static checks)."""
    positional, head, options = _check_model(transformers, model)
    options = dict(options, chunk_size=chunk_size, memory_budget=memory_budget,
                   low_memory=low_memory)
    prior = model.__dict__.get("forward")
    state = _Patch(prior, positional, head, options, eval_skip_logits, model.loss_function)
    # A new function per patch, wrapping the class's forward so that inspect.signature (the
    # Trainer's column filter, generate's argument check) still sees the model's own arguments.
    forward = functools.update_wrapper(
        lambda self, *args, **kwargs: _patched_forward(self, *args, **kwargs),
        type(model).forward)
    model.__dict__[_STATE] = state
    model.__dict__["forward"] = types.MethodType(forward, model)
    model.__dict__["_loss_function"] = types.MethodType(_loss_dispatch, model)
    head.__dict__[_HEAD_STATE] = state
    head.__dict__["forward"] = types.MethodType(_head_forward, head)
    return state


def patch(model, *, check: bool = True, eval_skip_logits: bool = False,
          chunk_size: int | None = None, memory_budget: int | None = None,
          low_memory: bool = False) -> bool:
    """Make ``model`` (a transformers causal LM instance, or an image-text-to-text model whose
    forward ends in the same head and loss) compute its training loss with
    ``probact_gpu.linear_cross_entropy``, never forming the logits. Returns True when patched
    (or already patched: the first patch's options stay; ``unpatch`` first to change them);
    False, with a warning saying why, when the model is left exactly as it was (see the module
    docstring for what makes it decline).

    ``check`` runs a parity probe at patch time (two random sequences of 8 tokens, the patched
    against the unpatched loss, in eval mode without gradients); ``check=False`` skips it and
    relies on the static checks and the per-call checks alone. ``eval_skip_logits`` makes the
    fused path also run in ``eval()`` mode when labels are given (loss-only evaluation:
    ``logits`` is then None). ``chunk_size``, ``memory_budget`` and ``low_memory`` go to
    ``linear_cross_entropy``.
    """
    transformers = _transformers()
    _validate(check, eval_skip_logits, low_memory, chunk_size, memory_budget)
    if is_patched(model):
        return True
    try:
        state = _install(transformers, model, eval_skip_logits=eval_skip_logits,
                         chunk_size=chunk_size, memory_budget=memory_budget,
                         low_memory=low_memory)
    except _Decline as exc:
        _warn(model, str(exc))
        return False
    if check:
        reason = _probe(model, state)
        if reason is not None:
            unpatch(model)
            _warn(model, reason)
            return False
    return True


def unpatch(model) -> bool:
    """Undo ``patch``: the instance's forward, loss function and head are again what they were.
    Returns False when ``model`` was not patched."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return False
    if state.prior is None:
        del model.__dict__["forward"]
    else:
        model.__dict__["forward"] = state.prior
    model.__dict__.pop("_loss_function", None)
    state.head.__dict__.pop(_HEAD_STATE, None)
    state.head.__dict__.pop("forward", None)
    return True


def is_patched(model) -> bool:
    """Whether ``patch`` has patched this instance."""
    return _STATE in getattr(model, "__dict__", {})


def _warn(model, reason: str) -> None:
    warnings.warn(f"probact_gpu: {type(model).__name__} left unpatched: {reason}",
                  RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- token log-probs


def token_log_probs(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    temperature: float = 1.0, return_entropy: bool = False,
                    logits_to_keep: int | None = None):
    """The log-probability of each next token of ``input_ids`` (B, T) given its prefix, under
    ``model`` at ``temperature``, without the (B, T, V) logits: ``out[:, j] = log p(input_ids[:,
    j + 1] | input_ids[:, : j + 1])``, shape (B, T − 1) fp32 — or (B, logits_to_keep), the last
    ``logits_to_keep`` of those (the completion of an RL rollout).

    The model's own forward computes the hidden states its head would turn into logits (with the
    substitution ``patch`` uses, labels not needed); ``probact_gpu.linear_token_log_probs`` turns
    them into log-probs with the head's weight, bias and transforms (softcap, logit scale,
    divisor) and ``/ temperature`` last, as ``log_softmax(logits / temperature)`` of the model's
    own logits would. Differentiable (the policy gradient flows into the model's parameters).
    ``return_entropy=True`` returns ``(log_probs, entropy)``, the entropy of each of those
    distributions (differentiable too). Padded positions are computed like any other (mask them
    in the loss).

    Works for any model ``patch`` accepts, patched or not: an unpatched model gets the
    substitution for this call only, after ``patch``'s static checks and its parity probe (run
    once per instance); raises ValueError with ``patch``'s reason where it would decline.
    """
    transformers = _transformers()
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or input_ids.is_floating_point()):
        raise ValueError(f"input_ids must be a (batch, tokens) integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    n_tokens = input_ids.shape[1]
    if logits_to_keep is not None and (isinstance(logits_to_keep, bool)
                                       or not isinstance(logits_to_keep, int)
                                       or not 1 <= logits_to_keep < n_tokens):
        raise ValueError(f"logits_to_keep must be an int in [1, {n_tokens - 1}] (tokens with a "
                         f"prefix) or None, got {logits_to_keep!r}")
    installed = not is_patched(model)
    if installed:
        verdict = model.__dict__.get(_VERDICT)
        try:
            state = _install(transformers, model)
        except _Decline as exc:
            raise ValueError(f"model: {exc}") from None
        try:
            if verdict is None:
                verdict = _probe(model, state) or ""
                model.__dict__[_VERDICT] = verdict
            if verdict:
                raise ValueError(f"model: {verdict}")
            return _token_log_probs_of(model, state, input_ids, attention_mask, float(temperature),
                                       return_entropy, logits_to_keep)
        finally:
            unpatch(model)
    return _token_log_probs_of(model, model.__dict__[_STATE], input_ids, attention_mask,
                               float(temperature), return_entropy, logits_to_keep)


def _token_log_probs_of(model, state, input_ids, attention_mask, temperature, return_entropy,
                        logits_to_keep):
    params = _signature(type(model).forward)
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if "use_cache" in params:
        kwargs["use_cache"] = False
    keep = None if logits_to_keep is None else logits_to_keep + 1
    if keep is not None and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
        keep = None
    call = _Call("hidden")
    out = state.run(model, call, kwargs)
    logits = out["logits"] if not isinstance(out, tuple) else out[0]
    _check_logits(state, call, logits, "returning them")
    hidden = call.hidden
    if keep is not None:
        hidden = hidden[:, -keep:]
    n_out = input_ids.shape[1] - 1 if logits_to_keep is None else logits_to_keep
    if hidden.shape[:2] != (input_ids.shape[0], n_out + 1):
        raise FusedLossError(f"the model's head saw hidden states {tuple(hidden.shape)} for "
                             f"input_ids {tuple(input_ids.shape)}")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = input_ids[:, -n_out:].to(h.device).reshape(-1)
    h, weight, bias = _head_operands(h, state.head)
    options = dict(state.options, ignore_index=-100)
    with torch.autocast(h.device.type, enabled=False):
        logp, entropy = _token_log_probs(h, weight, target, bias, options,
                                         return_entropy=return_entropy, temperature=temperature)
    shape = (input_ids.shape[0], n_out)
    if return_entropy:
        return logp.reshape(shape), entropy.reshape(shape)
    return logp.reshape(shape)
