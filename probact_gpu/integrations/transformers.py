"""Hugging Face transformers: train a causal LM without ever holding its (tokens × vocab) logits.

    from probact_gpu.integrations.transformers import patch
    patch(model)          # True: patched; False: left untouched, with a warning saying why

``patch`` wraps one model *instance*'s ``forward`` (no class copies, no per-family forwards).
When labels are given in training, the wrapper runs the model's own backbone
(``model.base_model``), takes the head from ``model.get_output_embeddings()`` (tied embeddings
included) and computes the causal-LM loss with ``probact_gpu.linear_cross_entropy``: per chunk
of tokens the logits are formed, reduced and differentiated inside the fused op, so the
(tokens × V) tensor never exists. The output is the model's own output class with the same
``loss`` as the model's ``ForCausalLMLoss`` and ``logits=None``.

What it reproduces from the model's forward and ``transformers.loss.loss_utils.ForCausalLMLoss``:

- label shifting (``labels`` padded with ``ignore_index`` and shifted left by one), or the
  pre-shifted ``shift_labels``; ``ignore_index`` (default -100);
- ``num_items_in_batch``: the summed loss divided by it (what ``fixed_cross_entropy`` does for
  gradient accumulation), else the mean over the tokens that are not ignored;
- ``logits_to_keep`` (an int: the last positions; a tensor: those positions; a boolean 2-D mask);
- the head's transforms read from the config and applied inside the kernels in fp32:
  ``final_logit_softcapping`` (Gemma 2/3: ``softcap``), ``logit_scale`` (Cohere: a multiplier),
  ``logits_scaling`` (Granite: a divisor), and the head's own bias;
- the output's other fields (cache, hidden_states, attentions) from the backbone.

It declines (returns False, warns, changes nothing) when it cannot be sure to compute the same
loss: a head that is not a plain ``nn.Linear``, a custom loss function, a forward that is not
transformers' own, a forward argument it does not know how to route, a config key that may
change the logits or add to the loss (mixture-of-experts router losses, output multipliers) that
it does not understand, a composite (multimodal) model, and — unless ``check=False`` — a
parity probe at patch time (two random sequences through the patched and the unpatched forward)
whose loss or per-token losses differ beyond the dtype's tolerance.

Without labels (generation, evaluation that needs logits) the model's own forward runs
unchanged. In ``eval()`` mode with labels the own forward runs too (metrics may need logits)
unless ``patch(model, eval_skip_logits=True)`` or a call's ``skip_logits=True`` asks for the
fused loss only.

``return_token_log_probs=True`` / ``return_entropy=True`` on a call (with labels) add
``token_log_probs`` / ``token_entropy`` (fp32, the shifted labels' shape, 0 where ignored) to the
output, computed by ``probact_gpu.linear_token_log_probs`` without logits; the loss is then
``-Σ log p / n`` from those log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
import warnings
from typing import Any

import torch
from torch import nn

import probact_gpu

__all__ = ["head_options", "is_patched", "patch", "unpatch"]

_STATE = "_probact_patch"

# The named parameters of a causal LM's forward that patch knows how to route: labels and
# logits_to_keep stay here, every other one goes to the backbone, as the model's forward does.
_KNOWN_PARAMS = frozenset({
    "input_ids", "attention_mask", "position_ids", "past_key_values", "cache", "inputs_embeds",
    "labels", "use_cache", "logits_to_keep", "cache_position", "output_attentions",
    "output_hidden_states", "return_dict",
})
# Arguments never passed on to the backbone, even where it names them: their loss is the model's.
_OWN_LOSS_PARAM = re.compile(r"router|aux")

# Config keys whose name says they may act on the logits or the loss. Those patch reads itself
# or knows act inside the backbone are listed; any other one with a value that is not None or
# False makes patch decline.
_LOGIT_KEY = re.compile(
    r"logit|lm_head|output_mult|width_mult|(^|_)mup(_|$)|dim_model_base|router|aux_loss")
_READ_KEYS = frozenset({"final_logit_softcapping", "logit_scale", "logits_scaling"})
_BACKBONE_KEYS = frozenset({"attn_logit_softcapping"})
# ``logits_scaling`` divides the logits in the Granite family only (another family multiplies
# by a key of that name, a third divides the hidden states): read it for these model types.
_DIVISOR_MODEL_TYPES = ("granite",)

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
    """Every key of the config, nested sub-configs flattened (their keys as they are named)."""
    items: dict[str, Any] = {}

    def walk(d):
        for key, value in d.items():
            if not isinstance(key, str):  # id2label and the like: no option names
                continue
            if isinstance(value, dict):
                walk(value)
            else:
                items[key] = value

    walk(config.to_dict())
    return items


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Decline(f"config.{name} = {value!r} is not a number")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise _Decline(f"config.{name} = {value!r} is not a positive finite number")
    return value


def _read_head_options(model) -> dict[str, Any]:
    config = model.config
    items = _config_items(config)
    unknown = sorted(key for key, value in items.items()
                     if _LOGIT_KEY.search(key) and key not in _READ_KEYS
                     and key not in _BACKBONE_KEYS and value is not None and value is not False)
    if unknown:
        shown = ", ".join(f"{key}={items[key]!r}" for key in unknown)
        raise _Decline(f"the config has keys that may change the logits or the loss and that "
                       f"patch does not understand: {shown}")
    options: dict[str, Any] = {"softcap": None, "logit_scale": 1.0, "logit_divisor": 1.0}
    if items.get("final_logit_softcapping") is not None:
        options["softcap"] = _number("final_logit_softcapping", items["final_logit_softcapping"])
    if items.get("logit_scale") is not None:
        options["logit_scale"] = _number("logit_scale", items["logit_scale"])
        own = getattr(model, "logit_scale", options["logit_scale"])
        if not isinstance(own, (int, float)) or float(own) != options["logit_scale"]:
            raise _Decline(f"model.logit_scale = {own!r} differs from config.logit_scale = "
                           f"{options['logit_scale']!r}")
    if items.get("logits_scaling") is not None:
        model_type = str(getattr(config, "model_type", ""))
        if not model_type.startswith(_DIVISOR_MODEL_TYPES):
            raise _Decline(f"config.logits_scaling is a logit divisor only in the "
                           f"{'/'.join(_DIVISOR_MODEL_TYPES)} family; model_type "
                           f"{model_type!r} may use it otherwise")
        options["logit_divisor"] = _number("logits_scaling", items["logits_scaling"])
    return options


def _check_head(model, head) -> None:
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise _Decline(f"the output embedding is {type(head).__name__}, not a plain nn.Linear")
    if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
        raise _Decline("the output embedding has forward hooks or a replaced forward")
    if not head.weight.is_floating_point():
        raise _Decline(f"the output embedding's weight is {head.weight.dtype}, not floating point")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and head.weight.shape[0] != vocab:
        raise _Decline(f"the output embedding has {head.weight.shape[0]} rows but "
                       f"config.vocab_size is {vocab}")


def _output_class(transformers, cls):
    annotation = inspect.signature(cls.forward).return_annotation
    # `tuple | CausalLMOutputWithPast` in some forwards: the ModelOutput member is the output
    members = typing.get_args(annotation) or (annotation,)
    outputs = [m for m in members if isinstance(m, type)
               and issubclass(m, transformers.utils.ModelOutput)
               and {"loss", "logits"} <= {f.name for f in dataclasses.fields(m)}]
    if len(outputs) != 1:
        raise _Decline(f"{cls.__name__}.forward does not declare a ModelOutput with loss and "
                       f"logits (it declares {annotation!r})")
    return outputs[0]


def _check_model(transformers, model):
    """The checks that need no forward pass; returns (output class, positional names, options)."""
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
    backbone = model.base_model
    if backbone is model:
        raise _Decline("the model has no separate backbone (model.base_model is the model)")
    # Beyond the common arguments, one the backbone's forward names too is passed on as the
    # model's forward does (GPT-2's token_type_ids); router arguments never are (their loss
    # is the model's own).
    backbone_named = {name for name, p in _signature(type(backbone).forward).items()
                      if p.kind is not p.VAR_KEYWORD and not _OWN_LOSS_PARAM.search(name)}
    unknown = {p.name for p in params if p.kind is not p.VAR_KEYWORD} - _KNOWN_PARAMS
    if unknown - backbone_named:
        raise _Decline(f"{cls.__name__}.forward takes {sorted(unknown - backbone_named)}, which "
                       "patch does not know how to route")
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError) as exc:
        raise _Decline(f"model.get_decoder() failed: {exc}") from exc
    if decoder is not backbone:
        raise _Decline("model.get_decoder() is not model.base_model: a composite model whose "
                       "forward does more than run one decoder")
    _check_head(model, model.get_output_embeddings())
    return _output_class(transformers, cls), positional, _read_head_options(model)


def _signature(fn):
    return inspect.signature(fn).parameters


def head_options(model) -> dict[str, Any]:
    """The head's transforms as ``linear_cross_entropy`` keywords (``softcap``, ``logit_scale``,
    ``logit_divisor``), read from a transformers causal LM's config — for trainers that compute
    their own loss from ``model.base_model``'s hidden states and
    ``model.get_output_embeddings()``. Raises ValueError when ``patch`` would decline."""
    transformers = _transformers()
    try:
        return dict(_check_model(transformers, model)[2])
    except _Decline as exc:
        raise ValueError(f"model: {exc}") from None


# --------------------------------------------------------------------------- the loss


def _slice_hidden(hidden: torch.Tensor, logits_to_keep, slicer) -> torch.Tensor:
    """The positions the model forms logits for: transformers' own ``slice_logits_to_keep``
    where the installed version has it (2-D positions, boolean masks), else what the forwards
    of earlier 5.x do inline."""
    if slicer is not None:
        return slicer(hidden, logits_to_keep)
    if isinstance(logits_to_keep, int):
        return hidden[:, slice(-logits_to_keep, None), :]
    return hidden[:, logits_to_keep, :]


def _linear_cross_entropy(h, weight, target, bias, options, *, reduction, normalizer=None):
    return probact_gpu.linear_cross_entropy(
        h, weight, target, linear_bias=bias, ignore_index=options["ignore_index"],
        reduction=reduction, softcap=options["softcap"], logit_scale=options["logit_scale"],
        logit_divisor=options["logit_divisor"], normalizer=normalizer,
        chunk_size=options["chunk_size"], memory_budget=options["memory_budget"],
        low_memory=options["low_memory"])


def _token_log_probs(h, weight, target, bias, options, *, return_entropy):
    try:
        fn = probact_gpu.linear_token_log_probs
    except (AttributeError, ImportError) as exc:
        raise RuntimeError(
            "return_token_log_probs / return_entropy need probact_gpu.linear_token_log_probs, "
            f"which this installation does not provide ({exc})") from exc
    result = fn(h, weight, target, linear_bias=bias, ignore_index=options["ignore_index"],
                softcap=options["softcap"], logit_scale=options["logit_scale"],
                logit_divisor=options["logit_divisor"], return_entropy=return_entropy,
                chunk_size=options["chunk_size"], memory_budget=options["memory_budget"])
    if return_entropy:
        return result.logprobs, result.entropy
    return result, None


def _head_loss(h, head, target, options, num_items, want_logp, want_entropy):
    """The mean (or ``Σ / num_items``) loss of the flattened hidden states ``h`` (N, H) against
    ``target`` (N,), and the per-token extras asked for."""
    weight, bias = head.weight, head.bias
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast does to the head's nn.Linear, done before the op (which autocast leaves
        # alone): one cast of the head to the autocast dtype, differentiable.
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(h.device)
    extras = {}
    with torch.autocast(device_type, enabled=False):
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
    # ForCausalLMLoss upcasts the logits and returns an fp32 loss; so do we.
    return loss.float(), extras


class _Patch:
    """What one patched instance remembers: how to call its own forward and the head's options."""

    def __init__(self, prior, positional, output_cls, options, eval_skip_logits, slicer):
        self.prior = prior  # an instance-level forward that was there before, else None
        self.slicer = slicer
        self.positional = positional
        self.output_cls = output_cls
        self.output_fields = frozenset(f.name for f in dataclasses.fields(output_cls))
        self.options = options
        self.eval_skip_logits = eval_skip_logits

    def original(self, model, *args, **kwargs):
        if self.prior is not None:
            return self.prior(*args, **kwargs)
        return type(model).forward(model, *args, **kwargs)


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


