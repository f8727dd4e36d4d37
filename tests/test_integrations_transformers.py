"""probact_gpu.integrations.transformers.patch against the unpatched model, on tiny random models
of each family (hidden 64, vocab 1000, 2 layers; nothing downloaded). Each family's head is
scaled so its logits reach tens: a transform read wrongly (softcap 30, a logit scale, a
divisor) moves the loss by far more than the tolerances."""

import copy
import importlib
import sys
import types
import warnings

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree

try:
    import transformers
except ImportError:  # the integration's own import must still work: see the last test
    transformers = None

from probact_gpu.integrations import transformers as hf

needs_transformers = pytest.mark.skipif(transformers is None,
                                        reason="transformers is not installed")

VOCAB = 1000  # the smallest of the 1000-5000 range: the interpreter's time grows with V
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
# family: (config class, model class, config overrides, head scale, training steps)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, 20.0, 20),  # the 20-step curve (slow)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, 20.0, 2),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, 20.0, 2),
    # softcap 30 with logits of tens: tanh is far from linear there
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "final_logit_softcapping": 30.0}, 20.0, 2),
    # tied embeddings and a multiplier: the default 0.0625 on logits of ~50
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}, 300.0, 2),
    # a divisor
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}, 40.0, 2),
    # token_type_ids & co. routed to the backbone by name; a union return annotation
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, 20.0, 1),
}
# (atol, rtol) against the unpatched model: both sides compute in the same dtype; the fused op
# forms the logits in chunks and transforms them in fp32, the model in the dtype.
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def make_model(family, device, dtype=torch.float32, seed=0, **overrides):
    config_name, model_name, extra, scale, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.to(device=device, dtype=dtype)


def make_batch(device, batch=2, seq=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (batch, seq), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    labels[1, :2] = -100
    return {k: v.to(device) for k, v in
            dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def patched_pair(family, device, dtype=torch.float32, **patch_kwargs):
    ref = make_model(family, device, dtype)
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a decline fails the test
        assert hf.patch(model, **patch_kwargs)
    return model, ref


def assert_close(got, want, dtype=torch.float32, what=""):
    atol, rtol = TOL[dtype]
    got, want = got.detach().float(), want.detach().float()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bad.any(), (f"{what}: max abs error {err.max().item():.3g}, first bad index "
                           f"{tuple(bad.nonzero()[0].tolist())}")


def assert_same_grads(model, ref, dtype=torch.float32):
    named = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = named[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            # gradients of every size: compare relative to the tensor's own scale
            scale = q.grad.abs().max().clamp_min(1e-30)
            assert_close(p.grad / scale, q.grad / scale, dtype, f"grad of {name}")


# --------------------------------------------------------------------------- parity


@needs_transformers
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "llama" else f
                                    for f in sorted(FAMILIES)])
def test_transformers_patch_training_matches_unpatched(family, device):
    """Loss, the output's fields and every parameter's gradient at the first step, then the loss
    curve of a few AdamW steps (20 on llama)."""
    model, ref = patched_pair(family, device)
    steps = FAMILIES[family][4]
    batch = make_batch(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    model.train()
    ref.train()
    for step in range(steps):
        out, want = model(**batch), ref(**batch)
        if step == 0:
            assert type(out) is type(want)
            assert out.logits is None and want.logits is not None
            assert set(out.keys()) == set(want.keys()) - {"logits"}
            assert out.loss.dtype == want.loss.dtype == torch.float32
        assert_close(out.loss, want.loss, what=f"loss at step {step}")
        out.loss.backward()
        want.loss.backward()
        if step == 0:
            assert_same_grads(model, ref)
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()


class _OutputShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """The shape of every tensor an op returns, by op (a custom op counts as one op: what it
    allocates inside is its own business, bounded by its chunking)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@needs_transformers
def test_transformers_patch_forms_no_logits(device):
    """Forward and backward of a training step: no op outside the fused one returns a tensor
    with a vocabulary dim and a token dim (the unpatched model's logits and their gradient)."""
    model, ref = patched_pair("llama", device)
    batch = make_batch(device)
    n_tokens, seq = batch["input_ids"].numel(), batch["input_ids"].shape[1]

    def logits_like(shape):
        return VOCAB in shape and (n_tokens in shape or seq in shape)

    found = {}
    for name, m in (("patched", model), ("unpatched", ref)):
        with _OutputShapes() as shapes:
            m(**batch).loss.backward()
        found[name] = [(f, shape) for f, shape in shapes.seen if logits_like(shape)]
    assert found["unpatched"], "the check must see the unpatched model's logits"
    assert not found["patched"], found["patched"][:5]


@needs_transformers
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "cohere", "granite"])
def test_transformers_patch_bf16_matches_unpatched(family, device):
    """bf16 weights, the tolerance from the dtype (Gemma 2: the softcap in fp32 in the kernel,
    in bf16 steps in the model; Cohere and Granite: a multiplier and a divisor)."""
    model, ref = patched_pair(family, device, torch.bfloat16)
    batch = make_batch(device)
    out, want = model(**batch), ref(**batch)
    assert_close(out.loss, want.loss, torch.bfloat16, "loss")
    out.loss.backward()
    want.loss.backward()
    assert_same_grads(model, ref, torch.bfloat16)


@needs_transformers
def test_transformers_patch_num_items_in_batch_gradient_accumulation(device):
    """Two micro-batches, each loss Σ/num_items over the whole accumulated batch (the Trainer's
    count of labels that are not ignored after the shift), as a tensor and as an int."""
    model, ref = patched_pair("llama", device)
    batches = [make_batch(device, seed=1), make_batch(device, seq=10, seed=2)]
    n_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches)
    for num_items in (torch.tensor(n_items, device=device), n_items):
        for m in (model, ref):
            m.zero_grad()
            for b in batches:
                m(**b, num_items_in_batch=num_items).loss.backward()
        losses = [model(**b, num_items_in_batch=num_items).loss for b in batches]
        wants = [ref(**b, num_items_in_batch=num_items).loss for b in batches]
        for got, want in zip(losses, wants, strict=True):
            assert_close(got, want, what="micro-batch loss")
        assert_same_grads(model, ref)


