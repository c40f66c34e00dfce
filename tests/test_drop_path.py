"""Stochastic depth that runs HAT branches on the kept samples only (layers/drop_path.py): same values and gradients
as timm's mask-multiply DropPath under the same mask, less work."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath
from torch import nn

import open_fastervit  # noqa: F401  (registers the models)
from open_fastervit.layers import drop_path as dp
from open_fastervit.layers import keep_mask, residual_drop_path


class RowCounter(nn.Module):
    """A per-sample branch (LayerNorm + Linear) that records how many rows it was run on."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.fc(self.norm(x))


def reference(x: torch.Tensor, branch: nn.Module, drop_prob: float, mask: torch.Tensor) -> torch.Tensor:
    scale = (mask / (1 - drop_prob)).view(-1, *([1] * (x.dim() - 1)))
    return x + branch(x) * scale


def test_values_and_gradients_equal_the_mask_multiply_form() -> None:
    torch.manual_seed(0)
    branch = RowCounter()
    x = torch.randn(8, 3, 6, requires_grad=True)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0])
    y = residual_drop_path(x, branch, 0.3, True, mask=mask)
    assert branch.rows == [4]  # the branch saw only the 4 kept samples
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *branch.parameters()], gy)
    x2 = x.detach().clone().requires_grad_()
    y2 = reference(x2, branch, 0.3, mask)
    grads2 = torch.autograd.grad(y2, [x2, *branch.parameters()], gy)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # dropped samples pass through unchanged
    torch.testing.assert_close(y[1], x[1])


def test_the_default_mask_is_the_draw_timm_makes() -> None:
    """Same seed: the kept samples are the ones timm's DropPath keeps for a CPU tensor, so results agree."""
    branch = RowCounter()
    x = torch.randn(16, 5, 6)
    torch.manual_seed(3)
    ours = residual_drop_path(x, branch, 0.4, True)
    torch.manual_seed(3)
    timm_path = DropPath(0.4).train()
    theirs = x + timm_path(branch(x))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    assert keep_mask(16, 0.6).sum().item() == branch.rows[0]


def test_edge_cases() -> None:
    branch = RowCounter()
    x = torch.randn(4, 6, requires_grad=True)
    # eval: the plain residual, whatever the rate
    torch.testing.assert_close(residual_drop_path(x, branch, 0.5, False), x + branch(x))
    # all kept: scaled by 1 / keep_prob, no indexing
    torch.testing.assert_close(residual_drop_path(x, branch, 0.5, True, mask=torch.ones(4)), x + 2 * branch(x))
    # none kept: output = input, yet every parameter gets a (zero) gradient, as DDP requires
    y = residual_drop_path(x, branch, 0.5, True, mask=torch.zeros(4))
    torch.testing.assert_close(y, x)
    y.sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in branch.parameters())
    with pytest.raises(ValueError, match="drop_prob"):
        residual_drop_path(x, branch, 1.0, True)
    with pytest.raises(ValueError, match="mask must have shape"):
        residual_drop_path(x, branch, 0.5, True, mask=torch.ones(3))


def test_traced_path_multiplies_the_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile / export the mask is applied by multiplication, with the same result."""
    branch = RowCounter()
    x = torch.randn(6, 6)
    mask = torch.tensor([0.0, 1, 1, 0, 1, 0])
    skipped = residual_drop_path(x, branch, 0.25, True, mask=mask)
    monkeypatch.setattr(dp, "tracing", lambda: True)
    traced = residual_drop_path(x, branch, 0.25, True, mask=mask)
    assert branch.rows == [3, 6]
    torch.testing.assert_close(skipped, traced, rtol=1e-6, atol=1e-6)


def _mask_multiply(x, branch, drop_prob, training, mask=None):  # noqa: ANN001, ANN202
    if not training or drop_prob == 0.0:
        return x + branch(x)
    mask = keep_mask(x.shape[0], 1 - drop_prob) if mask is None else mask
    return reference(x, branch, drop_prob, mask)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_of_a_model_equals_the_mask_multiply_form(
    monkeypatch: pytest.MonkeyPatch, checkpointing: bool
) -> None:
    """A FasterViT training forward/backward (HAT stage with carriers, high drop rate) gives the same loss and
    gradients as the mask-multiply stochastic depth drawing the same masks; with activation checkpointing too."""
    kwargs = dict(dim=16, in_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.6)
    model = timm.create_model("fastervit_0", num_classes=5, **kwargs).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(6, 3, 128, 96)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(7)
        loss = model(x).square().mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return loss.detach(), [torch.zeros(()) if g is None else g for g in grads]

    loss, grads = step()
    monkeypatch.setattr("open_fastervit.layers.hat.residual_drop_path", _mask_multiply)
    loss_ref, grads_ref = step()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_branch_of_another_dtype_promotes_like_an_add() -> None:
    """An fp32 residual stream with a bf16 branch (autocast) gives what ``x + branch`` gives: fp32."""
    x = torch.randn(4, 6)
    mask = torch.tensor([1.0, 0, 1, 0])
    y = residual_drop_path(x, lambda v: (2 * v).bfloat16(), 0.5, True, mask=mask)
    assert y.dtype == torch.float32
    expected = x + (2 * x).bfloat16() * (mask / 0.5)[:, None]
    torch.testing.assert_close(y, expected)
