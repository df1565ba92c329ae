"""Ranges of the numeric options, checked where they enter ditq (``CalibrationConfig.validate``,
``Artifact.sample``), so a bad number is one clear line instead of NaN samples or a traceback deep in
torch.

Why each bound:

* guidance scale: finite and in ``[0, MAX_GUIDANCE_SCALE]``. NaN silently disabled guidance
  (``nan > 1`` is False) and inf turned every sample into NaN; DiT samples with 1.5 to 4, and a scale
  far beyond 100 overflows float32 on ordinary model outputs.
* seeds: non-negative and below 2**63, what every generator ditq uses accepts (torch takes up to
  2**64 - 1, calibration uses ``seed + 1``).
* steps: at least 1 and at most the scheduler's training timesteps (diffusers refuses more).
* calibration samples: each runs in one batch with its guidance twin; past ``MAX_CALIB_SAMPLES`` the
  batch no longer fits a machine's memory for any real DiT, and the failure would be an out-of-memory kill.
"""

from __future__ import annotations

import math
import numbers

from .errors import ConfigError

MAX_SEED = 2**63 - 1
MAX_GUIDANCE_SCALE = 100.0
MAX_CALIB_SAMPLES = 1024
DEFAULT_TRAIN_TIMESTEPS = 1000


def check_int(value, option: str, low: int, high: int, hint: str = "") -> int:
    """``value`` as an int in ``[low, high]`` or a ConfigError naming ``option``; ``hint`` explains the
    upper bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{option} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{option} must be at least {low}, got {value}")
    if value > high:
        raise ConfigError(f"{option} must be at most {high}, got {value}{_hint(hint)}")
    return int(value)


def check_real(value, option: str, low: float, high: float, hint: str = "") -> float:
    """``value`` as a finite float in ``[low, high]`` or a ConfigError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{option} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ConfigError(f"{option} must be a finite number in [{low:g}, {high:g}], got {number}{_hint(hint)}")
    return number


def check_guidance_scale(value) -> float:
    return check_real(value, "--guidance-scale", 0.0, MAX_GUIDANCE_SCALE, "DiT samples with 1.5 to 4; <= 1 disables it")


def check_seed(value) -> int:
    return check_int(value, "--seed", 0, MAX_SEED)


def check_steps(value, option: str, num_train_timesteps: int) -> int:
    return check_int(value, option, 1, num_train_timesteps, "the scheduler's training timesteps bound it")


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""