def _fused_forward(model, state, call, want_logp, want_entropy):
    labels = call.pop("labels")
    shift_labels = call.pop("shift_labels", None)
    num_items = call.pop("num_items_in_batch", None)
    ignore_index = call.pop("ignore_index", -100)
    logits_to_keep = call.pop("logits_to_keep", 0)
    return_dict = call.pop("return_dict", None)
    outputs = model.base_model(**call, return_dict=True)
    hidden = _slice_hidden(outputs[0], logits_to_keep, state.slicer)
    if shift_labels is None:
        # ForCausalLMLoss: pad with ignore_index, shift so that tokens < n predict n.
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden.device).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.shape[0] != target.numel():
        raise ValueError(f"labels: {target.numel()} shifted labels for {h.shape[0]} positions "
                         f"(hidden states {tuple(hidden.shape)}, logits_to_keep="
                         f"{logits_to_keep!r})")
    options = dict(state.options, ignore_index=ignore_index)
    loss, extras = _head_loss(h, model.get_output_embeddings(), target, options, num_items,
                              want_logp, want_entropy)
    fields = {key: value for key, value in outputs.items()
              if key in state.output_fields and key not in ("loss", "logits")}
    result = state.output_cls(loss=loss, logits=None, **fields)
    for key, value in extras.items():
        result[key] = value.reshape(shift_labels.shape)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


