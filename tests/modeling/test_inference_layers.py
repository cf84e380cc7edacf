"""Inference-only memory savings: batch norm folded into convolutions, in-place activations and adds.

Each must give the module's ordinary result (compared with the unfolded / out-of-place computation)
and must only be taken when autograd is off and the norm uses running statistics.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from detectron2.layers import FrozenBatchNorm2d

from cmt_cops_d2.modeling.layers import (
    ConvNorm,
    GELU,
    ReLU,
    add_,
    batch_norm_affine,
    conv_norm,
    folded_conv_weights,
    get_activation,
    set_inference_shortcuts,
)


def _random_statistics(norm: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = norm.running_mean.numel()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(c, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(c, generator=g))
        norm.running_mean.copy_(torch.randn(c, generator=g))
        norm.running_var.copy_(torch.rand(c, generator=g) + 0.5)


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN"])
@pytest.mark.parametrize("kernel,stride,dilation,groups", [(1, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 1),
                                                           (5, 1, 1, 8)])
def test_folded_conv_equals_conv_then_norm(norm, kernel, stride, dilation, groups):
    torch.manual_seed(0)
    conv = conv_norm(8, 8, kernel, stride=stride, dilation=dilation, groups=groups, norm=norm)
    _random_statistics(conv.norm)
    set_inference_shortcuts(conv.eval())
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    conv.double()
    with torch.no_grad():
        assert folded_conv_weights(conv.weight, conv.bias, conv.norm) is not None
        folded = conv(x)
        reference = conv.norm(F.conv2d(x, conv.weight, None, conv.stride, conv.padding,
                                       conv.dilation, conv.groups))
    torch.testing.assert_close(folded, reference, rtol=1e-12, atol=1e-12)


def test_folding_keeps_the_conv_bias_and_the_activation():
    torch.manual_seed(1)
    conv = set_inference_shortcuts(ConvNorm(4, 6, 3, padding=1, bias=True, norm=nn.BatchNorm2d(6),
                                            activation=nn.ReLU()).double().eval())
    _random_statistics(conv.norm, seed=1)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        folded = conv(x)
    reference = F.relu(conv.norm(F.conv2d(x, conv.weight, conv.bias, padding=1)))
    torch.testing.assert_close(folded, reference.detach(), rtol=1e-12, atol=1e-12)


def test_no_folding_with_autograd_batch_statistics_or_group_norm():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        assert batch_norm_affine(bn) is None                    # training mode: batch statistics
        assert batch_norm_affine(bn.eval()) is not None
        assert batch_norm_affine(nn.GroupNorm(2, 4)) is None
        assert batch_norm_affine(None) is None
        assert batch_norm_affine(FrozenBatchNorm2d(4)) is not None
    assert batch_norm_affine(bn) is None                        # autograd on

    # BN in training mode under no_grad normalises with the batch's own statistics.
    torch.manual_seed(2)
    conv = conv_norm(4, 4, 1, norm="BN").train()
    _random_statistics(conv.norm, seed=2)
    x = torch.randn(3, 4, 6, 6) * 5 + 2
    with torch.no_grad():
        y = conv(x)
    assert y.mean((0, 2, 3)).sub(conv.norm.bias).abs().max() < 1e-4


def test_folding_leaves_parameters_and_state_dict_unchanged():
    conv = set_inference_shortcuts(conv_norm(4, 4, 3, norm="BN").eval())
    _random_statistics(conv.norm, seed=3)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    with torch.no_grad():
        conv(torch.randn(1, 4, 5, 5))
    after = conv.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name,fn", [("gelu", F.gelu), ("relu", F.relu)])
def test_inplace_activation_only_without_autograd(name, fn):
    act = set_inference_shortcuts(get_activation(name, inplace=True))
    assert isinstance(act, GELU if name == "gelu" else ReLU)
    x = torch.randn(100)
    expected = fn(x)
    # autograd on: out of place, and gradients flow
    xg = x.clone().requires_grad_()
    y = act(xg)
    assert torch.equal(xg.detach(), x) and torch.equal(y.detach(), expected)
    y.sum().backward()
    assert xg.grad is not None
    # autograd off: the input is overwritten and returned
    t = x.clone()
    with torch.no_grad():
        out = act(t)
    assert out.data_ptr() == t.data_ptr() and torch.equal(t, expected)
    # inplace=False never overwrites
    t = x.clone()
    with torch.no_grad():
        out = get_activation(name)(t)
    assert torch.equal(t, x) and torch.equal(out, expected)


def test_shortcuts_are_off_until_switched_on():
    """Without :func:`set_inference_shortcuts`, no-grad eval runs the ordinary computation: the
    norm module runs (a forward hook sees it) and activations leave their input alone."""
    conv = conv_norm(4, 4, 3, norm="BN").eval()
    _random_statistics(conv.norm, seed=4)
    calls = []
    conv.norm.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        plain = conv(x)
        assert len(calls) == 1
        set_inference_shortcuts(conv)
        folded = conv(x)
        assert len(calls) == 1                                  # folded: the norm did not run
        set_inference_shortcuts(conv, False)
        conv(x)
        assert len(calls) == 2
    torch.testing.assert_close(plain, folded, rtol=1e-5, atol=1e-5)
    act, t = get_activation("gelu", inplace=True), torch.randn(10)
    with torch.no_grad():
        out = act(t)
    assert out.data_ptr() != t.data_ptr()


def test_add_writes_into_the_temporary_only_without_autograd():
    a, b = torch.randn(3, 4), torch.randn(4)
    t = a.clone()
    s = add_(t, b)
    assert torch.equal(t, a) and torch.equal(s, a + b)
    with torch.no_grad():
        s = add_(t, b)
    assert s.data_ptr() == t.data_ptr() and torch.equal(s, a + b)
