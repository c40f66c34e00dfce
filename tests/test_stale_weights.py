"""A model never answers from weights it no longer has (issue 12, item 1).

The trainable model caches only its attention biases, and a cached bias is used only while the bias MLP's weights
are element-wise equal to the ones it came from; so every route of changing weights is covered, including the ones
that bypass PyTorch's version counters (``.data`` edits, re-assigned or swapped parameters). The inference form
(``fuse()`` / ``inference_form``) is a declared snapshot: it holds no parameters, and the in-place routes that
remain open to it (``load_state_dict``, in-place ops on ``state_dict()`` tensors) are seen.

Expected value everywhere: the output of a *fresh* model built with the changed weights, to fp32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import TINY, randomise
from timm.utils import ModelEmaV3

from open_fastervit import inference_form
from open_fastervit.layers import ContinuousRelPosBias

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def tiny() -> torch.nn.Module:
    return randomise(timm.create_model("fastervit_0", **TINY), spread=0.2).eval()


def fresh_with(model: torch.nn.Module) -> torch.nn.Module:
    """A new model holding ``model``'s current weights (no cache could have seen the old ones)."""
    other = timm.create_model("fastervit_0", **TINY).eval()
    other.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return other


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def halve_data(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.data.mul_(0.5)  # the reported route: bypasses version counters


def assign_data(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.data = p.data * 0.5  # new storage behind the same Parameter object


def reassign_parameters(model: torch.nn.Module) -> None:
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(p.detach() * 0.5))  # new Parameter objects


def no_grad_inplace(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)


def vector_to_parameters(model: torch.nn.Module) -> None:
    params = list(model.parameters())
    if params:  # (an inference snapshot has none)
        vec = torch.nn.utils.parameters_to_vector(params) * 0.5
        torch.nn.utils.vector_to_parameters(vec, params)  # assigns p.data


def state_dict_inplace(model: torch.nn.Module) -> None:
    for v in model.state_dict().values():
        if v.is_floating_point():
            v.mul_(0.5)


def load_halved(model: torch.nn.Module) -> None:
    model.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()})


ROUTES = [halve_data, assign_data, reassign_parameters, no_grad_inplace, vector_to_parameters, state_dict_inplace,
          load_halved]


@pytest.mark.parametrize("route", ROUTES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_plain_model_follows_every_weight_change(route, mode) -> None:
    model = tiny()
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        before = model(X)  # fills the bias caches
    assert sum(len(m._cache) for m in model.modules() if isinstance(m, ContinuousRelPosBias)) > 0
    route(model)
    expected = fresh_with(model)
    with ctx():
        out = model(X)
        assert_same(out, expected(X))
    assert (out - before).abs().max() > 1e-4 * before.abs().max()  # the change is visible, not a no-op


def test_issue_input_halved_weights() -> None:
    """The reported case: eval, no_grad, ``p.data.mul_(0.5)`` for every parameter; the output must equal a fresh
    model loaded with the halved weights (the old cache gave an error of 0.0018 on a scale of 0.012)."""
    m = tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        m(x)
        for p in m.parameters():
            p.data.mul_(0.5)
        assert_same(m(x), fresh_with(m)(x))


def test_functional_call_and_ema_teacher_updates() -> None:
    model = tiny()
    with torch.no_grad():
        model(X)
        halved = {k: v * 0.5 for k, v in model.named_parameters()}
        out = torch.func.functional_call(model, halved, (X,))  # swapped parameters for one call
        reference = copy.deepcopy(model)
        for k, v in halved.items():
            reference.get_parameter(k).copy_(v)
        assert_same(out, fresh_with(reference)(X))
        assert_same(model(X), fresh_with(model)(X))  # and back to its own weights

    teacher = ModelEmaV3(model, decay=0.5)  # EMA / mean-teacher update through torch._foreach ops
    with torch.no_grad():
        teacher.module(X)
        no_grad_inplace(model)
        teacher.update(model)
        assert_same(teacher.module(X), fresh_with(teacher.module)(X))


@pytest.mark.parametrize("route", ROUTES, ids=lambda f: f.__name__)
def test_inference_form_is_a_snapshot(route) -> None:
    """``fuse()`` gives a snapshot without parameters: parameter routes cannot reach it (it keeps answering with
    the weights it was built from), and state-dict routes are followed exactly."""
    model = tiny()
    snapshot = inference_form(copy.deepcopy(model))
    assert list(snapshot.parameters()) == []
    assert snapshot.state_dict().keys() == copy.deepcopy(model).fuse().state_dict().keys()
    with torch.inference_mode():
        before = snapshot(X)
        assert_same(before, model(X))
        route(snapshot)
        out = snapshot(X)
    expected = fresh_fused = inference_form(fresh_with(model))
    fresh_fused.load_state_dict(snapshot.state_dict())  # whatever weights the snapshot now holds
    with torch.inference_mode():
        assert_same(out, expected(X))


def test_refusing_to_train_the_snapshot_is_explicit() -> None:
    snapshot = inference_form(tiny())
    assert not any(True for _ in snapshot.parameters())
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.SGD(snapshot.parameters(), lr=0.1)
