"""Noise schedule, P2-weighted training loss and samplers of DiffusionRig.

The official model is a 1000-step DDPM with the linear β schedule of Ho et al., trained to predict
ε with uniformly drawn timesteps and the P2 loss weight 1 / (k + SNR(t))^γ (γ = k = 1), and sampled
with deterministic DDIM (η = 0) over the "ddim20" timesteps {0, 50, ..., 950}, clipping the x₀
prediction to [-1, 1]. The model sees the original (unscaled) integer timestep.

Precision: ᾱ and every coefficient derived from it are computed in float64 and cast to the sample
dtype only when applied, as the official code does. diffusers keeps ᾱ in float32, where 1 - ᾱ loses
about three significant digits at small t (ᾱ₀ = 0.9999): enough to move the P2 weight and the noised
input by ~1e-4 relative. So the exact paths (noising, loss, DDIM, inversion) use this module's
float64 schedule; the other samplers are diffusers schedulers configured with the same betas.

Model call convention: ``model(noisy (B,3,H,W), timesteps (B,), buffers (B,9,H,W), latent=None,
image=None) -> eps (B,3,H,W)``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import cached_property

import diffusers
import torch
from tqdm.auto import tqdm

from diffrig.errors import DiffrigError

# Short names for diffusers schedulers; any diffusers scheduler class name is accepted as well.
SCHEDULER_ALIASES = {
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
EXACT_DDIM = "ddim"  # this module's DDIM: official spacing, clipping and float64 coefficients


@dataclass(frozen=True)
class NoiseSchedule:
    """A linear-β diffusion process and the P2 loss weight; build it with :func:`make_schedule`."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p2_gamma: float = 1.0
    p2_k: float = 1.0

    @cached_property
    def betas(self) -> torch.Tensor:
        """(T,) float64."""
        return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t, (T,) float64."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t as a Python float; t = -1 means the clean image (ᾱ = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def add_noise(self, image: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x₀ + sqrt(1 - ᾱ_t) ε; image, noise (B,C,H,W), timesteps (B,) long."""
        acp = self.alphas_cumprod
        return _per_sample(acp.sqrt(), timesteps, image) * image + _per_sample((1 - acp).sqrt(), timesteps, image) * noise

    def p2_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """1 / (k + SNR(t))^γ with SNR = ᾱ / (1 - ᾱ); timesteps (B,) -> (B,) float32."""
        acp = self.alphas_cumprod
        weight = (self.p2_k + acp / (1 - acp)) ** -self.p2_gamma
        return weight[timesteps.cpu()].to(device=timesteps.device, dtype=torch.float32)

    def diffusers_config(self) -> dict:
        """Keyword arguments that give a diffusers scheduler these betas and ε-prediction."""
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule="linear",
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type="epsilon",
            clip_sample=True,
            clip_sample_range=1.0,
            variance_type="fixed_large",  # the official ancestral sampler's variance (β_t)
        )


def make_schedule(num_train_timesteps: int = 1000, p2_gamma: float = 1.0, p2_k: float = 1.0) -> NoiseSchedule:
    """The official linear schedule: β from 1e-4 to 0.02 at 1000 steps, scaled by 1000 / T otherwise."""
    if num_train_timesteps < 2:
        raise DiffrigError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    scale = 1000.0 / num_train_timesteps
    return NoiseSchedule(num_train_timesteps, scale * 1e-4, scale * 0.02, float(p2_gamma), float(p2_k))


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[timesteps] in like's dtype/device, shaped (B,1,...,1) to broadcast against like."""
    picked = values[timesteps.cpu()].to(device=like.device, dtype=like.dtype)
    return picked.view(-1, *([1] * (like.dim() - 1)))


def sample_timesteps(batch_size: int, schedule: NoiseSchedule, device=None, generator=None) -> torch.Tensor:
    """Uniform training timesteps, (B,) long in [0, T)."""
    t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=generator)
    return t.to(device)


