"""The fused GroupNorm → FiLM → SiLU → dropout kernels against the plain PyTorch formulation.

The Triton kernels run under Triton's interpreter on CPU (the ``triton_interpreter`` fixture);
the tests marked for CUDA run them compiled.
"""

import pytest
import torch

from diffrig.models import fused_norm

KERNEL_CHECK = r"""
import json
import torch
import torch.nn.functional as F
from diffrig.models import dropout
from diffrig.models.blocks import group_norm
from diffrig.models.fused_norm import norm_act


def reference(x, weight, bias, act, film_time=None, film_latent=None, keep=None, inv_keep=1.0):
    h = group_norm(x.float(), 32, weight, bias, 1e-5)
    if film_time is not None:
        ts, tshift = film_time.float()[:, :, None, None].chunk(2, dim=1)
        ls, lshift = film_latent.float()[:, :, None, None].chunk(2, dim=1)
        h = (h * (1 + ts) + tshift) * (1 + ls) + lshift
    if act:
        h = F.silu(h)
    return h if keep is None else h * keep * inv_keep


def compare(batch, channels, height, width, film, act, p=0.0, dtype=torch.float32):
    torch.manual_seed(channels + height)
    x = (torch.randn(batch, channels, height, width) * 3 + 2).to(dtype, memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(channels) + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(channels).to(dtype).requires_grad_()
    films = [torch.randn(batch, 2 * channels).to(dtype).requires_grad_() for _ in range(2)] if film else [None, None]
    torch.manual_seed(7)
    y = norm_act(x, weight, bias, 1e-5, act=act, film_time=films[0], film_latent=films[1], p=p)
    keep, inv_keep = None, 1.0
    if p:
        torch.manual_seed(7)
        seed = torch.randint(0, 2**62, (1,))
        threshold = dropout.drop_threshold(p)
        bits = torch.empty(batch, height, width, channels // 8, dtype=torch.uint8)
        dropout._keep_bits_kernel[(1,)](seed, bits, bits.numel(), threshold, BLOCK=1024)
        keep = dropout.unpack_bits(bits).permute(0, 3, 1, 2)
        inv_keep = dropout.DRAWS / (dropout.DRAWS - threshold)
    expected = reference(x, weight, bias, act, *films, keep=keep, inv_keep=inv_keep)
    grad = torch.randn_like(expected).to(dtype)
    inputs = [x, weight, bias] + ([*films] if film else [])
    got_grads = torch.autograd.grad(y, inputs, grad)
    want_grads = torch.autograd.grad(expected, inputs, grad.float())
    return {"y": (y.float() - expected).abs().max().item() / expected.abs().max().item(),
            "grads": [(g.float() - w.float()).abs().max().item() / w.float().abs().max().item()
                      for g, w in zip(got_grads, want_grads)],
            "dtypes": sorted({str(t.dtype) for t in [y, *got_grads]}),
            "channels_last": y.is_contiguous(memory_format=torch.channels_last),
            "dropped": None if keep is None else 1 - keep.float().mean().item()}


cases = {
    "norm + silu, 2 tiles": compare(2, 64, 8, 16, film=False, act=True),
    "FiLM, 3 channels a group, ragged tile": compare(2, 96, 5, 7, film=True, act=True),
    "FiLM, no activation, 12 channels a group": compare(1, 384, 9, 9, film=True, act=False),
    "plain norm": compare(3, 128, 4, 4, film=False, act=False),
    "FiLM, silu and dropout": compare(2, 64, 4, 8, film=True, act=True, p=0.3),
    "73 tiles merged in two rounds, 1 channel a group": compare(1, 32, 70, 66, film=True, act=True),
    "bfloat16 in and out": compare(2, 64, 8, 8, film=True, act=True, dtype=torch.bfloat16),
}
print(json.dumps(cases))
"""


def test_kernels_match_the_plain_formulation(triton_interpreter):
    cases = triton_interpreter(KERNEL_CHECK)
    for name, result in cases.items():
        bf16 = name.startswith("bfloat16")
        # float32 arithmetic throughout, so bfloat16 results are off by their rounding alone: under
        # 2^-7 for a truncation (the interpreter truncates where a GPU rounds to nearest), plus half
        # a step where the reference's own gradient is rounded too
        tolerance = 2**-6 if bf16 else 1e-5
        assert result["y"] < tolerance, name
        assert max(result["grads"]) < tolerance, (name, result["grads"])
        assert result["dtypes"] == ["torch.bfloat16" if bf16 else "torch.float32"], name
        assert result["channels_last"], name
    assert 0.25 < cases["FiLM, silu and dropout"]["dropped"] < 0.35


def test_usable_only_for_channels_last_cuda_tensors_outside_compile():
    x = torch.randn(2, 64, 4, 4).to(memory_format=torch.channels_last)
    assert not fused_norm.usable(x)  # CPU
    assert not fused_norm.usable(x.contiguous())
    if torch.cuda.is_available():
        assert fused_norm.usable(x.cuda())
        assert not fused_norm.usable(x.cuda().contiguous())
        assert not fused_norm.usable(torch.randn(2, 48, 4, 4, device="cuda").to(memory_format=torch.channels_last))


