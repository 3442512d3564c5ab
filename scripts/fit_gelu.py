"""Fit the rational GELU of src/cifarcnn/native.cpp: where its constants come from.

    python scripts/fit_gelu.py     # prints both fits, their largest errors, C++ arrays

The kernels need the normal CDF Phi(z) (the forward: GELU(z) = z Phi(z)) and
GELU'(z) = Phi(z) + z phi(z) (the backward). Both are 1/2 plus an odd function
of z, so each is fitted as 1/2 + z P(z^2) / Q(z^2), Q's constant term 1, over
0 <= z <= 5.5 (past that the kernels clamp z: Phi is within 2e-8 of 0 or 1
there). Linearised least squares (the error times Q is linear in the
coefficients), repeated with Q from the previous round as a weight, then with
Lawson's reweighting toward the largest errors, which drives the fit toward
minimax; the round with the smallest largest error (and Q > 0) is kept. Degrees
4/4 for Phi and 5/5 for GELU' give 1.8e-6 and 1.9e-6, far below bf16's 2^-8.
"""

from __future__ import annotations

import math

import numpy as np

CLAMP = 5.5


def phi_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def gelu_grad(z: np.ndarray) -> np.ndarray:
    return phi_cdf(z) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def fit(f, num: int, den: int, rounds: int = 80) -> tuple[float, np.ndarray, np.ndarray]:
    """(largest error, P's coefficients, Q's) of f(z) ~ 1/2 + z P(z^2) / Q(z^2) on [0, 5.5]."""
    z = np.linspace(0, CLAMP, 5000)
    target = f(z) - 0.5
    t = z * z
    design = np.concatenate([np.stack([z * t**i for i in range(num)], 1),
                             np.stack([-target * t**i for i in range(1, den + 1)], 1)], 1)
    weight, q_prev, best = np.ones_like(z), np.ones_like(z), None
    for r in range(rounds):
        w = weight / q_prev
        c = np.linalg.lstsq(design * w[:, None], target * w, rcond=None)[0]
        p, q = c[:num], np.concatenate([[1.0], c[num:]])
        pv = sum(p[i] * t**i for i in range(num))
        qv = sum(q[i] * t**i for i in range(den + 1))
        err = np.abs(z * pv / qv - target)
        if qv.min() > 0 and (best is None or err.max() < best[0]):
            best = (float(err.max()), p, q)
        q_prev = np.abs(qv)
        if r >= 10:  # Lawson: weight each point by its error, toward equal-ripple errors
            weight = weight * np.sqrt(err / err.max() + 1e-3)
            weight /= weight.max()
    assert best is not None, "no fit with Q > 0 on the whole range"
    return best


FITS = (("CDF", phi_cdf, 4, 4), ("DGELU", gelu_grad, 5, 5))


def literal(v: float) -> str:
    """A C++ float literal with 9 significant digits (enough to round-trip a float)."""
    s = f"{v:.9g}"
    return f"{s}.0f" if s.lstrip("-").isdigit() else f"{s}f"


def main() -> None:
    for name, f, num, den in FITS:
        err, p, q = fit(f, num, den)
        print(f"// {name}: largest error {err:.2e} on |z| <= {CLAMP}")
        for part, c in (("P", p), ("Q", q)):
            print(f"constexpr float {name}_{part}[] = {{{', '.join(literal(v) for v in c)}}};")


if __name__ == "__main__":
    main()
