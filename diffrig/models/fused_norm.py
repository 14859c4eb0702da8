"""GroupNorm → FiLM → SiLU → dropout as Triton kernels, for the UNet run eagerly on CUDA.

Eagerly, PyTorch runs each of these as its own kernels, in float32 (an eager stage-2 step on an H200
spent most of its 93.5 ms of GPU time in them); ``torch.compile`` fuses them, but compiling a whole
training step takes minutes, much of a 5000-step stage-2 run. Here each norm is three kernels forward
(per-tile statistics, a per-group merge, one pass that normalises, modulates, activates and drops)
and three backward (per-tile gradient sums, a per-group merge, one pass that writes the input's
gradient): a dozen kernel variants in all, which Triton compiles when first used, with no graph for
Inductor to build; CUDA graphs capture them like any other kernel.

:func:`norm_act` computes, for x (B, C, H, W) in channels_last memory, with statistics over each of
32 channel groups (float32, two-level Welford merge, ``eps`` inside the square root)::

    n = (x - mean) * rstd * weight + bias                       # GroupNorm
    u = n * (1 + ts) * (1 + ls) + ts' * (1 + ls) + ls'          # FiLM by time, then by latent
    y = dropout(silu(u))                                        # each part optional

where ``(ts, ts') = film_time.chunk(2, 1)`` and ``(ls, ls') = film_latent.chunk(2, 1)`` are (B, C) each:
the ResBlock's two scale-shift modulations applied one after the other. Arithmetic is float32; the
result has x's dtype. Dropout draws its keep decisions as :mod:`diffrig.models.dropout` does (one
Philox call per 8 elements, 16-bit draws, bit j of byte k for element 8k + j in memory order, the
probability rounded to 1/65536), and the backward pass draws them again from the saved seed instead
of storing a mask. :func:`usable` says when the kernels apply; elsewhere the callers use the plain
PyTorch formulation (:mod:`diffrig.models.blocks`), which these kernels reproduce.
"""

from __future__ import annotations

import torch

from diffrig.models.dropout import DRAWS, drop_threshold

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install
    triton = None

GROUPS = 32
BLOCK_HW = 64  # positions per program
BLOCK_C = 64  # channels per program (8 bytes of dropout bits)
BLOCK_T = 64  # tiles merged per loop iteration
# warps of the per-tile kernels: with 8, none of them spills registers on sm_90 (ptxas; with 4 the
# backward pass with dropout spills 96-136 bytes a thread); their speed is not yet measured
TILE_WARPS = 8


def usable(x: torch.Tensor) -> bool:
    """Whether :func:`norm_act` runs ``x``: a 4-D CUDA float tensor in channels_last memory, outside
    ``torch.compile`` (which fuses the plain formulation itself), with Triton installed."""
    return (triton is not None and x.is_cuda and x.dim() == 4 and x.is_floating_point()
            and x.shape[1] % GROUPS == 0 and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling())