def test_film_comes_in_pairs():
    x = torch.randn(1, 32, 2, 2).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="both film_time and film_latent"):
        fused_norm.norm_act(x, torch.ones(32), torch.zeros(32), 1e-5, film_time=torch.zeros(1, 64))


def test_enable_fused_norm_marks_every_unet_norm_and_changes_nothing_on_cpu():
    from diffrig.models import DiffusionRigModel

    torch.manual_seed(0)
    model = DiffusionRigModel(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                              attention_resolutions="16", dropout=0.0).eval()
    noisy, buffers, latent = torch.randn(2, 3, 32, 32), torch.rand(2, 9, 32, 32), torch.randn(2, 64)
    with torch.no_grad():
        plain = model(noisy, 10, buffers, latent=latent)
        model.enable_fused_norm()
        norms = [m for m in model.unet.modules() if hasattr(m, "fused")]
        assert norms and all(m.fused for m in norms)
        assert torch.equal(model(noisy, 10, buffers, latent=latent), plain)  # CPU: the plain formulation
    model.enable_fused_norm(False)
    assert not any(m.fused for m in norms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_model_trains_as_the_plain_model_on_cuda(dtype, tolerance):
    from diffrig.models import DiffusionRigModel

    torch.manual_seed(0)
    model = DiffusionRigModel(image_size=32, num_channels=64, num_res_blocks=1, channel_mult="1,2",
                              attention_resolutions="16", dropout=0.0).cuda().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for parameter in model.unet.conv_out.parameters():
            parameter.normal_(0, 0.02)
    g = torch.Generator(device="cuda").manual_seed(1)
    noisy, buffers = (torch.randn(4, 3, 32, 32, device="cuda", generator=g),
                      torch.rand(4, 9, 32, 32, device="cuda", generator=g))
    image = torch.rand(4, 3, 32, 32, device="cuda", generator=g) * 2 - 1
    results = []
    for fused in (False, True):
        model.enable_fused_norm(fused)
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            eps = model(noisy, torch.tensor([3, 200, 500, 999], device="cuda"), buffers, image=image)
        eps.float().square().mean().backward()
        results.append((eps.float(), [p.grad.float().clone() for p in model.unet.parameters()]))
    (plain, plain_grads), (fused, fused_grads) = results
    assert (fused - plain).abs().max() <= tolerance * plain.abs().max()
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(fused_grads, plain_grads))
    assert worst < 10 * tolerance


def _triton_signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """The signature and constants that Triton's launcher builds for these arguments (its own
    ``mangle_type``: tensors as typed pointers, an integer equal to 1 as a constant, ...)."""
    from triton.runtime.jit import mangle_type

    values = {**dict(zip(kernel.arg_names, args)), **kwargs}
    signature, constants = {}, {}
    for param in kernel.params:
        value = values[param.name]
        signature[param.name] = "constexpr" if param.is_constexpr else mangle_type(value, specialize=True)
        if signature[param.name] == "constexpr":
            constants[param.name] = value
    return signature, constants


@pytest.mark.parametrize("dtype, weight_dtype, film, act, p, shape", [
    (torch.bfloat16, torch.float32, True, True, 0.1, (4, 128, 16, 16)),  # training under autocast
    (torch.bfloat16, torch.bfloat16, True, True, 0.0, (2, 96, 8, 8)),  # sampling's bf16 copy; one tile
    (torch.bfloat16, torch.float32, False, True, 0.0, (2, 64, 4, 4)),
    (torch.float32, torch.float32, True, False, 0.3, (1, 256, 12, 12)),
    (torch.float32, torch.float32, False, False, 0.0, (2, 64, 9, 9)),
])
def test_every_kernel_a_norm_launches_compiles_for_hopper_and_ampere(monkeypatch, dtype, weight_dtype, film, act, p,
                                                                      shape):
    """The kernels as they are launched, forward and backward, compiled ahead of time (PTX, then
    cubin by ptxas) for sm_90 and sm_80: no GPU needed, so a kernel that Triton cannot compile for
    a real GPU fails here rather than on the user's machine."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    launches = []

    class Recorder:  # stands in for a kernel: notes each launch instead of running it
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    names = ["_stats_kernel", "_merge_stats_kernel", "_apply_kernel", "_grad_sums_kernel", "_merge_grads_kernel",
             "_grad_input_kernel"]
    for name in names:
        monkeypatch.setattr(fused_norm, name, Recorder(getattr(fused_norm, name)))
    batch, channels = shape[:2]
    x = torch.zeros(shape, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.ones(channels, dtype=weight_dtype, requires_grad=True)
    bias = torch.zeros(channels, dtype=weight_dtype, requires_grad=True)
    films = ([torch.zeros(batch, 2 * channels, dtype=dtype, requires_grad=True) for _ in range(2)]
             if film else [None] * 2)
    y = fused_norm.norm_act(x, weight, bias, 1e-5, act=act, film_time=films[0], film_latent=films[1], p=p)
    y.backward(torch.ones_like(y))
    assert [launch[0].fn.__name__ for launch in launches] == names

    for kernel, args, kwargs in launches:
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
        signature, constants = _triton_signature(kernel, args, kwargs)
        for arch in (90, 80):
            compiled = triton_compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                                      options=options)
            assert compiled.asm["cubin"], (kernel.fn.__name__, arch)
