"""A tilt normalisation probed before building it: each 28x28 image turned about its ink centroid so that its
ink's principal axis lies along a frame axis, with no retraining.

    python bench/experiments/principal_axis_rotation.py OUT.json CONDITIONS SHOTS [TASKS] [CHECKPOINT]
    e.g. ... out.json as-drawn,tilted 1 100      (docs/experiments.md#a-principal-axis-rotation)

A tilted drawing's second moments turn with it: its principal axis angle phi moves by the tilt. Turning every
support and query image by -phi (taken modulo 90 degrees, so that a class and its quarter-turn, which the protocol
counts as different classes, stay apart) would bring a query and its support to the same orientation whatever
their tilts, where the axis is well defined. Variants of the turn applied, for the axis angle phi reduced to
[-45, 45) degrees:

    hard     -phi                      every image canonical, but phi near +-45 flips by 90 degrees with noise
    smooth   -sin(4 phi) / 4           -phi near 0, fading to no turn near +-45 degrees, where phi is ambiguous
    gated    -phi where the ink's anisotropy (l1 - l2) / (l1 + l2) >= 0.3, else no turn

Paired with the plain pixels on the same tasks, suite validation characters, 5-way, 0 steps, each query alone.
A graph would hold the turn as a GridSample; here it is numpy's bilinear sampling, the suite's own.
"""
import sys

from maml_export.process import configure

configure()  # before Paddle loads (moment_normalisation imports it)

import numpy as np

from maml_export.suite import _sample

VARIANTS = ("plain", "hard", "smooth", "gated")


def axis_angle(x: np.ndarray):
    """x: ink [H, W] -> (phi, anisotropy, (cy, cx)): the principal axis angle in radians reduced to [-pi/4, pi/4),
    measured from the image's x axis towards +y (rows down), (l1 - l2) / (l1 + l2) of the ink's covariance, and the
    ink's centroid (the point `turn` turns about)."""
    H, W = x.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    mass = x.sum() + 1e-9
    cy, cx = (x * yy).sum() / mass, (x * xx).sum() / mass
    myy, mxx = (x * (yy - cy) ** 2).sum() / mass, (x * (xx - cx) ** 2).sum() / mass
    mxy = (x * (yy - cy) * (xx - cx)).sum() / mass
    phi = 0.5 * np.arctan2(2 * mxy, mxx - myy)
    phi = (phi + np.pi / 4) % (np.pi / 2) - np.pi / 4
    spread = np.hypot(mxx - myy, 2 * mxy)
    return phi, spread / (mxx + myy + 1e-9), (cy, cx)


def turn(x: np.ndarray, variant: str) -> np.ndarray:
    """x: ink [H, W] -> the same drawing turned about its ink centroid by the variant's angle (module docstring)."""
    phi, anisotropy, (cy, cx) = axis_angle(x)
    angle = {"plain": 0.0, "hard": -phi, "smooth": -np.sin(4 * phi) / 4,
             "gated": -phi if anisotropy >= 0.3 else 0.0}[variant]
    if angle == 0.0:
        return x
    H, W = x.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    y, x_ = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    # output pixel p reads the input at R(-angle) p: a turn by `angle` from x towards y
    return _sample(x.astype(np.float64), cos * y - sin * x_ + cy, sin * y + cos * x_ + cx).astype(np.float32)


if __name__ == "__main__":
    from moment_normalisation import paired_variants  # the same paired probe, another transformation
    paired_variants(sys.argv[1:], VARIANTS, lambda raw, variant: np.stack([[turn(d, variant) for d in char]
                                                                           for char in raw]))
