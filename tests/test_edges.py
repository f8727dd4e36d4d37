"""Edges every public op must handle as torch does: empty inputs (a size-0 dim anywhere), meta
tensors (shape inference, forward and backward) and autocast. Each case runs our op and the torch
composition users come from on the same inputs and compares shape, dtype and values (NaN where
torch has NaN), then the gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import probact_gpu as pg

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's inf − inf lanes


def _tlp_ref(logits, target, **kw):
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, target.clamp(min=0)[..., None])[..., 0].masked_fill(target == -100, 0)


def _lin(h, w):
    return h @ w.T


# name → (ours(x, *extra), torch's(x, *extra), input shape, extra tensors' builders). ``x``
# requires grad; the extras are built from the input's shape.
def _index_target(shape, c_dim=1):
    return torch.zeros(shape[:c_dim] + shape[c_dim + 1:], dtype=torch.long)


def _cases():
    ce = pg.cross_entropy
    w = torch.randn(5, 4)
    return {
        "softmax (2, 0, 5) dim -1": (lambda x: pg.softmax(x, -1), lambda x: torch.softmax(x, -1),
                                     (2, 0, 5)),
        "softmax (3, 0) dim 1": (lambda x: pg.softmax(x, 1), lambda x: torch.softmax(x, 1),
                                 (3, 0)),
        "log_softmax (0, 7) dim 0": (lambda x: pg.log_softmax(x, 0),
                                     lambda x: torch.log_softmax(x, 0), (0, 7)),
        "sigmoid (2, 0)": (pg.sigmoid, torch.sigmoid, (2, 0)),
        "logsigmoid (0,)": (pg.logsigmoid, F.logsigmoid, (0,)),
        "bce mean (0, 5)": (lambda x: pg.binary_cross_entropy_with_logits(x, torch.rand(x.shape)),
                            lambda x: F.binary_cross_entropy_with_logits(x, torch.rand(x.shape)),
                            (0, 5)),
        "bce none (2, 0, 3)": (
            lambda x: pg.binary_cross_entropy_with_logits(x, torch.rand(x.shape), reduction="none",
                                                          pos_weight=torch.ones(3)),
            lambda x: F.binary_cross_entropy_with_logits(x, torch.rand(x.shape), reduction="none",
                                                         pos_weight=torch.ones(3)), (2, 0, 3)),
        "ce mean (0, 5)": (lambda x: ce(x, _index_target(x.shape)),
                           lambda x: F.cross_entropy(x, _index_target(x.shape)), (0, 5)),
        "ce sum (0, 5) smoothing weight": (
            lambda x: ce(x, _index_target(x.shape), torch.ones(5), reduction="sum",
                         label_smoothing=0.1),
            lambda x: F.cross_entropy(x, _index_target(x.shape), torch.ones(5), reduction="sum",
                                      label_smoothing=0.1), (0, 5)),
        "ce none (2, 5, 3, 0)": (
            lambda x: ce(x, _index_target(x.shape), reduction="none"),
            lambda x: F.cross_entropy(x, _index_target(x.shape), reduction="none"), (2, 5, 3, 0)),
        "ce mean (2, 5, 0, 3)": (lambda x: ce(x, _index_target(x.shape)),
                                 lambda x: F.cross_entropy(x, _index_target(x.shape)),
                                 (2, 5, 0, 3)),
        "ce sum (2, 5, 0) z_loss": (
            lambda x: ce(x, _index_target(x.shape), reduction="sum", z_loss=0.1),
            lambda x: F.cross_entropy(x, _index_target(x.shape), reduction="sum"), (2, 5, 0)),
        "ce in place mean (0, 5)": (
            lambda x: ce(x * 1.0, _index_target(x.shape), inplace_backward=True),
            lambda x: F.cross_entropy(x, _index_target(x.shape)), (0, 5)),
        "ce probabilities mean (0, 5)": (
            lambda x: ce(x, torch.zeros(x.shape)), lambda x: F.cross_entropy(x, torch.zeros(
                x.shape)), (0, 5)),
        "linear ce mean (0, 4)": (
            lambda x: pg.linear_cross_entropy(x, w, _index_target(x.shape, x.ndim - 1)),
            lambda x: F.cross_entropy(_lin(x, w), _index_target(x.shape, x.ndim - 1)), (0, 4)),
        "linear ce none (2, 0, 4)": (
            lambda x: pg.linear_cross_entropy(x, w, _index_target(x.shape, x.ndim - 1),
                                              reduction="none"),
            lambda x: F.cross_entropy(_lin(x, w).transpose(1, 2),
                                      _index_target(x.shape, x.ndim - 1), reduction="none"),
            (2, 0, 4)),
        "token_log_probs (2, 0, 5)": (
            lambda x: pg.token_log_probs(x, _index_target(x.shape, x.ndim - 1)),
            lambda x: _tlp_ref(x, _index_target(x.shape, x.ndim - 1)), (2, 0, 5)),
        "token_log_probs entropy (0, 5)": (
            lambda x: pg.token_log_probs(x, _index_target(x.shape, x.ndim - 1),
                                         return_entropy=True).logprobs,
            lambda x: _tlp_ref(x, _index_target(x.shape, x.ndim - 1)), (0, 5)),
        "linear_token_log_probs (2, 0, 4)": (
            lambda x: pg.linear_token_log_probs(x, w, _index_target(x.shape, x.ndim - 1)),
            lambda x: _tlp_ref(_lin(x, w), _index_target(x.shape, x.ndim - 1)), (2, 0, 4)),
    }


EMPTY = _cases()


def _assert_same(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    torch.testing.assert_close(ours, ref, equal_nan=True)


@pytest.mark.parametrize("name", list(EMPTY))
def test_empty_inputs_give_torchs_empty_results(name):
    """A size-0 dim anywhere — before the class dim too, which once sent the row-view helper into
    infinite recursion (token_log_probs on (B, 0, V), cross-entropy on (N, C, d, 0)) — gives
    torch's result: empty outputs, NaN for an empty mean, 0 for a sum, empty gradients."""
    ours_fn, ref_fn, shape = EMPTY[name]
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ours, ref = ours_fn(x), ref_fn(x_ref)
    _assert_same(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    _assert_same(x.grad, x_ref.grad)