def training_loss(model, image, buffers, timesteps, noise, latent=None, schedule: NoiseSchedule | None = None):
    """Per-sample P2-weighted ε-MSE, as the official ``training_losses(...)["loss"]``.

    image (B,3,H,W) in [-1,1], buffers (B,9,H,W), timesteps (B,) long, noise (B,3,H,W) -> (B,).
    Without ``latent`` the model encodes it from the clean ``image``, as in official training.
    """
    schedule = schedule or make_schedule()
    noisy = schedule.add_noise(image, noise, timesteps)
    if latent is None:
        eps = model(noisy, timesteps, buffers, image=image)
    else:
        eps = model(noisy, timesteps, buffers, latent=latent)
    mse = (noise.float() - eps.float()).pow(2).mean(dim=tuple(range(1, noise.dim())))
    return schedule.p2_weight(timesteps).to(mse.device) * mse


def respaced_timesteps(spec: str | int, num_train_timesteps: int = 1000) -> list[int]:
    """The kept timesteps, ascending, for an official ``timestep_respacing`` value.

    "ddimN": range(0, T, s) with s the smallest integer stride giving exactly N steps; "ddim20"
    at T = 1000 is [0, 50, ..., 950]. "a,b,c" (or an int): T split into that many sections of
    near-equal size, each keeping its first and last step and evenly rounded ones between.
    """
    text = str(spec).strip()
    try:
        if text.startswith("ddim"):
            count = int(text[4:])
            for stride in range(1, num_train_timesteps):
                if len(range(0, num_train_timesteps, stride)) == count:
                    return list(range(0, num_train_timesteps, stride))
            raise DiffrigError(f"no integer stride splits {num_train_timesteps} timesteps into exactly "
                               f"{count} DDIM steps; choose another number of steps (e.g. 10, 20, 25, 50)")
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise DiffrigError(f"cannot read timestep respacing {spec!r}: use 'ddimN' or comma-separated "
                           "step counts like '10,20'") from None
    size, extra = divmod(num_train_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if not 1 <= count <= length:
            raise DiffrigError(f"cannot take {count} steps from a section of {length} timesteps")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(j * stride) for j in range(count)]
        start += length
    return sorted(set(steps))


def ddim_step(sample, eps, alpha_bar_from: float, alpha_bar_to: float, clip_sample: bool = True):
    """One deterministic DDIM move (η = 0) from noise level ᾱ_from to ᾱ_to, in either direction.

    x₀ = (x - sqrt(1-ᾱ_from) ε) / sqrt(ᾱ_from), clipped to [-1,1] with ε re-derived from the
    clipped x₀; returns (sqrt(ᾱ_to) x₀ + sqrt(1-ᾱ_to) ε, x₀), each shaped like ``sample``.
    From ᾱ_from = 1 (a clean image) x₀ is the sample itself and ε is used as given.
    """
    eps = eps.to(sample.dtype)
    if alpha_bar_from >= 1.0:
        pred_x0 = sample.clamp(-1.0, 1.0) if clip_sample else sample
        return math.sqrt(alpha_bar_to) * pred_x0 + math.sqrt(1.0 - alpha_bar_to) * eps, pred_x0
    recip = math.sqrt(1.0 / alpha_bar_from)
    recip_m1 = math.sqrt(1.0 / alpha_bar_from - 1.0)
    pred_x0 = recip * sample - recip_m1 * eps
    if clip_sample:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
        eps = (recip * sample - pred_x0) / recip_m1
    return math.sqrt(alpha_bar_to) * pred_x0 + math.sqrt(1.0 - alpha_bar_to) * eps, pred_x0


def _ddim_timesteps(schedule, num_inference_steps, timestep_respacing) -> list[int]:
    spec = timestep_respacing if timestep_respacing is not None else f"ddim{int(num_inference_steps)}"
    return respaced_timesteps(spec, schedule.num_train_timesteps)


def _eps(model, x, t: torch.Tensor, buffers, latent):
    return model(x, t.expand(x.shape[0]), buffers, latent=latent)


