"""What every architecture shares (sae.models.base): the squared error and the batch spread."""

from __future__ import annotations

import pytest
import torch

from sae.models.base import spread, sq_err


def pair(n: int = 12, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, dtype=torch.float64, generator=g) + 3.0  # an offset, as activations
    return x, x + torch.randn(n, d, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("shape", ["rows", "one-row"])
def test_sq_err_is_the_textbook_formula_with_its_gradients(shape: str) -> None:
    x, x_hat = pair()
    if shape == "one-row":  # x̂ broadcast over the tokens, e.g. the batch mean
        x_hat = x_hat[0]
    x.requires_grad_()
    x_hat.requires_grad_()
    upstream = torch.linspace(-1, 2, x.shape[0], dtype=torch.float64)

    got = sq_err(x, x_hat)
    (grad_x, grad_x_hat) = torch.autograd.grad((got * upstream).sum(), (x, x_hat))
    want = ((x_hat - x) ** 2).sum(-1)
    (want_x, want_x_hat) = torch.autograd.grad((want * upstream).sum(), (x, x_hat))

    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_x_hat, want_x_hat, rtol=1e-12, atol=0)
    assert grad_x_hat.shape == x_hat.shape


def test_sq_err_of_a_bf16_reconstruction_is_fp32_with_a_bf16_gradient() -> None:
    x, x_hat = pair()
    x, x_hat = x.float(), x_hat.bfloat16().requires_grad_()
    err = sq_err(x, x_hat)
    err.sum().backward()
    assert err.dtype == torch.float32 and x_hat.grad.dtype == torch.bfloat16
    torch.testing.assert_close(err, ((x_hat.float() - x) ** 2).sum(-1))
    torch.testing.assert_close(x_hat.grad, (2 * (x_hat.float() - x)).bfloat16())


def test_spread_is_the_sum_of_squared_deviations_from_the_mean() -> None:
    x, _ = pair()
    want = ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(spread(x), want, rtol=1e-12, atol=0)
    assert spread(x.float()).dtype == torch.float32
    # an input needing a gradient gets it (through the mean too: Σ of the gradient is 0)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(spread(x), x)
    torch.testing.assert_close(grad, 2 * (x - x.mean(0)).detach(), rtol=1e-12, atol=1e-12)
