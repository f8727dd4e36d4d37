"""torch.compile(fullgraph=True) traces the registered ops with no graph break, forward and
backward (CPU: the aot_eager backend runs the same AOTAutograd tracing as inductor; the gpu
tier compiles with inductor)."""

import pytest
import torch

import probact_gpu as pg


def _loss(x, w, t):
    return (pg.log_softmax(x @ w.T * 2.0, -1).sum() + pg.softmax(x, 0).square().sum()
            + pg.linear_cross_entropy(x, w, t, chunk_size=4)
            + pg.linear_cross_entropy(x, w, t, low_memory=True, reduction="sum"))


def _compare(backend, device):
    torch.manual_seed(0)
    x = torch.randn(8, 16, device=device, requires_grad=True)
    w = torch.randn(10, 16, device=device, requires_grad=True)
    t = torch.randint(0, 10, (8,), device=device)
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    out = compiled(x, w, t)
    out.backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ref = _loss(x, w, t)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


def test_softmax_and_linear_ce_compile_fullgraph(device):
    torch._dynamo.reset()
    _compare("aot_eager", device)


@pytest.mark.gpu
def test_softmax_and_linear_ce_compile_inductor_gpu(device):
    torch._dynamo.reset()
    _compare("inductor", device)