@torch.no_grad()
def sample(model, buffers, latent, noise, num_inference_steps: int = 20, scheduler=EXACT_DDIM,
           schedule: NoiseSchedule | None = None, timestep_respacing: str | None = None,
           clip_sample: bool = True, generator: torch.Generator | None = None, progress: bool = False):
    """Denoise ``noise`` (B,3,H,W) = x_T into images (B,3,H,W) conditioned on buffers and latent (B,64).

    ``scheduler`` "ddim" (default) reproduces the official ``ddim_sample_loop`` over the official
    spacing (``timestep_respacing`` such as "ddim20" overrides ``num_inference_steps``); any other
    value is a diffusers scheduler (alias from ``SCHEDULER_ALIASES``, class name or instance),
    configured with the same betas and run for ``num_inference_steps``. ``latent`` comes from
    ``model.encode_latent(image)``; ``generator`` seeds the noise of ancestral diffusers schedulers.
    """
    schedule = schedule or make_schedule()
    if not (isinstance(scheduler, str) and scheduler.lower() == EXACT_DDIM):
        if timestep_respacing is not None:
            raise DiffrigError("timestep_respacing applies to the 'ddim' sampler only; "
                               "give other schedulers num_inference_steps")
        return _sample_diffusers(model, buffers, latent, noise, num_inference_steps, scheduler,
                                 schedule, generator, progress)
    timesteps = _ddim_timesteps(schedule, num_inference_steps, timestep_respacing)
    x = noise
    previous = [-1] + timesteps[:-1]
    for t, t_prev in tqdm(list(zip(timesteps, previous))[::-1], disable=not progress, desc="DDIM", leave=False):
        eps = _eps(model, x, torch.tensor([t], device=x.device), buffers, latent)
        x, _ = ddim_step(x, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), clip_sample)
    return x


@torch.no_grad()
def ddim_invert(model, image, buffers, latent, num_inference_steps: int = 20,
                schedule: NoiseSchedule | None = None, timestep_respacing: str | None = None,
                clip_sample: bool = True, progress: bool = False):
    """Deterministic DDIM inversion of image (B,3,H,W) in [-1,1] into the x_T that ``sample`` starts from.

    Mirrors the sampler step by step: it leaves the clean image (ᾱ = 1) for the first kept
    timestep, then climbs one kept timestep at a time up to the last one, where the sampler starts.
    The step from level s to level t evaluates the model at (x_s, t), the timestep whose ε the
    sampler will use for the reverse move (as diffusers' ``DDIMInverseScheduler``; guided-diffusion's
    ``ddim_reverse_sample`` uses (x_s, s) and starts from ᾱ₀ instead of 1). So when ε does not
    depend on x, ``sample(ddim_invert(x))`` returns x exactly; for real models it is close.
    """
    schedule = schedule or make_schedule()
    timesteps = _ddim_timesteps(schedule, num_inference_steps, timestep_respacing)
    x = image
    previous = [-1] + timesteps[:-1]
    for t_prev, t in tqdm(list(zip(previous, timesteps)), disable=not progress, desc="DDIM inversion", leave=False):
        eps = _eps(model, x, torch.tensor([t], device=x.device), buffers, latent)
        x, _ = ddim_step(x, eps, schedule.alpha_bar(t_prev), schedule.alpha_bar(t), clip_sample)
    return x


def make_scheduler(name_or_scheduler, schedule: NoiseSchedule | None = None):
    """A diffusers scheduler with this schedule's betas: an alias, a diffusers class name, or an instance."""
    if not isinstance(name_or_scheduler, str):
        return name_or_scheduler
    class_name = SCHEDULER_ALIASES.get(name_or_scheduler.lower(), name_or_scheduler)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        names = ", ".join([EXACT_DDIM, *SCHEDULER_ALIASES])
        raise DiffrigError(f"unknown scheduler {name_or_scheduler!r}: use one of {names} "
                           "or a diffusers scheduler class name such as 'DDIMScheduler'")
    accepted = inspect.signature(cls.__init__).parameters
    config = (schedule or make_schedule()).diffusers_config()
    return cls(**{key: value for key, value in config.items() if key in accepted})


def _sample_diffusers(model, buffers, latent, noise, num_inference_steps, scheduler, schedule, generator, progress):
    scheduler = make_scheduler(scheduler, schedule)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    step_accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if step_accepts_generator else {}
    x = noise * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress, desc=type(scheduler).__name__, leave=False):
        eps = _eps(model, scheduler.scale_model_input(x, t), t.reshape(1), buffers, latent)
        x = scheduler.step(eps.to(x.dtype), t, x, **extra).prev_sample
    return x


def seeded_noise(shape, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal x_T drawn on the CPU from ``seed``, so a seed gives the same noise on every device."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)