@needs_transformers
def test_transformers_patch_head_bias_and_op_options(device):
    """An output embedding with a bias: it goes into the kernel as linear_bias; chunk_size
    reaches linear_cross_entropy."""
    ref = make_model("llama", device)
    with torch.no_grad():
        head = torch.nn.Linear(64, VOCAB, bias=True).to(device)
        head.weight.copy_(ref.lm_head.weight)
        head.bias.normal_(0, 2.0)
    ref.lm_head = head
    model = copy.deepcopy(ref)
    # and several token chunks (linear_cross_entropy's options reach it)
    assert hf.patch(model, chunk_size=7)
    batch = make_batch(device)
    out, want = model(**batch), ref(**batch)
    assert_close(out.loss, want.loss, what="loss")
    out.loss.backward()
    want.loss.backward()
    assert model.lm_head.bias.grad is not None
    assert_same_grads(model, ref)


@needs_transformers
def test_transformers_patch_shift_labels_and_logits_to_keep(device):
    """Pre-shifted shift_labels; logits_to_keep as an int (the last positions), 1-D positions,
    2-D per-row positions and a boolean mask (packed rows), with labels of the kept positions."""
    model, ref = patched_pair("qwen3", device)
    batch = make_batch(device)
    labels = batch.pop("labels")
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    shifted[0, 5] = -100
    positions = torch.tensor([1, 4, 6, 10], device=device)
    rows = torch.tensor([[0, 3, 4], [2, 8, 11]], device=device)
    cases = [dict(labels=labels, shift_labels=shifted),
             dict(labels=labels[:, -5:], logits_to_keep=5),
             dict(labels=labels[:, positions], logits_to_keep=positions)]
    if hasattr(transformers.modeling_utils, "slice_logits_to_keep"):  # 2-D: newer 5.x only
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[0, 4:] = keep[1, 7:] = True
        cases += [dict(labels=labels.gather(1, rows), logits_to_keep=rows),
                  dict(labels=labels[keep], shift_labels=labels[keep], logits_to_keep=keep)]
    for kwargs in cases:
        assert_close(model(**batch, **kwargs).loss, ref(**batch, **kwargs).loss,
                     what=str(sorted(kwargs)))
    with pytest.raises(ValueError, match="24 shifted labels for 10 positions"):
        model(**batch, labels=labels, logits_to_keep=5)


