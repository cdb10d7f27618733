"""The model's hand-written fast paths (issue 19) against the plain torch they replace: RMSNorm's own backward on
the CPU, SwiGLU's gate and up as one matmul. Forward bitwise, gradients to rounding, so old checkpoints and
runs keep their meaning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefix.config import ModelConfig
from prefix.model import RMSNorm, SwiGLU, _RMSNormFunction

CFG = ModelConfig(vocab_size=257, seq_len=32, n_layer=2, n_head=2, d_model=64)


def leaves(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


def test_rmsnorm_forward_is_bitwise_f_rms_norm_and_its_backward_matches_autograd() -> None:
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(leaves(64, seed=3))
    x = leaves(4, 16, 64)
    ours = norm(x)
    assert ours.grad_fn is not None and "RMSNormFunction" in type(ours.grad_fn).__name__, "the CPU float32 path"
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    ref = F.rms_norm(x_ref, (64,), w_ref, 1e-5)
    assert torch.equal(ours, ref)

    grad = leaves(4, 16, 64, seed=5).detach()
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_rmsnorm_backward_passes_gradcheck_in_float64() -> None:
    x, w = leaves(3, 5, 8, dtype=torch.float64), leaves(8, seed=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))


def test_swiglu_is_bitwise_the_two_separate_projections() -> None:
    torch.manual_seed(0)
    mlp = SwiGLU(CFG)
    x = leaves(2, 8, CFG.d_model)
    ours = mlp(x)
    plain = mlp.down(F.silu(mlp.gate(x)) * mlp.up(x))
    assert torch.equal(ours, plain)
    assert sorted(mlp.state_dict()) == ["down.weight", "gate.weight", "up.weight"], "checkpoint names unchanged"

    ours.sum().backward()
    grads = [p.grad.clone() for p in (mlp.gate.weight, mlp.up.weight, mlp.down.weight)]
    mlp.zero_grad()
    mlp.down(F.silu(mlp.gate(x)) * mlp.up(x)).sum().backward()
    for ours_grad, p in zip(grads, (mlp.gate.weight, mlp.up.weight, mlp.down.weight), strict=True):
        torch.testing.assert_close(ours_grad, p.grad)
