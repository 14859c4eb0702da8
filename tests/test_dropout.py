"""The packed dropout mask: its bits, their unpacking, the dropout built on them, and the Triton kernel
(run by Triton's CPU interpreter, in a subprocess, since the interpreter is chosen at import)."""

import pytest
import torch

from diffrig.models.dropout import Dropout, drop_threshold, keep_bits, packable, packed_dropout, unpack_bits


def test_unpack_bits_puts_bit_j_of_byte_k_at_element_8k_plus_j():
    bits = torch.tensor([[0b00000001, 0b10000010]], dtype=torch.uint8)
    keep = unpack_bits(bits)
    assert keep.shape == (1, 16) and keep.dtype == torch.bool
    assert keep.nonzero()[:, 1].tolist() == [0, 9, 15]


def test_keep_bits_are_independent_with_the_keep_probability():
    threshold = drop_threshold(0.3)
    keep = unpack_bits(keep_bits(torch.tensor([7]), [4000, 16], threshold)).float()  # (4000, 128)
    assert keep.shape == (4000, 128)
    assert abs(keep.mean().item() - 0.7) < 0.005
    per_position = keep.mean(dim=0)  # every bit of every byte drops at the same rate
    assert (per_position - 0.7).abs().max() < 0.03
    centred = keep.flatten() - keep.mean()
    neighbour_correlation = (centred[:-1] * centred[1:]).mean() / centred.var()
    assert abs(neighbour_correlation) < 0.01


def test_keep_bits_follow_the_seed():
    first = keep_bits(torch.tensor([1]), [64, 8], 6554)
    assert torch.equal(first, keep_bits(torch.tensor([1]), [64, 8], 6554))
    assert not torch.equal(first, keep_bits(torch.tensor([2]), [64, 8], 6554))


def test_keep_bits_passes_torch_custom_op_checks():
    torch.library.opcheck(keep_bits, (torch.tensor([3]), [2, 5, 4], 1000))


def test_drop_probability_is_rounded_to_sixteen_bits():
    assert drop_threshold(0.1) == 6554
    assert drop_threshold(0.0) == 0
    assert drop_threshold(0.5) == 32768


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_dropout_scales_what_it_keeps_and_keeps_the_layout(channels_last):
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.rand(8, 16, 24, 32) + 0.5).contiguous(memory_format=layout).requires_grad_()
    y = packed_dropout(x, 0.25)
    assert y.shape == x.shape and y.is_contiguous(memory_format=layout)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)


def test_packed_dropout_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.full((64, 8, 32, 32), 3.0)
    assert abs(packed_dropout(x, 0.1).mean().item() - 3.0) < 0.01


def test_packable_needs_dense_4d_with_whole_bytes_innermost():
    assert packable(torch.zeros(2, 16, 4, 8))
    assert packable(torch.zeros(2, 16, 4, 3).contiguous(memory_format=torch.channels_last))
    assert not packable(torch.zeros(2, 16, 4, 3))
    assert not packable(torch.zeros(2, 12, 4, 8).contiguous(memory_format=torch.channels_last))
    assert not packable(torch.zeros(2, 16, 8, 4).transpose(2, 3))
    assert not packable(torch.zeros(16, 8))


def test_dropout_module_follows_train_and_eval():
    x = torch.randn(4, 32, 8, 8)
    dropout = Dropout(0.5)
    assert torch.equal(dropout.eval()(x), x)
    assert (dropout.train()(x) == 0).any()
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert "p=0.5" in repr(dropout)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_packed_dropout_compiles_around_the_custom_op():
    x = torch.randn(2, 16, 4, 8).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(packed_dropout, fullgraph=True)
    torch.manual_seed(5)
    y = compiled(x, 0.2)
    assert y.shape == x.shape
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * (65536 / (65536 - drop_threshold(0.2))))


KERNEL_CHECK = """
import json, torch
from diffrig.models.dropout import _keep_bits_kernel, drop_threshold, unpack_bits
num_bytes = 20001
out = {}
for seed in (11, 11, 12):
    bits = torch.zeros(num_bytes, dtype=torch.uint8)
    _keep_bits_kernel[(-(-num_bytes // 1024),)](torch.tensor([seed]), bits, num_bytes, drop_threshold(0.1), BLOCK=1024)
    out.setdefault(seed, []).append(bits)
keep = unpack_bits(out[11][0]).float()
print(json.dumps({"keep": keep.mean().item(), "per_bit": keep.view(-1, 8).mean(0).tolist(),
                  "same_seed_equal": torch.equal(*out[11]), "other_seed_equal": torch.equal(out[11][0], out[12][0]),
                  "last_byte_written": int(out[11][0][-1]) != 0 or int(out[11][0][-2]) != 0}))
"""


def test_triton_kernel_draws_the_keep_bits(triton_interpreter):
    result = triton_interpreter(KERNEL_CHECK)
    assert abs(result["keep"] - 0.9) < 0.005
    assert max(abs(rate - 0.9) for rate in result["per_bit"]) < 0.015
    assert result["same_seed_equal"] and not result["other_seed_equal"]
    assert result["last_byte_written"]