# --------------------------------------------------------------------------- the probe


def _probe(model, state) -> str | None:
    """Two random sequences through the unpatched and the patched forward, in eval mode without
    gradients; the reason for declining, or None when the loss and every per-token loss agree."""
    head = model.get_output_embeddings()
    weight = head.weight
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        n_ids = min(weight.shape[0], model.get_input_embeddings().weight.shape[0])
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(n_ids, (2, 8), generator=generator).to(weight.device)
        labels = ids.clone()
        labels[0, 2] = labels[1, 5] = -100
        with torch.no_grad():
            ref = state.original(model, input_ids=ids, labels=labels, use_cache=False,
                                 return_dict=True)
            ours = model(input_ids=ids, labels=labels, use_cache=False, return_dict=True,
                         skip_logits=True)
            hidden = model.base_model(input_ids=ids, use_cache=False, return_dict=True)[0]
            target = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
            options = dict(state.options, ignore_index=-100)
            ours_rows = _linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                              target, head.bias, options, reduction="none")
            ref_rows = nn.functional.cross_entropy(
                ref.logits.float().reshape(target.numel(), -1), target, reduction="none")
    except Exception as exc:  # any failure of the probe is a reason to decline
        return f"the parity probe failed: {type(exc).__name__}: {exc}"
    finally:
        for module, mode in training.items():
            module.train(mode)
    if type(ours) is not type(ref):
        return f"the model returns {type(ref).__name__}, the patch {type(ours).__name__}"
    extra = sorted(set(ref.keys()) - set(ours.keys()) - {"logits"})
    if extra:
        return f"the model's output has {extra}, which the patched forward does not compute"
    atol, rtol = _PROBE_TOLERANCE.get(weight.dtype, _PROBE_TOLERANCE[torch.float32])
    pairs = (("loss", ours.loss.float(), ref.loss.float()),
             ("per-token loss", ours_rows.float(), ref_rows))
    for what, got, want in pairs:
        err = (got - want).abs()
        bad = err > atol + rtol * want.abs()
        if bool(bad.any()) or not bool(torch.isfinite(got).all()):
            return (f"the parity probe's {what} differs from the unpatched model's: max abs "
                    f"error {float(err.max()):.3g} (atol {atol:g}, rtol {rtol:g})")
    return None