@needs_transformers
def test_transformers_patch_without_labels_returns_the_models_logits(device):
    """labels=None (generation, evaluation that needs logits): the model's own forward, the same
    logits and cache; eval() with labels too, unless the loss alone is asked for."""
    model, ref = patched_pair("gemma2", device)
    batch = make_batch(device)
    labels = batch.pop("labels")
    for mode in (True, False):
        model.train(mode)
        ref.train(mode)
        out, want = model(**batch), ref(**batch)
        assert out.loss is None and torch.equal(out.logits, want.logits)
    # eval with labels: logits for metrics, and the same loss
    out, want = model(**batch, labels=labels), ref(**batch, labels=labels)
    assert torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)
    # loss-only evaluation: per call, or for every call
    out = model(**batch, labels=labels, skip_logits=True)
    assert out.logits is None
    assert_close(out.loss, want.loss, what="skip_logits=True")
    model.train()
    out = model(**batch, labels=labels, skip_logits=False)
    assert out.logits is not None
    model.eval()
    quiet = copy.deepcopy(ref)
    assert hf.patch(quiet, eval_skip_logits=True)
    out = quiet(**batch, labels=labels)
    assert out.logits is None
    assert_close(out.loss, want.loss, what="eval_skip_logits")
    with pytest.raises(ValueError, match="needs labels"):
        model(**batch, skip_logits=True)
    # positional arguments and return_dict=False (the loss comes first, as the model's tuple)
    model.train()
    ref.train()
    got = model(batch["input_ids"], batch["attention_mask"], labels=labels, return_dict=False)
    want = ref(batch["input_ids"], batch["attention_mask"], labels=labels, return_dict=False)
    assert isinstance(got, tuple)
    assert_close(got[0], want[0], what="tuple loss")
    with pytest.raises(TypeError, match="multiple values"):
        model(batch["input_ids"], input_ids=batch["input_ids"], labels=labels)
    with pytest.raises(TypeError, match="positional arguments"):
        model(*[None] * 20)


@needs_transformers
def test_transformers_patch_token_log_probs_and_entropy(device):
    """return_token_log_probs / return_entropy: fp32 per-token values of the shifted labels
    (0 where ignored), equal to the unpatched logits' log-softmax and entropy; the loss follows."""
    model, ref = patched_pair("gemma2", device)
    batch = make_batch(device)
    out = model(**batch, return_token_log_probs=True, return_entropy=True)
    want = ref(**batch)
    target = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    valid = target != -100
    logp_all = torch.log_softmax(want.logits.float(), -1)
    logp = logp_all.gather(-1, target.clamp_min(0)[..., None])[..., 0] * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    assert out.token_log_probs.dtype == torch.float32
    assert out.token_log_probs.shape == target.shape == out.token_entropy.shape
    assert_close(out.token_log_probs * valid, logp, what="log-probs")
    assert_close(out.token_entropy * valid, entropy, what="entropy")
    assert_close(out.loss, want.loss, what="loss")
    out.loss.backward()
    want.loss.backward()
    assert_same_grads(model, ref)
    alone = model(**batch, return_token_log_probs=True)
    assert "token_entropy" not in alone
    assert torch.equal(alone.token_log_probs, out.token_log_probs)
    with pytest.raises(ValueError, match="fused path"):
        model(**batch, return_token_log_probs=True, skip_logits=False)


@needs_transformers
def test_transformers_patch_token_log_probs_need_the_function(device, monkeypatch):
    model, _ = patched_pair("llama", device)
    monkeypatch.setattr(hf, "probact_gpu", types.SimpleNamespace())  # an install without it
    with pytest.raises(RuntimeError, match="linear_token_log_probs"):
        model(**make_batch(device), return_entropy=True)


