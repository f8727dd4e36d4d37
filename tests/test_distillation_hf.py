"""The recipe of docs/distillation.md: distil a patched Hugging Face student from a teacher
model without either model's logits — tiny random Llama models (different hidden sizes, an odd
vocabulary) on the CPU, TRL's GKD objective (generalized JSD, its beta and temperature) from both
models' hidden states, against the same objective on their logits."""

from __future__ import annotations

import warnings

import pytest
import torch

import probact_gpu as pg

transformers = pytest.importorskip("transformers")
from probact_gpu.integrations.transformers import head_options, patch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

VOCAB = 61


def _llama(hidden, seed):
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
        max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # logits of a few units
    return model


def _gkd_reference(student, teacher, ids, labels, beta, temperature):
    """TRL's generalized JSD (batchmean over the labelled tokens) on both models' logits."""
    s = student(ids).logits[:, :-1] / temperature
    with torch.no_grad():
        t = teacher(ids).logits[:, :-1] / temperature
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-beta)),
                                      lt + torch.log(torch.tensor(beta))]), 0)
    jsd = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    mask = labels[:, 1:] != -100
    return jsd[mask].sum() / mask.sum()


def test_distil_hf_student_without_logits(device):
    student, teacher = _llama(16, 0).to(device), _llama(32, 1).to(device)
    reference = _llama(16, 0).to(device)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):  # not frozen yet
        pg.linear_distillation_loss(torch.zeros(1, 16, device=device, requires_grad=True),
                                    student.get_output_embeddings().weight,
                                    torch.zeros(1, 32, device=device),
                                    teacher.get_output_embeddings().weight)
    teacher.eval().requires_grad_(False)  # the recipe's first step: the teacher is frozen
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a decline fails the test
        assert patch(student, check=False)
    s_head = {f"student_{k}": v for k, v in head_options(student).items()}
    t_head = {f"teacher_{k}": v for k, v in head_options(teacher).items()}
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(VOCAB, (2, 8), generator=g).to(device)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt

    def no_logits(module, args, output):
        raise AssertionError("an LM head formed logits")

    hooks = [m.get_output_embeddings().register_forward_hook(no_logits)
             for m in (student, teacher)]
    try:
        h_s = student.base_model(ids).last_hidden_state
        with torch.no_grad():
            h_t = teacher.base_model(ids).last_hidden_state
        loss = pg.linear_distillation_loss(
            h_s[:, :-1], student.get_output_embeddings().weight, h_t[:, :-1],
            teacher.get_output_embeddings().weight, labels[:, 1:], divergence="jsd",
            beta=0.4, temperature=0.9, chunk_size=8, **s_head, **t_head)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    want = _gkd_reference(reference, teacher, ids, labels, 0.4, 0.9)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(student.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # a step of SGD on the recipe's gradients lowers the objective
    with torch.no_grad():
        for p in student.parameters():
            p -= 0.5 * p.grad
        h_s = student.base_model(ids).last_hidden_state
        after = pg.linear_distillation_loss(
            h_s[:, :-1], student.get_output_embeddings().weight, h_t[:, :-1],
            teacher.get_output_embeddings().weight, labels[:, 1:], divergence="jsd",
            beta=0.4, temperature=0.9)
    assert float(after) < float(loss.detach())
