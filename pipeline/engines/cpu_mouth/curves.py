"""The two curves the engine shapes everything with: a smoothstep and a polynomial."""
from __future__ import annotations

from typing import TypeAlias, overload

import numpy as np
import numpy.typing as npt

F32: TypeAlias = npt.NDArray[np.float32]  # the render path computes in float32 throughout


@overload
def smoothstep(t: float) -> float: ...


@overload
def smoothstep(t: F32) -> F32: ...


def smoothstep(t: float | F32) -> float | F32:
    """3t² - 2t³ of ``t`` clipped to 0..1: 0 at or below 0, 1 at or above 1, flat at both.

    Callers scale their input so that 0 and 1 are the edges. An array is clipped in
    place (every caller passes a temporary), which saves a copy per call on the render
    path; a float stays in plain Python, which is faster than NumPy for one number.
    """
    if isinstance(t, np.ndarray):
        np.clip(t, 0.0, 1.0, out=t)
        return t * t * (3.0 - 2.0 * t)
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def polyval(coeffs: F32, x: F32) -> F32:
    """``np.polyval`` by Horner's rule in place: one buffer instead of two temporaries
    per coefficient, in the dtype of ``x``."""
    out = np.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        out *= x
        out += c
    return out
