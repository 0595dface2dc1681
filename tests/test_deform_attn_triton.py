"""The fused Triton kernel against the reference, on CPU through TRITON_INTERPRET=1.

The interpreter has to be switched on before triton is imported, so every check runs in a
subprocess (``labkit.detr.interpret_check``); this pytest process never imports triton in
interpreter mode and other tests are unaffected. On a CUDA machine the compiled kernel is
checked in-process as well.
"""

import importlib.util

import pytest
import torch

from labkit.detr.interpret_check import run_interpreted_check

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton not installed"
)

# float32 math in both; location gradients are scaled by the level size, hence the looser bound.
TOLERANCE = {
    "output": 1e-5,
    "grad_value": 1e-5,
    "grad_sampling_locations": 1e-4,
    "grad_attention_weights": 2e-5,
}


def test_kernel_matches_reference_interpreted():
    result = run_interpreted_check(num_cases=8, seed=0)
    assert result["ok"], result["error"]
    cases = result["cases"]
    assert {c["num_heads"] for c in cases} >= {1, 8} and {c["num_points"] for c in cases} >= {1, 8}
    assert any(h % 2 for c in cases for hw in c["shapes"] for h in hw)  # odd level sizes
    assert {c["bs"] for c in cases} == {1, 2, 3}
    for name, tol in TOLERANCE.items():
        assert result["max_abs_diff"][name] < tol, (name, result["max_abs_diff"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference_cuda(dtype):
    from labkit.detr.ms_deform_attn import (
        level_start_index_from_shapes,
        multi_scale_deformable_attn_pytorch,
    )
    from labkit.detr.ms_deform_attn_triton import ms_deform_attn_triton

    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[13, 21], [7, 11], [4, 6], [2, 3]], device="cuda")
    starts = level_start_index_from_shapes(shapes)
    keys = int(shapes.prod(1).sum())
    value = torch.randn(2, keys, 8, 32, generator=gen).cuda()
    locs = (torch.rand(2, 50, 8, 4, 4, 2, generator=gen) * 1.2 - 0.1).cuda()
    weights = torch.rand(2, 50, 8, 4, 4, generator=gen).cuda()
    inputs = [t.clone().requires_grad_() for t in (value.to(dtype), locs, weights)]
    out = ms_deform_attn_triton(inputs[0], shapes, starts, inputs[1], inputs[2])
    assert out.dtype == dtype
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref = multi_scale_deformable_attn_pytorch(
        ref_inputs[0], shapes, starts, ref_inputs[1], ref_inputs[2]
    )
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    grad = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad(out.float(), inputs, grad),
        torch.autograd.grad(ref, ref_inputs, grad),
        strict=True,
    ):
        torch.testing.assert_close(a.float(), b, atol=tol * 10, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_under_bf16_autocast_uses_the_kernel():
    from labkit.detr.ms_deform_attn import MultiScaleDeformableAttention

    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(64, 4, 2, 4, dropout=0.0, batch_first=True).cuda()
    shapes = torch.tensor([[9, 11], [5, 6]], device="cuda")
    query = torch.randn(2, 20, 64, device="cuda")
    value = torch.randn(2, 129, 64, device="cuda")
    ref = torch.rand(2, 20, 2, 4, device="cuda")
    expected = attn(query, value=value, reference_points=ref, spatial_shapes=shapes)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(query, value=value, reference_points=ref, spatial_shapes=shapes)
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)
    assert attn.sampling_offsets.weight.grad is not None