# --------------------------------------------------------------------------- public API


def patch(model, *, check: bool = True, eval_skip_logits: bool = False,
          chunk_size: int | None = None, memory_budget: int | None = None,
          low_memory: bool = False) -> bool:
    """Make ``model`` (a transformers causal LM instance) compute its training loss with
    ``probact_gpu.linear_cross_entropy``, never forming the logits. Returns True when patched
    (or already patched: the first patch's options stay; ``unpatch`` first to change them);
    False, with a warning saying why, when the model is left exactly as it was (see the module
    docstring for what makes it decline).

    ``check`` runs a parity probe at patch time (two random sequences of 8 tokens, the patched
    against the unpatched loss, in eval mode without gradients); ``check=False`` skips it and
    relies on the static checks alone. ``eval_skip_logits`` makes the fused path also run in
    ``eval()`` mode when labels are given (loss-only evaluation: ``logits`` is then None).
    ``chunk_size``, ``memory_budget`` and ``low_memory`` go to ``linear_cross_entropy``.
    """
    transformers = _transformers()
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
    if is_patched(model):
        return True
    try:
        output_cls, positional, head = _check_model(transformers, model)
    except _Decline as exc:
        _warn(model, str(exc))
        return False
    options = dict(head, chunk_size=chunk_size, memory_budget=memory_budget,
                   low_memory=low_memory)
    prior = model.__dict__.get("forward")
    slicer = getattr(transformers.modeling_utils, "slice_logits_to_keep", None)
    state = _Patch(prior, positional, output_cls, options, eval_skip_logits, slicer)
    # A new function per patch, wrapping the class's forward so that inspect.signature (the
    # Trainer's column filter, generate's argument check) still sees the model's own arguments.
    forward = functools.update_wrapper(
        lambda self, *args, **kwargs: _patched_forward(self, *args, **kwargs),
        type(model).forward)
    model.__dict__[_STATE] = state
    model.__dict__["forward"] = types.MethodType(forward, model)
    if check:
        reason = _probe(model, state)
        if reason is not None:
            unpatch(model)
            _warn(model, reason)
            return False
    return True


def unpatch(model) -> bool:
    """Undo ``patch``: the instance's forward is again what it was. Returns False when ``model``
    was not patched."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return False
    if state.prior is None:
        del model.__dict__["forward"]
    else:
        model.__dict__["forward"] = state.prior
    return True


def is_patched(model) -> bool:
    """Whether ``patch`` has patched this instance."""
    return _STATE in getattr(model, "__dict__", {})


def _warn(model, reason: str) -> None:
    warnings.warn(f"probact_gpu: {type(model).__name__} left unpatched: {reason}",
                  RuntimeWarning, stacklevel=3)
