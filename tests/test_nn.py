"""The modules: options validated at construction, tensors as buffers, forward equal to the
function they wrap."""

import pytest
import torch

import probact_gpu as pg
from probact_gpu import functional


def test_log_softmax_module_is_not_a_softmax():
    # a LogSoftmax that passed isinstance(m, Softmax) would be swapped for a softmax by code that
    # matches modules by type
    assert not isinstance(pg.LogSoftmax(), pg.Softmax)
    x = torch.randn(3, 7)
    torch.testing.assert_close(pg.LogSoftmax(dim=0)(x), functional.log_softmax(x, 0))
    assert "dim=0" in repr(pg.LogSoftmax(dim=0))


@pytest.mark.parametrize("kwargs, name", [
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(ignore_index=2.7), "ignore_index"),
    (dict(softcap=-1.0), "softcap"),
    (dict(temperature=0.0), "temperature"),
    (dict(logit_divisor=0.0), "logit_divisor"),
    (dict(normalizer=4.0), "normalizer"),  # needs reduction="sum"
])
@pytest.mark.parametrize("module", [pg.CrossEntropyLoss, pg.LinearCrossEntropyLoss])
def test_loss_modules_validate_options_at_construction(module, kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        module(**kwargs)


def test_cross_entropy_module_matches_function_and_keeps_weight_as_buffer():
    torch.manual_seed(0)
    x, t = torch.randn(6, 9, requires_grad=True), torch.randint(0, 9, (6,))
    w = torch.rand(9) + 0.5
    mod = pg.CrossEntropyLoss(w, reduction="sum", label_smoothing=0.1, z_loss=0.01,
                              softcap=5.0)
    assert "weight" in dict(mod.named_buffers())
    assert mod.options.weight is None  # the buffer is the only copy: it follows .to()
    got = mod(x, t)
    want = functional.cross_entropy(x, t, w, reduction="sum", label_smoothing=0.1, z_loss=0.01,
                                    softcap=5.0)
    torch.testing.assert_close(got, want)
    assert "softcap=5.0" in repr(mod) and "reduction='sum'" in repr(mod)


def test_cross_entropy_module_arguments_after_weight_are_keyword_only():
    with pytest.raises(TypeError):
        pg.CrossEntropyLoss(None, -100)


def test_linear_cross_entropy_module_matches_function():
    torch.manual_seed(0)
    h, head = torch.randn(5, 8), torch.randn(11, 8)
    t = torch.randint(0, 11, (5,))
    mod = pg.LinearCrossEntropyLoss(reduction="sum", chunk_size=2)
    got = mod(h, head, t)
    want = functional.linear_cross_entropy(h, head, t, reduction="sum")
    torch.testing.assert_close(got, want)