if triton is not None:

    @triton.jit
    def _tile(b, t, cblock, HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Offsets (BLOCK_HW, BLOCK_C/8, 8) of a tile of channels_last (B, HW, C) memory, its mask,
        its channel indices (BLOCK_C/8, 8) and their mask."""
        rows = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
        chans = cblock * BLOCK_C + tl.arange(0, BLOCK_C // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
        cmask = chans < C
        offsets = ((b.to(tl.int64) * HW + rows) * C)[:, None, None] + chans[None, :, :]
        mask = (rows < HW)[:, None, None] & cmask[None, :, :]
        return offsets, mask, chans, cmask

    @triton.jit
    def _keep(seed_ptr, offsets, threshold):
        """Keep decisions for elements at ``offsets`` (.., 8), whose last axis is the 8 bits of a byte."""
        byte = tl.max(offsets, axis=2) // 8  # the 8 elements of a byte share its Philox counter
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), byte)
        bit = tl.arange(0, 8)[None, None, :]
        word = tl.where(bit < 2, r0[:, :, None], tl.where(bit < 4, r1[:, :, None],
                        tl.where(bit < 6, r2[:, :, None], r3[:, :, None])))
        return ((word >> ((bit & 1) * 16).to(tl.uint32)) & 0xFFFF) >= threshold

    @triton.jit
    def _pre_activation(x_ptr, coef_ptr, b, t, cblock, HW, C,
                        BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """u = (x - mean) * A + B for one tile, from the (4, B, C) coefficients mean, rstd, A, B; also
        x - mean and rstd."""
        offsets, mask, chans, cmask = _tile(b, t, cblock, HW, C, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        at = b * C + chans
        plane = tl.num_programs(2) * C
        mean = tl.load(coef_ptr + at, mask=cmask, other=0.0)[None, :, :]
        rstd = tl.load(coef_ptr + plane + at, mask=cmask, other=0.0)[None, :, :]
        scale = tl.load(coef_ptr + 2 * plane + at, mask=cmask, other=0.0)[None, :, :]
        shift = tl.load(coef_ptr + 3 * plane + at, mask=cmask, other=0.0)[None, :, :]
        centred = x - mean
        return centred * scale + shift, centred, rstd, offsets, mask, chans, cmask

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, HW, C, T, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        t, cblock, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offsets, mask, chans, cmask = _tile(b, t, cblock, HW, C, BLOCK_HW, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(HW - t * BLOCK_HW, BLOCK_HW).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        centred = tl.where(mask, x - mean[None, :, :], 0.0)
        at = (b * T + t) * C + chans
        tl.store(mean_ptr + at, mean, mask=cmask)
        tl.store(m2_ptr + at, tl.sum(centred * centred, axis=0), mask=cmask)

    @triton.jit
    def _film(film_ptr, b, chans, cmask, C):
        scale = tl.load(film_ptr + b * 2 * C + chans, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.load(film_ptr + b * 2 * C + C + chans, mask=cmask, other=0.0).to(tl.float32)
        return scale, shift

    @triton.jit
    def _merge_stats_kernel(mean_ptr, m2_ptr, weight_ptr, bias_ptr, time_ptr, latent_ptr, coef_ptr,
                            HW, C, T, per_group, group_size, eps, HAS_FILM: tl.constexpr, BLOCK_HW: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
        b, g = tl.program_id(0), tl.program_id(1)
        lanes = tl.arange(0, BLOCK_G)
        cmask = lanes < per_group
        chans = g * per_group + lanes
        total = tl.zeros([BLOCK_G], tl.float32)
        for start in range(0, T, BLOCK_T):
            tiles = start + tl.arange(0, BLOCK_T)
            count = tl.minimum(HW - tiles * BLOCK_HW, BLOCK_HW).to(tl.float32)
            m = tl.load(mean_ptr + (b * T + tiles)[:, None] * C + chans[None, :],
                        mask=(tiles < T)[:, None] & cmask[None, :], other=0.0)
            total += tl.sum(m * count[:, None], axis=0)
        group_mean = tl.sum(total, axis=0) / group_size
        spread = tl.zeros([BLOCK_G], tl.float32)
        for start in range(0, T, BLOCK_T):
            tiles = start + tl.arange(0, BLOCK_T)
            count = tl.minimum(HW - tiles * BLOCK_HW, BLOCK_HW).to(tl.float32)
            valid = (tiles < T)[:, None] & cmask[None, :]
            at = (b * T + tiles)[:, None] * C + chans[None, :]
            m = tl.load(mean_ptr + at, mask=valid, other=0.0)
            m2 = tl.load(m2_ptr + at, mask=valid, other=0.0)
            deviation = m - group_mean
            spread += tl.sum(tl.where(valid, m2 + count[:, None] * deviation * deviation, 0.0), axis=0)
        rstd = 1.0 / tl.sqrt(tl.sum(spread, axis=0) / group_size + eps)
        weight = tl.load(weight_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
        if HAS_FILM:
            ts, tshift = _film(time_ptr, b, chans, cmask, C)
            ls, lshift = _film(latent_ptr, b, chans, cmask, C)
            scale = (1 + ts) * (1 + ls)
            shift = tshift * (1 + ls) + lshift
        else:
            scale, shift = 1.0, 0.0
        at = b * C + chans
        plane = tl.num_programs(0) * C
        tl.store(coef_ptr + at, group_mean + tl.zeros([BLOCK_G], tl.float32), mask=cmask)
        tl.store(coef_ptr + plane + at, rstd + tl.zeros([BLOCK_G], tl.float32), mask=cmask)
        tl.store(coef_ptr + 2 * plane + at, rstd * weight * scale, mask=cmask)
        tl.store(coef_ptr + 3 * plane + at, bias * scale + shift, mask=cmask)

    @triton.jit
    def _apply_kernel(x_ptr, y_ptr, coef_ptr, seed_ptr, HW, C, threshold, inv_keep, ACT: tl.constexpr,
                      DROPOUT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        t, cblock, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        u, _, _, offsets, mask, _, _ = _pre_activation(x_ptr, coef_ptr, b, t, cblock, HW, C, BLOCK_HW, BLOCK_C)
        y = u * tl.sigmoid(u) if ACT else u
        if DROPOUT:
            y = tl.where(_keep(seed_ptr, offsets, threshold), y * inv_keep, 0.0)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_pre_activation(x_ptr, dy_ptr, coef_ptr, seed_ptr, b, t, cblock, HW, C, threshold, inv_keep,
                             ACT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_HW: tl.constexpr,
                             BLOCK_C: tl.constexpr):
        u, centred, rstd, offsets, mask, chans, cmask = _pre_activation(x_ptr, coef_ptr, b, t, cblock, HW, C,
                                                                        BLOCK_HW, BLOCK_C)
        grad = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            grad = tl.where(_keep(seed_ptr, offsets, threshold), grad * inv_keep, 0.0)
        if ACT:
            sig = tl.sigmoid(u)
            grad = grad * sig * (1 + u * (1 - sig))
        return tl.where(mask, grad, 0.0), centred, rstd, offsets, mask, chans, cmask

    @triton.jit
    def _grad_sums_kernel(x_ptr, dy_ptr, coef_ptr, seed_ptr, sums_ptr, HW, C, T, threshold, inv_keep,
                          ACT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_HW: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        t, cblock, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        du, centred, rstd, _, _, chans, cmask = _grad_pre_activation(
            x_ptr, dy_ptr, coef_ptr, seed_ptr, b, t, cblock, HW, C, threshold, inv_keep, ACT, DROPOUT,
            BLOCK_HW, BLOCK_C)
        at = (b * T + t) * C + chans
        tl.store(sums_ptr + at, tl.sum(du, axis=0), mask=cmask)
        tl.store(sums_ptr + tl.num_programs(2) * T * C + at, tl.sum(du * centred * rstd, axis=0), mask=cmask)

    @triton.jit
    def _merge_grads_kernel(sums_ptr, coef_ptr, weight_ptr, bias_ptr, time_ptr, latent_ptr, dtime_ptr,
                            dlatent_ptr, daffine_ptr, C, T, per_group, group_size, HAS_FILM: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
        b, g = tl.program_id(0), tl.program_id(1)
        batch = tl.num_programs(0)
        lanes = tl.arange(0, BLOCK_G)
        cmask = lanes < per_group
        chans = g * per_group + lanes
        sum_du = tl.zeros([BLOCK_G], tl.float32)  # Σ over positions of dL/du
        sum_du_n = tl.zeros([BLOCK_G], tl.float32)  # Σ of dL/du · normalised x
        for start in range(0, T, BLOCK_T):
            tiles = start + tl.arange(0, BLOCK_T)
            valid = (tiles < T)[:, None] & cmask[None, :]
            at = (b * T + tiles)[:, None] * C + chans[None, :]
            sum_du += tl.sum(tl.load(sums_ptr + at, mask=valid, other=0.0), axis=0)
            sum_du_n += tl.sum(tl.load(sums_ptr + batch * T * C + at, mask=valid, other=0.0), axis=0)
        weight = tl.load(weight_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
        if HAS_FILM:
            ts, tshift = _film(time_ptr, b, chans, cmask, C)
            ls, lshift = _film(latent_ptr, b, chans, cmask, C)
            scale = (1 + ts) * (1 + ls)
            dscale = weight * sum_du_n + bias * sum_du  # Σ dL/du · n
            row = b * 2 * C
            tl.store(dtime_ptr + row + chans, dscale * (1 + ls), mask=cmask)
            tl.store(dtime_ptr + row + C + chans, sum_du * (1 + ls), mask=cmask)
            tl.store(dlatent_ptr + row + chans, dscale * (1 + ts) + sum_du * tshift, mask=cmask)
            tl.store(dlatent_ptr + row + C + chans, sum_du, mask=cmask)
        else:
            scale = tl.full([BLOCK_G], 1.0, tl.float32)
        at = b * C + chans
        plane = batch * C
        tl.store(daffine_ptr + at, scale * sum_du_n, mask=cmask)  # this sample's share of dL/dweight
        tl.store(daffine_ptr + plane + at, scale * sum_du, mask=cmask)  # ... and of dL/dbias
        mean_dxhat = tl.sum(weight * scale * sum_du, axis=0) / group_size
        mean_dxhat_xhat = tl.sum(weight * scale * sum_du_n, axis=0) / group_size
        rstd = tl.load(coef_ptr + plane + at, mask=cmask, other=0.0)
        # dL/dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) = du A + (x - mean) beta + gamma
        tl.store(daffine_ptr + 2 * plane + at, -rstd * rstd * mean_dxhat_xhat, mask=cmask)
        tl.store(daffine_ptr + 3 * plane + at, -rstd * mean_dxhat, mask=cmask)

    @triton.jit
    def _grad_input_kernel(x_ptr, dy_ptr, coef_ptr, seed_ptr, daffine_ptr, dx_ptr, HW, C, threshold, inv_keep,
                           ACT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_HW: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        t, cblock, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        du, centred, _, offsets, mask, chans, cmask = _grad_pre_activation(
            x_ptr, dy_ptr, coef_ptr, seed_ptr, b, t, cblock, HW, C, threshold, inv_keep, ACT, DROPOUT,
            BLOCK_HW, BLOCK_C)
        at = b * C + chans
        plane = tl.num_programs(2) * C
        scale = tl.load(coef_ptr + 2 * plane + at, mask=cmask, other=0.0)[None, :, :]
        beta = tl.load(daffine_ptr + 2 * plane + at, mask=cmask, other=0.0)[None, :, :]
        gamma = tl.load(daffine_ptr + 3 * plane + at, mask=cmask, other=0.0)[None, :, :]
        dx = du * scale + centred * beta + gamma
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, channels: int, hw: int) -> tuple[int, int, int]:
    return (triton.cdiv(hw, BLOCK_HW), triton.cdiv(channels, BLOCK_C), batch)


def _group_block(per_group: int) -> int:
    return max(16, triton.next_power_of_2(per_group))


class _NormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, film_time, film_latent, eps: float, act: bool, p: float):
        batch, channels, height, width = x.shape
        hw, per_group = height * width, channels // GROUPS
        tiles = triton.cdiv(hw, BLOCK_HW)
        has_film = film_time is not None
        film_time = film_time.contiguous() if has_film else weight
        film_latent = film_latent.contiguous() if has_film else weight
        partial = torch.empty(2, batch, tiles, channels, device=x.device, dtype=torch.float32)
        coef = torch.empty(4, batch, channels, device=x.device, dtype=torch.float32)  # mean, rstd, A, B
        _stats_kernel[_grid(batch, channels, hw)](x, partial[0], partial[1], hw, channels, tiles,
                                                  BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=TILE_WARPS)
        _merge_stats_kernel[(batch, GROUPS)](partial[0], partial[1], weight, bias, film_time, film_latent, coef,
                                             hw, channels, tiles, per_group, float(per_group * hw), eps,
                                             HAS_FILM=has_film,
                                             BLOCK_HW=BLOCK_HW, BLOCK_T=BLOCK_T, BLOCK_G=_group_block(per_group))
        threshold = drop_threshold(p)
        dropout = threshold > 0
        seed = torch.randint(0, 2**62, (1,), device=x.device) if dropout else coef
        inv_keep = DRAWS / (DRAWS - threshold)
        y = torch.empty_like(x)
        _apply_kernel[_grid(batch, channels, hw)](x, y, coef, seed, hw, channels, threshold, inv_keep, ACT=act,
                                                  DROPOUT=dropout, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C,
                                                  num_warps=TILE_WARPS)
        ctx.save_for_backward(x, weight, bias, film_time, film_latent, coef, seed)
        ctx.config = (has_film, act, threshold, inv_keep)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, film_time, film_latent, coef, seed = ctx.saved_tensors
        has_film, act, threshold, inv_keep = ctx.config
        batch, channels, height, width = x.shape
        hw, per_group = height * width, channels // GROUPS
        tiles = triton.cdiv(hw, BLOCK_HW)
        dy = dy.contiguous(memory_format=torch.channels_last)
        dropout = threshold > 0
        sums = torch.empty(2, batch, tiles, channels, device=x.device, dtype=torch.float32)
        _grad_sums_kernel[_grid(batch, channels, hw)](x, dy, coef, seed, sums, hw, channels, tiles, threshold,
                                                      inv_keep, ACT=act, DROPOUT=dropout, BLOCK_HW=BLOCK_HW,
                                                      BLOCK_C=BLOCK_C, num_warps=TILE_WARPS)
        daffine = torch.empty(4, batch, channels, device=x.device, dtype=torch.float32)  # dw, db shares; beta, gamma
        dtime = torch.empty(batch, 2 * channels, device=x.device, dtype=torch.float32) if has_film else daffine
        dlatent = torch.empty_like(dtime) if has_film else daffine
        _merge_grads_kernel[(batch, GROUPS)](sums, coef, weight, bias, film_time, film_latent, dtime, dlatent,
                                             daffine, channels, tiles, per_group, float(per_group * hw),
                                             HAS_FILM=has_film,
                                             BLOCK_T=BLOCK_T, BLOCK_G=_group_block(per_group))
        dx = torch.empty_like(x)
        _grad_input_kernel[_grid(batch, channels, hw)](x, dy, coef, seed, daffine, dx, hw, channels, threshold,
                                                       inv_keep, ACT=act, DROPOUT=dropout, BLOCK_HW=BLOCK_HW,
                                                       BLOCK_C=BLOCK_C, num_warps=TILE_WARPS)
        daffine_sum = daffine[:2].sum(dim=1)
        dweight, dbias = daffine_sum[0].to(weight.dtype), daffine_sum[1].to(bias.dtype)
        if not has_film:
            return dx, dweight, dbias, None, None, None, None, None
        return dx, dweight, dbias, dtime.to(film_time.dtype), dlatent.to(film_latent.dtype), None, None, None


def norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, act: bool = False,
             film_time: torch.Tensor | None = None, film_latent: torch.Tensor | None = None,
             p: float = 0.0) -> torch.Tensor:
    """GroupNorm (32 groups) of x (B, C, H, W), then the FiLMs by ``film_time`` and ``film_latent``
    ((B, 2C) each, scale then shift; both or neither), SiLU when ``act``, dropout with probability
    ``p``; see the module docstring. x must pass :func:`usable`."""
    if (film_time is None) != (film_latent is None):
        raise ValueError("pass both film_time and film_latent, or neither")
    return _NormAct.apply(x, weight, bias, film_time, film_latent, float(eps), bool(act), float(p))
