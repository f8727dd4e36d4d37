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
    (dict(weight=torch.ones(2, 3)), "weight"),
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
    assert mod.options.weight is mod.weight  # the buffer is the only copy: it follows .to()
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


@pytest.mark.parametrize("kwargs, name", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(memory_budget=-1), "memory_budget"),
    (dict(low_memory=1), "low_memory"),
])
def test_linear_cross_entropy_module_validates_chunking_at_construction(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        pg.LinearCrossEntropyLoss(**kwargs)


def test_cross_entropy_module_honours_torchs_attributes():
    """As torch's CrossEntropyLoss: reduction, ignore_index, label_smoothing and weight are
    public attributes that the next call reads (assigning them was silently ignored, and reading
    them raised AttributeError)."""
    torch.manual_seed(0)
    x, t = torch.randn(6, 9), torch.randint(0, 9, (6,))
    ours, theirs = pg.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    for name in ("reduction", "ignore_index", "label_smoothing", "weight"):
        assert getattr(ours, name) == getattr(theirs, name) or getattr(ours, name) is None
    changes = [("reduction", "none"), ("ignore_index", int(t[0])), ("label_smoothing", 0.2),
               ("weight", torch.rand(9) + 0.5), ("reduction", "sum")]
    for name, value in changes:
        setattr(ours, name, value)
        setattr(theirs, name, value)
        torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert "weight" in dict(ours.named_buffers()) and "weight" in ours.state_dict()


def test_cross_entropy_module_checks_each_assignment_and_keeps_the_old_value():
    mod = pg.CrossEntropyLoss(reduction="sum", normalizer=4.0)
    for name, value, match in [("reduction", "avg", "reduction"),
                               ("label_smoothing", -0.1, "label_smoothing"),
                               ("ignore_index", 1.5, "ignore_index"),
                               ("temperature", 0.0, "temperature"),
                               ("reduction", "mean", "normalizer"),  # normalizer needs "sum"
                               ("weight", torch.ones(3, dtype=torch.long), "weight"),
                               ("inplace_backward", "yes", "inplace_backward")]:
        before = getattr(mod, name)
        with pytest.raises((TypeError, ValueError), match=match):
            setattr(mod, name, value)
        assert getattr(mod, name) is before or getattr(mod, name) == before
    mod.normalizer = None
    mod.reduction = "mean"  # in that order it is fine
    assert mod.options.reduction == "mean" and mod.options.normalizer is None


def test_modules_check_their_other_attributes_on_assignment():
    with pytest.raises(ValueError, match="reduction"):
        pg.BCEWithLogitsLoss().reduction = "avg"
    with pytest.raises(TypeError, match="pos_weight"):
        pg.BCEWithLogitsLoss().pos_weight = torch.ones(3, dtype=torch.long)
    with pytest.raises(TypeError, match="dim"):
        pg.Softmax().dim = 1.0
    mod = pg.LinearCrossEntropyLoss()
    with pytest.raises(ValueError, match="chunk_size"):
        mod.chunk_size = 0
    assert mod.chunk_size is None
    mod.chunk_size = 2
    torch.manual_seed(0)
    h, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.randint(0, 7, (5,))
    torch.testing.assert_close(mod(h, w, t), functional.linear_cross_entropy(h, w, t))


def test_loss_module_reprs_show_every_option_that_changes_the_result():
    mod = pg.CrossEntropyLoss(torch.ones(4), reduction="sum", z_loss=1e-4, temperature=0.5,
                              normalizer=torch.tensor(3.0), return_lse=True,
                              inplace_backward=True)
    text = repr(mod)
    for part in ("weight=Tensor(4,)", "reduction='sum'", "z_loss=0.0001", "temperature=0.5",
                 "normalizer=Tensor()", "return_lse=True", "inplace_backward=True"):
        assert part in text, text
    lin = repr(pg.LinearCrossEntropyLoss(chunk_size=8, memory_budget=1 << 20, low_memory=True,
                                         label_smoothing=0.1))
    for part in ("chunk_size=8", "memory_budget=1048576", "low_memory=True",
                 "label_smoothing=0.1", "ignore_index=None"):
        assert part in lin, lin
    assert "pos_weight=Tensor(3,)" in repr(pg.BCEWithLogitsLoss(pos_weight=torch.ones(3)))


def test_loss_module_tensor_options_are_buffers_that_follow_to():
    """Class weights and a normalizer tensor move with .to() (to meta here: any device)."""
    mod = pg.CrossEntropyLoss(torch.ones(4), reduction="sum", normalizer=torch.tensor(3.0))
    assert set(dict(mod.named_buffers())) == {"weight", "normalizer"}
    assert set(mod.state_dict()) == {"weight"}  # the normalizer is per batch: not saved
    mod.to(torch.float64)
    assert mod.weight.dtype == mod.normalizer.dtype == torch.float64
    mod.to("meta")
    assert mod.weight.is_meta and mod.normalizer.is_meta and mod.options.weight.is_meta
    mod.normalizer = 2.0  # a number again: no longer a buffer
    assert set(dict(mod.named_buffers())) == {"weight"} and mod.normalizer == 2.0


def test_linear_cross_entropy_module_follows_torchs_ignore_index_default():
    """None by default, as torch's module: class probabilities then work, and an explicit
    ignore_index (even -100) raises with them, as torch's F.linear_cross_entropy."""
    torch.manual_seed(0)
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    probs = torch.softmax(torch.randn(3, 5), -1)
    want = torch.nn.functional.linear_cross_entropy(h, w, probs)
    torch.testing.assert_close(pg.LinearCrossEntropyLoss()(h, w, probs), want)
    for ignore_index in (-100, 2):
        with pytest.raises(ValueError, match="ignore_index cannot be specified"):
            pg.LinearCrossEntropyLoss(ignore_index=ignore_index)(h, w, probs)
