"""Multi-scale deformable attention: the PyTorch reference and the mmcv-compatible module."""

import math
import re

import pytest
import torch

from labkit.detr.ms_deform_attn import (
    MultiScaleDeformableAttention,
    level_start_index_from_shapes,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
    sampling_locations_from_offsets,
)


def _one_level(values, loc):
    """Reference output for one image, one head, one level, one point with weight 1."""
    h, w = values.shape
    value = values.reshape(1, h * w, 1, 1)
    shapes = torch.tensor([[h, w]])
    locs = torch.tensor(loc, dtype=values.dtype).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=values.dtype)
    out = multi_scale_deformable_attn_pytorch(
        value, shapes, level_start_index_from_shapes(shapes), locs, weights
    )
    return float(out.reshape(()))


def test_bilinear_hand_cases_align_corners_false_and_zero_padding():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # Pixel centres sit at (j + 0.5) / w: exact reads.
    assert _one_level(v, (0.25, 0.25)) == pytest.approx(1.0)
    assert _one_level(v, (0.75, 0.25)) == pytest.approx(2.0)
    assert _one_level(v, (0.25, 0.75)) == pytest.approx(3.0)
    # The map centre averages all four pixels.
    assert _one_level(v, (0.5, 0.5)) == pytest.approx(2.5)
    # The top-left corner is half a pixel outside both axes: 1/4 of pixel (0, 0), rest zeros.
    assert _one_level(v, (0.0, 0.0)) == pytest.approx(0.25)
    # Halfway between the centre of the last column and the right edge: half of it.
    assert _one_level(v, (1.0, 0.25)) == pytest.approx(1.0)
    # Far outside reads zero.
    assert _one_level(v, (1.6, 0.5)) == 0.0
    assert _one_level(v, (-0.3, 0.5)) == 0.0


def _naive(value, shapes, locs, weights):
    """Loop-by-loop bilinear sampling written independently of grid_sample."""
    bs, _, heads, dims = value.shape
    _, nq, _, levels, points, _ = locs.shape
    out = torch.zeros(bs, nq, heads, dims, dtype=value.dtype)
    starts = level_start_index_from_shapes(shapes).tolist()
    for b in range(bs):
        for q in range(nq):
            for h in range(heads):
                for lvl in range(levels):
                    hh, ww = shapes[lvl].tolist()
                    for p in range(points):
                        x = float(locs[b, q, h, lvl, p, 0]) * ww - 0.5
                        y = float(locs[b, q, h, lvl, p, 1]) * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(dims, dtype=value.dtype)
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xi < ww and 0 <= yi < hh:
                                    k = starts[lvl] + yi * ww + xi
                                    acc += wy * wx * value[b, k, h]
                        out[b, q, h] += weights[b, q, h, lvl, p] * acc
    return out.reshape(bs, nq, heads * dims)