@needs_transformers
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_transformers_token_log_probs_equal_the_models_log_softmax(family, device):
    """token_log_probs(model, input_ids) against the model's own logits: log_softmax(logits / T)
    of each next token (Gemma 2: through its softcap), with left padding and a temperature, for
    every position and for the last logits_to_keep; the entropy; the gradient of an RL-style
    objective into every parameter; on an unpatched model (the substitution for the call only)
    and a patched one."""
    model, ref = patched_pair(family, device)
    plain = make_model(family, device)
    batch = make_batch(device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    temperature = 0.7
    for m in (model, ref, plain):
        m.train()
    want_logits = ref(input_ids=ids, attention_mask=mask).logits.float() / temperature
    want_all = torch.log_softmax(want_logits[:, :-1], -1)
    want = want_all.gather(-1, ids[:, 1:, None])[..., 0]
    want_entropy = -(want_all.exp() * want_all).sum(-1)
    for m in (model, plain):
        logp, entropy = hf.token_log_probs(m, ids, attention_mask=mask, temperature=temperature,
                                           return_entropy=True)
        assert logp.shape == entropy.shape == (2, ids.shape[1] - 1)
        assert logp.dtype == torch.float32
        assert_close(logp, want, what="log-probs")
        assert_close(entropy, want_entropy, what="entropy")
    assert not hf.is_patched(plain)  # the substitution was for the call only
    last = hf.token_log_probs(plain, ids, attention_mask=mask, temperature=temperature,
                              logits_to_keep=4)
    assert last.shape == (2, 4)
    assert_close(last, want[:, -4:], what="logits_to_keep=4")
    # a GRPO-like objective: the gradient reaches every parameter as through the logits
    valid = mask[:, 1:].bool()
    advantages = torch.tensor([[1.0], [-0.5]], device=device)
    for m, logp in ((model, hf.token_log_probs(model, ids, attention_mask=mask,
                                               temperature=temperature)),
                    (ref, want)):
        m.zero_grad()
        (-(logp * advantages * valid).sum() / valid.sum()).backward()
    assert_same_grads(model, ref)


@needs_transformers
def test_transformers_token_log_probs_declines_as_patch_does(device):
    with pytest.raises(ValueError, match="model: .*lm_head_multiplier"):
        hf.token_log_probs(make_model("llama", device, lm_head_multiplier=2.0),
                           make_batch(device)["input_ids"])
    model = make_model("llama", device, final_logit_softcapping=5.0)  # the probe's verdict
    for _ in range(2):  # probed once, the reason kept for the instance
        with pytest.raises(ValueError, match="does not apply"):
            hf.token_log_probs(model, make_batch(device)["input_ids"])
    assert not hf.is_patched(model)
    ids = make_batch(device)["input_ids"]
    for kwargs, match in ((dict(temperature=0.0), "temperature"),
                          (dict(logits_to_keep=ids.shape[1]), "logits_to_keep"),
                          (dict(logits_to_keep=True), "logits_to_keep")):
        with pytest.raises(ValueError, match=match):
            hf.token_log_probs(model, ids, **kwargs)
    with pytest.raises(ValueError, match="input_ids"):
        hf.token_log_probs(model, ids.float())


# --------------------------------------------------------------------------- declining


def _snapshot(model):
    """Every module's attributes (the model's and its head's included), the weights, modes."""
    attributes = {(name, key): value for name, m in model.named_modules()
                  for key, value in m.__dict__.items()}
    return (attributes, {k: v.clone() for k, v in model.state_dict().items()},
            {m: m.training for m in model.modules()})


def assert_declines(model, match, **patch_kwargs):
    before = _snapshot(model)
    with pytest.warns(RuntimeWarning, match=match):
        assert hf.patch(model, **patch_kwargs) is False
    after = _snapshot(model)
    assert not hf.is_patched(model)
    assert after[0].keys() == before[0].keys()
    assert all(after[0][k] is before[0][k] for k in before[0])
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert after[2] == before[2]


class _ScaledHead(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return 2 * self.linear(x)


@needs_transformers
def test_transformers_patch_declines_and_leaves_the_model_untouched(device):
    # a head that is not a plain nn.Linear
    model = make_model("llama", device)
    model.lm_head = _ScaledHead(model.lm_head)
    assert_declines(model, "not a plain nn.Linear")
    # a custom loss function
    model = make_model("llama", device)
    model.loss_function = lambda *args, **kwargs: torch.zeros(())
    assert_declines(model, "custom loss")
    # config keys that may change the logits or the loss, and are not understood
    assert_declines(make_model("llama", device, lm_head_multiplier=2.0), "lm_head_multiplier")
    # a key read only where its meaning is known: logits_scaling outside the Granite family
    assert_declines(make_model("llama", device, logits_scaling=4.0), "logits_scaling")
    assert_declines(make_model("gemma2", device, final_logit_softcapping=-1.0), "positive")
    model = make_model("gemma2", device)
    object.__setattr__(model.config, "final_logit_softcapping", "30")  # past its validator
    assert_declines(model, "not a number")
    model = make_model("cohere", device)
    model.logit_scale = 0.5
    assert_declines(model, "differs from config.logit_scale")
    # the head: hooks, an integer weight, rows that are not the vocabulary
    model = make_model("llama", device)
    model.lm_head.register_forward_hook(lambda *args: None)
    assert_declines(model, "hooks")
    model = make_model("llama", device)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.to(torch.int8),
                                              requires_grad=False)
    assert_declines(model, "not floating point")
    model = make_model("llama", device)
    model.config.vocab_size = VOCAB + 1
    assert_declines(model, "1001")  # the unpatched model fails on it too
    model = make_model("llama", device)
    model.loss_type = "ForMaskedLM"
    assert_declines(model, "loss_type")
    # a forward that is not transformers' own
    cls = type("MyLlama", (transformers.LlamaForCausalLM,), {"forward": lambda self, **kw: None})
    mine = cls(make_model("llama", device).config)
    assert_declines(mine, "not a transformers class")


def _fake_class(forward=None, **attrs):
    """A LlamaForCausalLM subclass that passes for one of transformers' own."""
    body = {"__module__": "transformers.models.fake", **attrs}
    if forward is not None:
        body["forward"] = forward
    return type("FakeForCausalLM", (transformers.LlamaForCausalLM,), body)


@needs_transformers
def test_transformers_patch_declines_forwards_it_cannot_fuse(device):
    """Forwards that do something between the head and the loss that the substitution cannot
    reproduce: each is caught by a per-call check (the probe turns it into a decline), never
    computed as another loss."""
    config = make_model("llama", device).config
    Out = transformers.modeling_outputs.CausalLMOutputWithPast

    def no_labels(self, input_ids=None, **kwargs) -> Out:
        return None

    def body(self, input_ids, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in ("attention_mask", "use_cache")}
        return self.model(input_ids=input_ids, **kwargs).last_hidden_state

    def own_loss(self, input_ids=None, labels=None, **kwargs) -> Out:
        logits = self.lm_head(body(self, input_ids, kwargs))
        return Out(loss=logits.float().logsumexp(-1).mean(), logits=logits)

    def head_twice(self, input_ids=None, labels=None, **kwargs) -> Out:
        h = body(self, input_ids, kwargs)
        logits = self.lm_head(h) + self.lm_head(h)
        return Out(loss=self.loss_function(logits, labels, self.vocab_size), logits=logits)

    def sliced(self, input_ids=None, labels=None, **kwargs) -> Out:
        logits = self.lm_head(body(self, input_ids, kwargs))[:, 1:].contiguous()
        return Out(loss=self.loss_function(logits, labels[:, 1:], self.vocab_size), logits=logits)

    def scaled(self, input_ids=None, labels=None, **kwargs) -> Out:
        logits = self.lm_head(body(self, input_ids, kwargs)) * 2
        return Out(loss=self.loss_function(logits, labels, self.vocab_size), logits=logits)

    def twice(self, input_ids=None, labels=None, **kwargs) -> Out:
        logits = self.lm_head(body(self, input_ids, kwargs))
        loss = self.loss_function(logits, labels, self.vocab_size)
        return Out(loss=loss + self.loss_function(logits, labels, self.vocab_size), logits=logits)

    assert_declines(_fake_class(no_labels)(config), "takes no labels")
    for forward, match in ((own_loss, "did not compute its loss with model.loss_function"),
                           (head_twice, "called its output embedding 2 times"),
                           (sliced, "reshapes, slices or extends the logits"),
                           (scaled, "transforms the logits before its loss and the config names "
                                    "no transform"),
                           (twice, "computes its loss more than once")):
        assert_declines(_fake_class(forward)(config), match)
        # and at run time, with the probe skipped: an error, not another loss
        model = _fake_class(forward)(config)
        assert hf.patch(model, check=False)
        with pytest.raises(hf.FusedLossError, match=match):
            model(**make_batch(device))


@needs_transformers
def test_transformers_patch_probe_declines_a_loss_it_cannot_reproduce(device):
    """A softcap in the config of a family whose forward does not apply it: the static checks
    accept it, the probe's loss differs, the patch is undone. check=False skips the probe (and
    so patches a model whose loss it changes: the reason check defaults to True)."""
    model = make_model("llama", device, final_logit_softcapping=5.0)
    assert_declines(model, "a logit transform .softcap=5.0. that the model's forward does not "
                           "apply")
    assert hf.patch(model, check=False)
    assert hf.unpatch(model)
    assert not hf.unpatch(model)


@needs_transformers
def test_transformers_patch_probe_reasons(device, monkeypatch):
    """The probe's other reasons: it raises, a non-finite loss, an output with a field the patch
    does not compute, another output class."""
    real_run = hf._Patch.run
    real_without = hf._without_logits
    out_cls = transformers.modeling_outputs.MoeCausalLMOutputWithPast

    def with_aux(self, model, call, kwargs):  # the unpatched run has a field the patch lacks
        out = real_run(self, model, call, kwargs)
        if call.mode == "record":
            out["aux_loss"] = torch.zeros(())
        return out

    def other_class(out, call, extras):
        out = real_without(out, call, extras)
        return out_cls(loss=out.loss)

    for name, value, match in (
            ("_linear_cross_entropy", lambda *a, **k: 1 / 0, "probe failed: ZeroDivisionError"),
            ("_linear_cross_entropy",
             lambda h, *a, **k: torch.full(h.shape[:1] if k["reduction"] == "none" else (),
                                           float("nan")), "loss differs"),
            ("_without_logits", other_class, "the patch MoeCausalLMOutputWithPast"),
    ):
        with monkeypatch.context() as m:
            m.setattr(hf, name, value)
            assert_declines(make_model("llama", device), match)
    with monkeypatch.context() as m:
        m.setattr(hf._Patch, "run", with_aux)
        assert_declines(make_model("llama", device), r"\['aux_loss'\]")


@needs_transformers
def test_transformers_patch_keeps_an_instance_forward(device):
    """A forward already set on the instance (a hook's wrapper) is what the logits path calls
    and what unpatch puts back."""
    model = make_model("llama", device)
    calls = []

    def instance_forward(*args, **kwargs):
        calls.append(sorted(kwargs))
        return type(model).forward(model, *args, **kwargs)

    model.forward = instance_forward
    assert hf.patch(model, check=False)
    batch = make_batch(device)
    batch.pop("labels")
    assert model(**batch).logits is not None and calls == [sorted(batch)]
    assert hf.unpatch(model) and model.forward is instance_forward


@needs_transformers
def test_transformers_patch_api(device):
    model = make_model("gemma2", device)
    assert hf.head_options(model) == {"softcap": 30.0, "logit_scale": 1.0, "logit_divisor": 1.0}
    granite = make_model("granite", device)
    assert hf.head_options(granite)["logit_divisor"] == 4.0
    assert hf.patch(granite, check=False)  # patched: the patch's own options, not a decline
    assert hf.head_options(granite) == {"softcap": None, "logit_scale": 1.0, "logit_divisor": 4.0}
    assert hf.unpatch(granite)
    with pytest.raises(ValueError, match="model: .*lm_head_multiplier"):
        hf.head_options(make_model("llama", device, lm_head_multiplier=2.0))
    with pytest.raises(ValueError, match="chunk_size"):
        hf.patch(model, chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        hf.patch(model, memory_budget=-1)
    with pytest.raises(TypeError, match="check"):
        hf.patch(model, check="yes")
    assert not hf.is_patched(model)
    with pytest.warns(RuntimeWarning, match="not a transformers PreTrainedModel"):
        assert hf.patch(torch.nn.Linear(2, 2)) is False
    # patching twice is a no-op; a deep copy is patched and runs its own weights
    assert hf.patch(model, check=False) and hf.patch(model)
    twin = copy.deepcopy(model)
    assert hf.is_patched(twin) and twin.forward.__self__ is twin
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    batch = make_batch(device)
    assert not torch.equal(model(**batch).loss, twin(**batch).loss)
    # the wrapped forward shows the model's own arguments (Trainer's column filter, generate)
    import inspect

    params = inspect.signature(model.forward).parameters
    assert "input_ids" in params and "labels" in params and "self" not in params
    assert hf.unpatch(model) and "forward" not in model.__dict__


# --------------------------------------------------------------------------- training stacks


@needs_transformers
def test_transformers_patch_gradient_checkpointing_and_autocast(device):
    model, ref = patched_pair("mistral", device)
    for m in (model, ref):
        # activation_checkpointing_enable in newer 5.x, gradient_checkpointing_enable before
        enable = getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)
        enable()
        m.train()
    batch = make_batch(device)
    out, want = model(**batch), ref(**batch)
    assert_close(out.loss, want.loss, what="checkpointed loss")
    out.loss.backward()
    want.loss.backward()
    assert_same_grads(model, ref)
    # autocast: the head is cast to the autocast dtype as the model's nn.Linear would be
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out, want = model(**batch), ref(**batch)
    assert_close(out.loss, want.loss, torch.bfloat16, "autocast loss")


@needs_transformers
@pytest.mark.slow
def test_transformers_patch_under_torch_compile(device):
    """The whole patched forward, backbone and fused loss, in one graph (fullgraph=True)."""
    model, ref = patched_pair("llama", device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    batch = make_batch(device)
    out, want = compiled(**batch, use_cache=False), ref(**batch, use_cache=False)
    assert out.logits is None
    assert_close(out.loss, want.loss, what="compiled loss")
    out.loss.backward()
    want.loss.backward()
    assert_same_grads(model, ref)


@needs_transformers
def test_transformers_patch_with_trainer(device, tmp_path):
    """patch(model) before Trainer(...): the Trainer sees the model's arguments, passes
    num_items_in_batch, and two accumulated micro-batches per step train as the unpatched."""
    pytest.importorskip("accelerate")
    model, ref = patched_pair("llama", device)
    rows = [{k: v[i] for k, v in make_batch(device, seed=s).items()} for s in (1, 2)
            for i in range(2)]
    final = []
    for m in (model, ref):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(len(final))), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-3, report_to=[],
            save_strategy="no", logging_steps=1, use_cpu=torch.device(device).type == "cpu",
            dataloader_num_workers=0, seed=0)
        trainer = transformers.Trainer(model=m, args=args, train_dataset=rows)
        assert trainer.model_accepts_loss_kwargs
        final.append(trainer.train().training_loss)
    assert abs(final[0] - final[1]) <= 1e-4 * abs(final[1])
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close(p, q, what=name)


# --------------------------------------------------------------------------- no transformers


def test_transformers_integration_imports_without_transformers(monkeypatch):
    """The module imports with transformers absent; using it raises an ImportError that says
    what to install."""
    import probact_gpu.integrations

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    monkeypatch.setattr(probact_gpu.integrations, "transformers", hf)  # restored afterwards
    monkeypatch.delitem(sys.modules, "probact_gpu.integrations.transformers")
    module = importlib.import_module("probact_gpu.integrations.transformers")
    assert module is not hf
    with pytest.raises(ImportError, match=r"pip install 'probact-gpu\[transformers\]'"):
        module.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ImportError, match="transformers"):
        module.head_options(torch.nn.Linear(2, 2))
