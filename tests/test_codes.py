"""RigCodes: DECA's 236-value layout, batching helpers."""

import pytest
import torch

from diffrig.deca.codes import CODE_DIM, CODE_SIZES, RigCodes


def test_layout_is_decas():
    assert list(CODE_SIZES) == ["shape", "tex", "exp", "pose", "cam", "light"]
    assert CODE_DIM == 236


def test_split_follows_decas_order_and_light_is_coefficient_major():
    flat = torch.arange(2 * 236, dtype=torch.float32).reshape(2, 236)
    codes = RigCodes.from_flat(flat)
    assert codes.shape.shape == (2, 100) and codes.tex.shape == (2, 50) and codes.exp.shape == (2, 50)
    assert codes.pose.shape == (2, 6) and codes.cam.shape == (2, 3) and codes.light.shape == (2, 9, 3)
    assert codes.tex[0, 0] == 100 and codes.exp[0, 0] == 150 and codes.pose[0, 0] == 200
    assert codes.cam[1].tolist() == [236 + 206, 236 + 207, 236 + 208]
    # light (9 SH, RGB): the 27 values run R, G, B of coefficient 0 first
    assert codes.light[0, 0].tolist() == [209, 210, 211] and codes.light[0, 1, 0] == 212
    assert torch.equal(codes.flat(), flat)


def test_light_may_be_given_flat():
    codes = RigCodes.from_flat(torch.randn(1, 236))
    again = codes.replace(light=codes.light.reshape(1, 27))
    assert again.light.shape == (1, 9, 3) and torch.equal(again.light, codes.light)


def test_batch_helpers():
    a, b = RigCodes.from_flat(torch.randn(2, 236)), RigCodes.from_flat(torch.randn(3, 236))
    both = RigCodes.cat([a, b])
    assert len(both) == 5
    assert torch.equal(both[2:].flat(), b.flat())
    assert both[0].batch_size == 1 and torch.equal(both[-1].flat(), b[2].flat())
    swapped = a.replace(light=b[:2].light)
    assert torch.equal(swapped.light, b.light[:2]) and torch.equal(swapped.shape, a.shape)
    copy = a.clone()
    copy.pose.zero_()
    assert a.pose.abs().sum() > 0
    assert a.to(torch.float64).cam.dtype == torch.float64
    assert set(a.as_dict()) == set(CODE_SIZES)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="236"):
        RigCodes.from_flat(torch.zeros(2, 235))
    codes = RigCodes.from_flat(torch.zeros(2, 236))
    with pytest.raises(ValueError, match="pose"):
        codes.replace(pose=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cam"):
        codes.replace(cam=torch.zeros(1, 3))


def test_single_faces_mixed_batches_and_indices_get_clear_errors():
    flat = torch.zeros(2, 236)
    fields = dict(zip(CODE_SIZES, flat.split(list(CODE_SIZES.values()), dim=1)))
    with pytest.raises(ValueError, match=r"shape must be a batch \(B, 100\).*\[None\]"):
        RigCodes(**{**fields, "shape": torch.zeros(100)})
    with pytest.raises(ValueError, match="same faces: shape has 2, light 1"):
        RigCodes(**{**fields, "light": torch.zeros(1, 27)})
    codes = RigCodes(**fields)
    with pytest.raises(IndexError, match="face 2 is out of range for 2 faces"):
        codes[2]
    assert codes[-2].batch_size == 1 and codes[0:0].batch_size == 0