def _random_problem(
    bs=2,
    nq=5,
    heads=3,
    dims=4,
    points=3,
    shapes=((5, 7), (3, 4), (1, 2)),
    dtype=torch.float64,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes)
    keys = int(shapes.prod(1).sum())
    value = torch.randn(bs, keys, heads, dims, generator=gen, dtype=dtype)
    locs = torch.rand(bs, nq, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(bs, nq, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value, shapes, locs, weights


def test_reference_matches_naive_loops():
    value, shapes, locs, weights = _random_problem()
    out = multi_scale_deformable_attn_pytorch(
        value, shapes, level_start_index_from_shapes(shapes), locs, weights
    )
    torch.testing.assert_close(out, _naive(value, shapes, locs, weights))


def test_reference_accepts_mmcv_argument_order():
    value, shapes, locs, weights = _random_problem()
    a = multi_scale_deformable_attn_pytorch(value, shapes, locs, weights)
    b = multi_scale_deformable_attn_pytorch(
        value, shapes, level_start_index_from_shapes(shapes), locs, weights
    )
    torch.testing.assert_close(a, b)


def test_reference_gradcheck_float64():
    value, shapes, locs, weights = _random_problem(
        bs=1, nq=2, heads=2, dims=2, points=2, shapes=((3, 4), (2, 1))
    )
    # Keep locations away from pixel-centre lines, where bilinear sampling has kinks.
    locs = locs.clamp(-0.1, 1.1)
    starts = level_start_index_from_shapes(shapes)
    inputs = [t.clone().requires_grad_() for t in (value, locs, weights)]
    assert torch.autograd.gradcheck(
        lambda v, s, w: multi_scale_deformable_attn_pytorch(v, shapes, starts, s, w),
        inputs,
        eps=1e-6,
        atol=1e-5,
    )


def test_auto_backend_uses_reference_on_cpu():
    value, shapes, locs, weights = _random_problem(dtype=torch.float32)
    starts = level_start_index_from_shapes(shapes)
    torch.testing.assert_close(
        multi_scale_deformable_attn(value, shapes, starts, locs, weights),
        multi_scale_deformable_attn_pytorch(value, shapes, starts, locs, weights),
    )
    with pytest.raises(ValueError, match="backend"):
        multi_scale_deformable_attn(value, shapes, starts, locs, weights, backend="cuda")


def test_reference_errors_name_the_argument():
    value, shapes, locs, weights = _random_problem()
    starts = level_start_index_from_shapes(shapes)
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attn_pytorch(value, shapes + 1, None, locs, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        multi_scale_deformable_attn_pytorch(value, shapes, starts, locs, weights[..., :1])
    with pytest.raises(ValueError, match="sampling_locations"):
        multi_scale_deformable_attn_pytorch(value, shapes, starts, locs[:, :, :1], weights)
    with pytest.raises(ValueError, match="level_start_index"):
        multi_scale_deformable_attn_pytorch(value, shapes, starts + 1, locs, weights)
    with pytest.raises(ValueError, match="value"):
        multi_scale_deformable_attn_pytorch(value[0], shapes, starts, locs, weights)
    with pytest.raises(TypeError, match="value"):
        multi_scale_deformable_attn_pytorch(value.tolist(), shapes, starts, locs, weights)


def test_sampling_locations_points_and_boxes():
    shapes = torch.tensor([[10, 20], [5, 10]])
    offsets = torch.zeros(1, 1, 1, 2, 2, 2)
    offsets[..., 0, :] = torch.tensor([2.0, -1.0])
    offsets[..., 1, :] = torch.tensor([1.0, 1.0])
    # 2-d: an offset is measured in pixels of each level.
    ref = torch.tensor([0.5, 0.5]).expand(1, 1, 2, 2)
    locs = sampling_locations_from_offsets(ref, offsets, shapes)
    torch.testing.assert_close(locs[0, 0, 0, 0, 0], torch.tensor([0.5 + 2 / 20, 0.5 - 1 / 10]))
    torch.testing.assert_close(locs[0, 0, 0, 1, 0], torch.tensor([0.5 + 2 / 10, 0.5 - 1 / 5]))
    # 4-d: offset / num_points * box size * 0.5, whatever the level.
    box = torch.tensor([0.5, 0.4, 0.2, 0.6]).expand(1, 1, 2, 4)
    locs = sampling_locations_from_offsets(box, offsets, shapes)
    torch.testing.assert_close(
        locs[0, 0, 0, 1, 0], torch.tensor([0.5 + 2 / 2 * 0.2 * 0.5, 0.4 - 1 / 2 * 0.6 * 0.5])
    )
    torch.testing.assert_close(
        locs[0, 0, 0, 0, 1], torch.tensor([0.5 + 0.5 * 0.1, 0.4 + 0.5 * 0.3])
    )
    with pytest.raises(ValueError, match="reference_points"):
        sampling_locations_from_offsets(box[..., :3], offsets, shapes)


def test_module_init_matches_mmcv():
    attn = MultiScaleDeformableAttention(embed_dims=32, num_heads=8, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[0, :, 0], torch.tensor([[1.0, 0.0]] * 2))
    torch.testing.assert_close(bias[1, 0], torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    torch.testing.assert_close(bias[2, 1, 2], torch.tensor([math.cos(math.pi / 2) * 3, 3.0]))
    torch.testing.assert_close(bias[5, 0, 1], torch.tensor([-2.0, -2.0]))
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert (
        attn.attention_weights.weight.abs().sum() == 0
        and attn.attention_weights.bias.abs().sum() == 0
    )
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0
    bound = math.sqrt(6 / (32 + 32))
    assert attn.value_proj.weight.abs().max() <= bound
    assert set(dict(attn.named_parameters())) == {
        f"{m}.{p}"
        for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in ("weight", "bias")
    }


def _module_inputs(bs=2, nq=4, embed=16, shapes=((4, 5), (2, 3)), ref_dim=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes)
    keys = int(shapes_t.prod(1).sum())
    query = torch.randn(bs, nq, embed, generator=gen)
    value = torch.randn(bs, keys, embed, generator=gen)
    pos = torch.randn(bs, nq, embed, generator=gen)
    ref = torch.rand(bs, nq, len(shapes), ref_dim, generator=gen)
    return query, value, pos, ref, shapes_t


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_forward_composition_and_batch_first(ref_dim):
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(16, 4, 2, 3, dropout=0.0, batch_first=True).eval()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.1)
    query, value, pos, ref, shapes = _module_inputs(ref_dim=ref_dim)
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[1, 3:9] = True
    out = attn(
        query,
        value=value,
        query_pos=pos,
        reference_points=ref,
        spatial_shapes=shapes,
        key_padding_mask=mask,
    )
    # By hand: project, mask, predict offsets/weights from query + pos, sample, project, residual.
    q = query + pos
    v = attn.value_proj(value).masked_fill(mask[..., None], 0).view(2, -1, 4, 4)
    off = attn.sampling_offsets(q).view(2, 4, 4, 2, 3, 2)
    w = attn.attention_weights(q).view(2, 4, 4, 6).softmax(-1).view(2, 4, 4, 2, 3)
    locs = sampling_locations_from_offsets(ref, off, shapes)
    expected = (
        attn.output_proj(multi_scale_deformable_attn_pytorch(v, shapes, None, locs, w)) + query
    )
    torch.testing.assert_close(out, expected)
    # Sequence-first layout gives the same numbers.
    attn.batch_first = False
    out_sf = attn(
        query.transpose(0, 1), value=value.transpose(0, 1), query_pos=pos.transpose(0, 1),
        reference_points=ref, spatial_shapes=shapes, key_padding_mask=mask,
    )  # fmt: skip
    torch.testing.assert_close(out_sf.transpose(0, 1), out)


def test_module_masked_values_do_not_leak():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(16, 4, 2, 3, dropout=0.0, batch_first=True).eval()
    query, value, pos, ref, shapes = _module_inputs()
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[:, 5:12] = True
    changed = value.clone()
    changed[:, 5:12] = 1e3
    kw = dict(query_pos=pos, reference_points=ref, spatial_shapes=shapes, key_padding_mask=mask)
    torch.testing.assert_close(attn(query, value=value, **kw), attn(query, value=changed, **kw))


def test_module_identity_and_value_default():
    attn = MultiScaleDeformableAttention(16, 4, 2, 3, dropout=0.0, batch_first=True).eval()
    query, value, pos, ref, shapes = _module_inputs(nq=26)  # encoder: queries are the keys
    ident = torch.zeros_like(query)
    a = attn(query, reference_points=ref, spatial_shapes=shapes, identity=ident)
    b = attn(query, value=query, reference_points=ref, spatial_shapes=shapes) - query
    torch.testing.assert_close(a, b)


def test_module_errors():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dims=30, num_heads=8)
    with pytest.warns(UserWarning, match="power of 2"):
        MultiScaleDeformableAttention(embed_dims=24, num_heads=2)
    attn = MultiScaleDeformableAttention(16, 4, 2, 3, batch_first=True)
    query, value, pos, ref, shapes = _module_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(query, value=value, reference_points=ref, spatial_shapes=shapes + 1)
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(
            query,
            value=value,
            reference_points=ref[:, :, :1],
            spatial_shapes=torch.tensor([[6, 5]]),
        )
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, value=value, reference_points=ref[:, :2], spatial_shapes=shapes)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, value=value, reference_points=torch.rand(2, 4, 2, 3), spatial_shapes=shapes)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(
            query,
            value=value,
            reference_points=ref,
            spatial_shapes=shapes,
            key_padding_mask=torch.zeros(2, 3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="query"):
        attn(query[..., :8], value=value, reference_points=ref, spatial_shapes=shapes)


def test_value_proj_ratio():
    attn = MultiScaleDeformableAttention(
        16, 4, 2, 3, dropout=0.0, batch_first=True, value_proj_ratio=2.0
    )
    assert attn.value_proj.out_features == 32 and attn.output_proj.in_features == 32
    query, value, pos, ref, shapes = _module_inputs()
    assert (
        attn(query, value=value, reference_points=ref, spatial_shapes=shapes).shape == query.shape
    )
    with pytest.raises(ValueError, match="value_proj_ratio"):
        MultiScaleDeformableAttention(16, 4, value_proj_ratio=0.2)


def test_one_dimensional_spatial_shapes_are_named():
    match = r"^spatial_shapes: expected shape \[L, 2\] \(h, w\), got \(2,\) \(one level\? use \[\[h, w\]\]\)$"
    with pytest.raises(ValueError, match=match):
        level_start_index_from_shapes(torch.tensor([4, 5]))
    value, shapes, locs, weights = _random_problem(shapes=((4, 5),))
    with pytest.raises(ValueError, match=match):
        multi_scale_deformable_attn(value, torch.tensor([4, 5]), None, locs, weights)
    attn = MultiScaleDeformableAttention(16, 4, 1, 3, batch_first=True)
    query, value, _, ref, _ = _module_inputs(shapes=((4, 5),))
    with pytest.raises(ValueError, match=match):
        attn(query, value=value, reference_points=ref, spatial_shapes=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match=match):
        attn.sample(query, value, ref, torch.tensor([4, 5]))


@pytest.mark.parametrize("batch_first", [True, False])
def test_value_batch_or_channel_mismatch_names_value(batch_first):
    attn = MultiScaleDeformableAttention(16, 4, 2, 3, batch_first=batch_first)
    query, value, _, ref, shapes = _module_inputs()  # bs 2, 26 keys, 16 channels
    if batch_first:
        layout, batch_dim = "[bs, num_keys, c]", 0
    else:
        query, value = query.transpose(0, 1), value.transpose(0, 1)
        layout, batch_dim = "[num_keys, bs, c]", 1
    three = torch.cat([value, value.narrow(batch_dim, 0, 1)], batch_dim)
    cases = [
        (
            three,
            f"value: expected batch size 2 (query's) in dim {batch_dim} of {layout}, got shape "
            f"{tuple(three.shape)}",
        ),
        (
            value[..., :8],
            f"value: expected 16 channels (embed_dims) in dim 2 of {layout}, got shape "
            f"{tuple(value[..., :8].shape)}",
        ),
        (value.select(batch_dim, 0), f"value: expected shape {layout}, got (26, 16)"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            attn(query, value=bad, reference_points=ref, spatial_shapes=shapes)


def test_triton_backend_on_cpu_names_the_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, shapes, locs, weights = _random_problem(dtype=torch.float32)
    starts = level_start_index_from_shapes(shapes)
    with pytest.raises(
        ValueError,
        match=r"^backend: 'triton' runs on CUDA tensors, got value on cpu; use backend='pytorch'",
    ):
        multi_scale_deformable_attn(value, shapes, starts, locs, weights, backend="triton")
