"""Synthetic industrial-CT scans of metal parts with exactly known defects (the embedded demo data).

A phantom is a metal part with defects of known type and place, scanned by a simulated CT acquisition. The
ground truth is exact because the generator decides where every defect is; the grey values look like a real
scan because they come out of a simulated measurement, not a drawing. Small models are trained on these volumes
and the attribution methods are judged on them, so a phantom must show what real scans show: blurred edges,
noise, beam hardening, rings and streaks, and defects that differ from the metal by contrast, not by a flag.

What is simulated, in order:

1. **Part.** An aerospace-like titanium part (``bracket``, ``blade_root``, ``flange`` or ``coupon``, see
   :data:`PART_KINDS`) described by a signed-distance function (SDF): rounded edges, fillets (smooth unions, coves),
   bolt holes, thin walls and ribs. Proportions, holes, position and orientation (any turn about the rotation
   axis, a tilt of up to 10 degrees) are drawn from the seed; the part is scaled to fill most of the volume.
2. **Defects** inside the metal, never closer than two voxels to the surface or to each other (see
   :data:`DEFECT_TYPES`): gas pores (slightly ellipsoidal), lack-of-fusion voids (flat, irregular, lying in the
   part's build layers), cracks (thin wavy facets with branches), tungsten-rich inclusions (a W-Ti mixture,
   15-60 % tungsten by volume) and alumina inclusions (angular or rounded oxide particles).
3. **Partial volume.** Each voxel holds the fraction of each material it contains (titanium alloy, tungsten,
   alumina; the rest is air), from 27 sub-samples wherever a surface crosses the voxel. A voxel belongs to a
   defect in the ground truth when at least half of it is defect.
4. **Acquisition**, one axial (constant k) slice at a time, with the rotation axis along k: exact
   area-weighted parallel-beam projection over 180 degrees; a polychromatic tube spectrum (Kramers' law, copper
   pre-filter, energy-integrating detector) with tabulated energy-dependent attenuation of each material, which
   gives beam hardening (cupping, dark streaks between dense features); detector blur along both detector axes;
   scattered radiation; per-detector-element gain errors left after flat-field correction (rings); Poisson
   photon noise and electronic noise; photon starvation behind tungsten (counts floored at one).
5. **Reconstruction** as industrial CT software does it: a partial beam-hardening correction that linearises
   titanium (so some cupping stays, and tungsten is over-corrected), filtered back-projection (ramp filter
   with a Shepp-Logan window), then a two-point grey-value calibration on the air and bulk-metal peaks.

The acquisition settings (tube voltage 150-225 kV, filter, dose, number of projections, ring strength, scatter,
blur, correction strength) are drawn per seed within realistic ranges (:meth:`Scanner.draw`), so a training set
sees a spread of image qualities; :class:`Scanner` lets a caller fix them.

Grey-value scale (the ``ct`` volume, float32): an HU-like industrial scale on which air is -1000 and the bulk
titanium alloy is +3000, i.e. ``ct = -1000 + 4000 * (mu - mu_air) / (mu_metal - mu_air)`` with ``mu`` the
reconstructed linear attenuation (1/mm). Both anchors are the medians of the scan itself, so the metal reads about 3000 on average, more
near the surface and less in the middle of thick sections (cupping). Alumina reads roughly +500 to +1500
(blurred small particles read closer to the metal); tungsten-rich inclusions read far above the metal (tens of
thousands; a real 16-bit scan would saturate there) and cast dark and bright streaks.

Everything is deterministic in the seed: every random draw comes from ``numpy.random.default_rng(seed)``
(split into independent streams for the part, the defects, the scanner and the noise, so changing the defect
counts or the scanner keeps the same part), and no step depends on thread timing. Bit-identical holds for one
machine and one set of library versions; another CPU or numpy may round differently.

Geometry: arrays are (k, j, i), spacing is mm along (i, j, k), the volume is centred at RAS 0 with identity
directions, k is the rotation axis and the build direction of the part (before its tilt).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, sparse

from ..engine.geometry import Box, Volume, atomic_output, write_volume
from ..errors import InputError

__all__ = [
    "CT_AIR",
    "CT_METAL",
    "DEFECT_TYPES",
    "PART_KINDS",
    "Defect",
    "Phantom",
    "Scanner",
    "generate_phantom",
    "save_phantom",
]

DEFECT_TYPES: tuple[str, ...] = ("pore", "lack_of_fusion", "crack", "inclusion_dense", "inclusion_light")
"""Defect type names; label value ``n`` in ``Phantom.labels`` is ``DEFECT_TYPES[n - 1]`` (0 is no defect)."""

PART_KINDS: tuple[str, ...] = ("bracket", "blade_root", "flange", "coupon")
"""Part families the generator can build; the seed picks one unless the caller names it."""

CT_AIR = -1000.0
CT_METAL = 3000.0

# Label colours (r, g, b) for the Slicer colour table, in DEFECT_TYPES order.
_LABEL_COLOURS = ((230, 60, 50), (250, 170, 30), (60, 120, 230), (200, 60, 220), (60, 200, 120))

# Default defect counts for a part of 300 000 voxels (a bracket in a 128^3 volume): (lowest, highest) per type.
_DEFAULT_COUNTS = {
    "pore": (7, 12),
    "lack_of_fusion": (2, 4),
    "crack": (2, 3),
    "inclusion_dense": (1, 3),
    "inclusion_light": (2, 4),
}

_MIN_SIZE, _MAX_SIZE = 32, 512  # voxels per axis; the generator is designed for 96..256

# --- Materials ------------------------------------------------------------------------------------------------
# Mass attenuation coefficients (cm^2/g, total with coherent scattering) after the NIST X-ray tables (XCOM),
# rounded and sampled at the energies below (the 69.52 keV values interpolated), with the tungsten K-edge
# (69.525 keV) kept as a step; log-log interpolation in between. Good enough for a realistic phantom, not for
# dimensional or material metrology.
_ENERGIES_KEV = np.array([15.0, 20, 30, 40, 50, 60, 69.52, 69.53, 80, 100, 150, 200, 300])
_MASS_ATTENUATION = {
    "Ti": np.array([35.99, 15.85, 4.972, 2.214, 1.213, 0.7661, 0.553, 0.553, 0.4052, 0.2721, 0.1649, 0.1314,
                    0.1050]),
    "W": np.array([138.9, 65.73, 22.73, 10.67, 5.949, 3.713, 2.552, 11.23, 7.810, 4.438, 1.581, 0.7844,
                   0.3238]),
    "Al": np.array([7.955, 3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2358, 0.2358, 0.2018, 0.1704, 0.1378,
                    0.1223, 0.1042]),
    "O": np.array([1.658, 0.8651, 0.3779, 0.2585, 0.2132, 0.1907, 0.1786, 0.1786, 0.1678, 0.1551, 0.1361,
                   0.1237, 0.1070]),
    "Cu": np.array([74.05, 33.79, 10.92, 4.862, 2.613, 1.593, 1.093, 1.093, 0.7630, 0.4584, 0.2217, 0.1559,
                    0.1119]),
}
_DENSITY = {"Ti": 4.43, "W": 19.3, "Al2O3": 3.95, "Cu": 8.96, "Al": 2.70}  # g/cm^3 (Ti stands for Ti-6Al-4V)
_INHERENT_AL_MM = 1.5  # tube window and housing, as aluminium


def _mass_attenuation(element: str, energies_kev: np.ndarray) -> np.ndarray:
    """Mass attenuation (cm^2/g) of an element or of alumina at the given energies (keV)."""
    if element == "Al2O3":  # by mass: 52.9 % Al, 47.1 % O
        return 0.5293 * _mass_attenuation("Al", energies_kev) + 0.4707 * _mass_attenuation("O", energies_kev)
    log_mu = np.interp(np.log(energies_kev), np.log(_ENERGIES_KEV), np.log(_MASS_ATTENUATION[element]))
    return np.exp(log_mu)


def _linear_attenuation(material: str, energies_kev: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm) of a material at full density."""
    return _mass_attenuation(material, energies_kev) * _DENSITY[material] / 10.0


# --- Records ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scanner:
    """Settings of the simulated CT acquisition. The defaults are a typical 180 kV scan of a titanium part."""

    kvp: float = 180.0
    """Tube voltage in kV (the highest photon energy, keV)."""
    filter_cu_mm: float = 0.5
    """Copper pre-filter thickness in mm (hardens the beam, reduces cupping)."""
    photons: float = 2.0e4
    """Photons per detector pixel and projection in the open beam (sets the noise level)."""
    angles_per_voxel: float = 1.25
    """Projections over 180 degrees per voxel across the slice (below about 1.6 a little view aliasing shows)."""
    ring_gain_std: float = 1.0e-3
    """Relative gain error per detector element left after flat-field correction (makes rings). The error of
    whole detector columns is heavy-tailed, so a few columns stand out as single sharp rings."""
    scatter_fraction: float = 0.02
    """Fraction of the photons removed from the beam that reach the detector as smooth scatter."""
    blur_px: float = 0.6
    """Detector and focal-spot blur: Gaussian sigma in detector pixels, along both detector axes."""
    electronic_noise: float = 3.0
    """Read-out noise: Gaussian sigma in counts."""
    bh_correction: float = 0.6
    """Strength of the reconstruction software's beam-hardening correction, which linearises titanium: 0 is
    none, 1 removes the cupping of a titanium-only part (and over-corrects tungsten, as a real one does)."""

    def __post_init__(self) -> None:
        checks = {
            "kvp": 30.0 <= self.kvp <= 300.0,
            "filter_cu_mm": 0.0 <= self.filter_cu_mm <= 5.0,
            "photons": self.photons >= 10.0,
            "angles_per_voxel": 0.25 <= self.angles_per_voxel <= 4.0,
            "ring_gain_std": 0.0 <= self.ring_gain_std <= 0.1,
            "scatter_fraction": 0.0 <= self.scatter_fraction <= 0.5,
            "blur_px": 0.0 <= self.blur_px <= 5.0,
            "electronic_noise": self.electronic_noise >= 0.0,
            "bh_correction": 0.0 <= self.bh_correction <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"Scanner setting(s) out of range: {', '.join(f'{n}={getattr(self, n)}' for n in bad)}. "
                             "Use kvp 30-300 kV, filter 0-5 mm Cu, photons >= 10, angles_per_voxel 0.25-4, "
                             "ring_gain_std 0-0.1, scatter_fraction 0-0.5, blur_px 0-5, electronic_noise >= 0, "
                             "bh_correction 0-1.")

    @classmethod
    def draw(cls, rng: np.random.Generator, fov_mm: float) -> Scanner:
        """Settings an operator might pick for a part in a field of view ``fov_mm`` across (mm)."""
        # Thicker parts get a harder beam, as an operator would set it.
        kvp = min(225.0, rng.uniform(150.0, 190.0) + 1.5 * max(0.0, fov_mm - 25.0))
        return cls(
            kvp=float(kvp),
            filter_cu_mm=float(rng.uniform(0.25, 1.0)),
            photons=float(np.exp(rng.uniform(np.log(1.0e4), np.log(5.0e4)))),
            angles_per_voxel=float(rng.uniform(1.0, 1.5)),
            ring_gain_std=float(rng.uniform(1.0e-3, 4.0e-3)),
            scatter_fraction=float(rng.uniform(0.005, 0.02)),
            blur_px=float(rng.uniform(0.5, 0.8)),
            electronic_noise=float(rng.uniform(1.0, 5.0)),
            bh_correction=float(rng.uniform(0.3, 0.8)),
        )


@dataclass(frozen=True)
class Defect:
    """One defect of the ground truth, as labelled in ``Phantom.instances`` (voxels at least half defect)."""

    id: int
    """Instance id: the value of this defect's voxels in ``Phantom.instances`` (1..N)."""
    type: str
    """One of :data:`DEFECT_TYPES`."""
    centre: tuple[float, float, float]
    """Centroid of the labelled voxels, continuous voxel index (i, j, k)."""
    lo: tuple[int, int, int]
    """Bounding box of the labelled voxels, lower corner (i, j, k), inclusive."""
    hi: tuple[int, int, int]
    """Bounding box upper corner (i, j, k), exclusive."""
    voxel_count: int
    """Number of labelled voxels."""
    equivalent_diameter_mm: float
    """Diameter (mm) of the sphere with the volume of the labelled voxels."""

    @property
    def box(self) -> Box:
        return Box(self.lo, self.hi)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Phantom:
    """A simulated CT scan with its ground truth; all volumes share one geometry (shape (k, j, i))."""

    ct: Volume
    """Reconstructed grey values, float32, air -1000, bulk metal +3000 (see the module docstring)."""
    labels: Volume
    """Defect type per voxel, uint8: 0 none, n = ``DEFECT_TYPES[n - 1]``."""
    instances: Volume
    """Defect instance per voxel, int32: 0 none, otherwise ``Defect.id``."""
    part: Volume
    """The part's solid region (metal and the defects inside it), bool."""
    defects: list[Defect]
    """Every defect, ordered by id."""
    seed: int
    part_kind: str
    """Which of :data:`PART_KINDS` was built."""
    scanner: Scanner
    """The acquisition settings that were simulated."""


# --- Signed-distance toolkit -------------------------------------------------------------------------------------
# Every function takes points p of shape (n, 3) in mm and returns (n,) distances, negative inside. All of them are
# 1-Lipschitz (min, max and the polynomial smooth minimum keep that), so |sdf| never exceeds the true distance to
# the surface: a voxel whose centre has |sdf| >= half its diagonal is entirely inside or outside, and -sdf is a
# safe lower bound of the depth below the surface.

Sdf = Callable[[np.ndarray], np.ndarray]


def _norm(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", v, v))


def _sd_box(p: np.ndarray, centre: Sequence[float], half: Sequence[float], radius: float = 0.0) -> np.ndarray:
    """Box with half sizes ``half`` whose edges are rounded with ``radius``."""
    q = np.abs(p - np.asarray(centre, np.float32)) - (np.asarray(half, np.float32) - np.float32(radius))
    return _norm(np.maximum(q, 0)) + np.minimum(q.max(axis=-1), 0) - np.float32(radius)


def _sd_cylinder(p: np.ndarray, centre: Sequence[float], axis: int, radius: float, half_length: float,
                 edge: float = 0.0) -> np.ndarray:
    """Cylinder along coordinate ``axis`` with rounded rims (``edge`` radius)."""
    q = p - np.asarray(centre, np.float32)
    a, b = [c for c in range(3) if c != axis]
    d = np.stack([np.sqrt(q[:, a] ** 2 + q[:, b] ** 2) - np.float32(radius - edge),
                  np.abs(q[:, axis]) - np.float32(half_length - edge)], axis=-1)
    return _norm(np.maximum(d, 0)) + np.minimum(d.max(axis=-1), 0) - np.float32(edge)


def _sd_hole(p: np.ndarray, centre: Sequence[float], axis: int, radius: float) -> np.ndarray:
    """Infinite cylinder (a drilled hole) along coordinate ``axis``."""
    q = p - np.asarray(centre, np.float32)
    a, b = [c for c in range(3) if c != axis]
    return np.sqrt(q[:, a] ** 2 + q[:, b] ** 2) - np.float32(radius)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union: a fillet of radius about ``k`` (> 0) where the two shapes meet."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - np.float32(k) * h * (1.0 - h)


def _sd_ellipsoid(q: np.ndarray, semi_axes: Sequence[float]) -> np.ndarray:
    """Axis-aligned ellipsoid; scaled by the smallest semi-axis so that it stays a distance bound."""
    axes = np.asarray(semi_axes, np.float32)
    return (_norm(q / axes) - 1.0) * axes.min()


def _rotation(axis: Sequence[float], angle: float) -> np.ndarray:
    """Rotation matrix (Rodrigues) about a unit ``axis`` by ``angle`` radians."""
    x, y, z = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# --- Parts ------------------------------------------------------------------------------------------------------
# Each design works in its own frame (mm, z = build direction, centred at 0); ``_place_part`` then turns, tilts
# and scales it into the field of view.


class _Design(NamedTuple):
    sdf: Sdf
    half: np.ndarray
    """Half sizes (x, y, z) mm of the design's bounding box."""
    round: bool = False
    """The outline in x-y is a circle of radius ``half[0]`` (then any turn about z fits the same)."""


def _bracket(rng: np.random.Generator, half: np.ndarray) -> _Design:
    """An angle bracket: base plate with bolt holes, upright web with holes, gusset ribs, filleted joints."""
    ex, ey, ez = half
    tb = rng.uniform(0.3, 0.4) * 2 * ez  # base plate thickness
    tw = rng.uniform(0.2, 0.28) * 2 * ex  # web thickness
    edge = 0.25 * min(tb, tw)
    ey_web = ey * rng.uniform(0.75, 1.0)
    fillet = rng.uniform(0.5, 1.0) * min(tb, tw)
    x0, z0 = -ex + tw, -ez + tb  # inner corner between web and base
    gusset_len = rng.uniform(0.35, 0.55) * (ex - x0)
    gusset_h = rng.uniform(0.4, 0.7) * (ez - z0)
    rib_t = rng.uniform(0.45, 0.7) * tw
    gusset_y = [0.0] if rng.random() < 0.5 else [-0.6 * ey_web, 0.6 * ey_web]
    gusset_n = np.array([gusset_h, 0.0, gusset_len]) / math.hypot(gusset_h, gusset_len)
    hole_r = rng.uniform(0.35, 0.55) * tb
    x_free = (x0 + gusset_len + hole_r + 0.6 * tb, ex - hole_r - 0.6 * tb)
    n_x = int(rng.integers(1, 3)) if x_free[1] > x_free[0] else 0
    hole_x = np.linspace(*x_free, n_x) if n_x > 1 else [0.5 * sum(x_free)] * n_x
    hole_y = ey * rng.uniform(0.45, 0.65)
    counterbore = rng.random() < 0.5
    web_hole_r = rng.uniform(0.12, 0.2) * (ez - z0)
    web_z = (z0 + gusset_h + web_hole_r + 0.5 * tw, ez - web_hole_r - 0.5 * tw)
    web_holes = [(y, 0.5 * sum(web_z)) for y in ((0.0,) if rng.random() < 0.5 else (-0.5 * ey_web, 0.5 * ey_web))
                 ] if web_z[1] > web_z[0] else []

    def sdf(p: np.ndarray) -> np.ndarray:
        base = _sd_box(p, (0, 0, -ez + tb / 2), (ex, ey, tb / 2), edge)
        web = _sd_box(p, (-ex + tw / 2, 0, 0), (tw / 2, ey_web, ez), edge)
        # An explicit fillet in the inner corner (a smooth union would also bulge the shared outer faces).
        dx, dz = p[:, 0] - np.float32(x0 + fillet), p[:, 2] - np.float32(z0 + fillet)
        corner = np.maximum(np.maximum(-dx, -dz) - np.float32(fillet + edge), np.maximum(dx, dz))
        cove = np.maximum(corner, np.float32(fillet) - np.sqrt(dx ** 2 + dz ** 2))
        d = np.minimum(np.minimum(base, web), np.maximum(cove, np.abs(p[:, 1]) - np.float32(ey_web - edge)))
        for y in gusset_y:
            rib = np.maximum(np.abs(p[:, 1] - np.float32(y)) - np.float32(rib_t / 2),
                             (p - np.array([x0, 0, z0 + gusset_h], np.float32)) @ gusset_n.astype(np.float32))
            # Bounded on the other sides inside the web and the base, so that the triangle adds nothing outside.
            rib = np.maximum(rib, np.maximum(np.float32(x0 - tw / 2) - p[:, 0], np.float32(z0 - tb / 2) - p[:, 2]))
            rib = np.maximum(rib, np.maximum(p[:, 0] - np.float32(x0 + gusset_len),
                                             p[:, 2] - np.float32(z0 + gusset_h)))
            d = _smin(d, rib, 0.4 * rib_t)
        for x in hole_x:
            for y in (-hole_y, hole_y):
                d = np.maximum(d, -_sd_hole(p, (x, y, 0), 2, hole_r))
                if counterbore:
                    d = np.maximum(d, -_sd_cylinder(p, (x, y, z0), 2, 1.6 * hole_r, 0.3 * tb))
        for y, z in web_holes:
            d = np.maximum(d, -_sd_hole(p, (0, y, z), 0, web_hole_r))
        return d

    return _Design(sdf, np.array([ex, ey, ez]))


def _blade_root(rng: np.random.Generator, half: np.ndarray) -> _Design:
    """A turbine-blade root: fir-tree root, platform, hollow cambered airfoil stub, cooling channels."""
    ex, ey, ez = half
    z_platform = -ez + rng.uniform(0.42, 0.52) * 2 * ez  # bottom of the platform
    t_platform = rng.uniform(0.1, 0.14) * 2 * ez
    root_h = z_platform + ez
    n_tiers = int(rng.integers(2, 4))
    pitch = root_h / (n_tiers + 0.4)
    neck = rng.uniform(0.36, 0.44) * ex  # half width of the neck below the platform
    taper = rng.uniform(0.1, 0.16)  # narrowing of the teeth per tier, relative to the neck
    lobe = rng.uniform(0.25, 0.35) * pitch
    root_len = ey * rng.uniform(0.75, 1.0)
    core_bottom = neck * (1 - taper * n_tiers)
    core_slope = (neck - core_bottom) / root_h
    core_norm = math.hypot(1.0, core_slope)
    # Airfoil section: the lune between two circular arcs through the leading and trailing edges.
    chord = rng.uniform(1.6, 1.8) * min(ex, ey)
    thick = rng.uniform(0.18, 0.26) * chord
    camber = thick / 2 + rng.uniform(0.03, 0.07) * chord
    h_s, h_p = camber + thick / 2, camber - thick / 2
    r_s, r_p = (chord ** 2 / 4 + h_s ** 2) / (2 * h_s), (chord ** 2 / 4 + h_p ** 2) / (2 * h_p)
    y_shift = camber / 2  # centre the section on the stacking axis
    c_s, c_p = np.float32(h_s - r_s - y_shift), np.float32(h_p - r_p - y_shift)
    stagger = rng.uniform(-0.7, 0.7)
    cs, sn = np.float32(math.cos(stagger)), np.float32(math.sin(stagger))
    le_radius = 0.06 * thick
    wall = rng.uniform(0.25, 0.32) * thick
    z_air0 = z_platform + t_platform
    channel_r = rng.uniform(0.14, 0.2) * neck * (1 - taper * n_tiers)
    channel_x = [0.0] if rng.random() < 0.5 else [-0.4 * core_bottom, 0.4 * core_bottom]

    def airfoil2d(p: np.ndarray) -> np.ndarray:
        x = cs * p[:, 0] + sn * p[:, 1]
        y = -sn * p[:, 0] + cs * p[:, 1]
        d_s = np.sqrt(x ** 2 + (y - c_s) ** 2) - np.float32(r_s)
        d_p = np.sqrt(x ** 2 + (y - c_p) ** 2) - np.float32(r_p)
        return np.maximum(d_s + np.float32(le_radius), -d_p + np.float32(le_radius)) - np.float32(le_radius)

    def sdf(p: np.ndarray) -> np.ndarray:
        x, y, z = np.abs(p[:, 0]), p[:, 1], p[:, 2]
        z_top = np.float32(z_platform)
        core = np.maximum((x - np.float32(core_bottom) - np.float32(core_slope) * (z + np.float32(ez)))
                          / np.float32(core_norm), np.maximum(-z - np.float32(ez), z - z_top))
        root = core
        for t in range(n_tiers):
            zt = z_platform - (t + 0.7) * pitch
            wt = neck * (1 - taper * t) + lobe
            tooth = _sd_box(np.stack([x, np.zeros_like(x), z], -1), (0, 0, zt), (wt, 1.0, 0.32 * pitch),
                            0.3 * pitch)
            root = _smin(root, tooth, 0.25 * pitch)
        root = np.maximum(root, np.abs(y) - np.float32(root_len))
        platform = _sd_box(p, (0, 0, z_platform + t_platform / 2), (ex, ey, t_platform / 2), 0.3 * t_platform)
        d = _smin(root, platform, 0.5 * t_platform)
        section = airfoil2d(p)
        blade = np.maximum(section, np.maximum(np.float32(z_platform) - z, z - np.float32(ez)))
        d = _smin(d, blade, 0.6 * t_platform)
        cavity = np.maximum(section + np.float32(wall), np.maximum(np.float32(z_air0 - 0.5 * t_platform) - z,
                                                                   z - np.float32(ez - wall)))
        d = np.maximum(d, -cavity)
        for cx in channel_x:
            channel = np.maximum(_sd_hole(p, (cx, 0, 0), 2, channel_r), z - np.float32(z_air0))
            d = np.maximum(d, -channel)
        return d

    return _Design(sdf, np.array([ex, ey, ez]))


def _flange(rng: np.random.Generator, half: np.ndarray) -> _Design:
    """A flanged hub: disc with a bolt circle, central hub and bore, radial gusset ribs, filleted."""
    radius = min(half[0], half[1])
    ez = half[2]
    t = rng.uniform(0.32, 0.42) * 2 * ez
    hub_r = rng.uniform(0.3, 0.4) * radius
    bore_r = rng.uniform(0.35, 0.55) * hub_r
    n_bolts = int(rng.choice([4, 6, 8]))
    bolt_r = rng.uniform(0.06, 0.09) * radius
    bolt_circle = rng.uniform(0.76, 0.84) * radius
    rib_out = bolt_circle - bolt_r - 0.06 * radius  # ribs end before the bolt circle
    n_ribs = int(rng.choice([0, 3, 4, 6])) if rib_out > 1.2 * hub_r else 0
    rib_t = rng.uniform(0.35, 0.5) * t
    rib_h = rng.uniform(0.5, 0.85) * (2 * ez - t)
    z_disc = -ez + t / 2
    rib_n = np.array([rib_h, 0.0, rib_out - hub_r]) / math.hypot(rib_h, rib_out - hub_r)
    phase = rng.uniform(0, 2 * math.pi)

    def sdf(p: np.ndarray) -> np.ndarray:
        disc = _sd_cylinder(p, (0, 0, z_disc), 2, radius, t / 2, 0.3 * t)
        # The hub starts inside the disc: coplanar faces would bulge in the smooth union.
        hub = _sd_cylinder(p, (0, 0, (z_disc + ez) / 2), 2, hub_r, (ez - z_disc) / 2, 0.2 * t)
        d = _smin(disc, hub, 0.5 * t)
        for r in range(n_ribs):
            a = phase + 2 * math.pi * (r + 0.5) / n_ribs
            ca, sa = np.float32(math.cos(a)), np.float32(math.sin(a))
            q = np.stack([ca * p[:, 0] + sa * p[:, 1], -sa * p[:, 0] + ca * p[:, 1], p[:, 2]], -1)
            rib = np.maximum(np.abs(q[:, 1]) - np.float32(rib_t / 2),
                             (q - np.array([hub_r, 0, -ez + t + rib_h], np.float32)) @ rib_n.astype(np.float32))
            # Bounded on the other sides inside the hub and the disc, so that the triangle adds nothing outside.
            rib = np.maximum(rib, np.maximum(np.float32(hub_r * 0.8) - q[:, 0], np.float32(z_disc) - q[:, 2]))
            rib = np.maximum(rib, np.maximum(q[:, 0] - np.float32(rib_out), q[:, 2] - np.float32(-ez + t + rib_h)))
            d = _smin(d, rib, 0.4 * rib_t)
        d = np.maximum(d, -_sd_hole(p, (0, 0, 0), 2, bore_r))
        for b in range(n_bolts):
            a = phase + 2 * math.pi * b / n_bolts
            d = np.maximum(d, -_sd_hole(p, (bolt_circle * math.cos(a), bolt_circle * math.sin(a), 0), 2, bolt_r))
        return d

    return _Design(sdf, np.array([radius, radius, ez]), round=True)


def _coupon(rng: np.random.Generator, half: np.ndarray) -> _Design:
    """An additive-manufacturing test coupon: a plain cylinder or block with rounded edges."""
    if rng.random() < 0.5:
        radius = min(half[0], half[1])
        edge = rng.uniform(0.05, 0.15) * radius
        return _Design(lambda p: _sd_cylinder(p, (0, 0, 0), 2, radius, half[2], edge),
                       np.array([radius, radius, half[2]]), round=True)
    edge = rng.uniform(0.05, 0.15) * half.min()
    return _Design(lambda p: _sd_box(p, (0, 0, 0), half, edge), half.copy())


_DESIGNS: dict[str, Callable[[np.random.Generator, np.ndarray], _Design]] = {
    "bracket": _bracket, "blade_root": _blade_root, "flange": _flange, "coupon": _coupon,
}

# Design proportions (x, y, z) relative to the field of view: (lowest, highest) per axis.
_PROPORTIONS = {
    "bracket": ((0.85, 1.0), (0.7, 0.95), (0.7, 0.95)),
    "blade_root": ((0.8, 1.0), (0.6, 0.8), (0.8, 1.0)),
    "flange": ((1.0, 1.0), (1.0, 1.0), (0.75, 1.0)),
    "coupon": ((0.6, 0.9), (0.6, 0.9), (0.55, 0.85)),
}


def _place_part(rng: np.random.Generator, kind: str, fov_half: np.ndarray, margin: float
                ) -> tuple[Sdf, np.ndarray]:
    """Draw a part design, turn, tilt and scale it into the field of view; return its world SDF and rotation.

    ``fov_half`` is the half size of the volume in mm along (x, y, z) = (i, j, k); ``margin`` (mm) is kept free
    of metal at every border so that the scan has air all round the part.
    """
    prop = np.array([rng.uniform(lo, hi) for lo, hi in _PROPORTIONS[kind]])
    # Lay the design's long axis along the longer in-plane side of the field of view.
    long_first = fov_half[0] >= fov_half[1]
    fov_design = fov_half if long_first else fov_half[[1, 0, 2]]
    design = _DESIGNS[kind](rng, prop * fov_design)
    yaw = rng.uniform(-0.35, 0.35) + (0.0 if long_first else math.pi / 2) + math.pi * int(rng.integers(0, 2))
    if abs(fov_half[0] - fov_half[1]) < 0.1 * fov_half[:2].min():
        yaw += math.pi / 2 * int(rng.integers(0, 2))
    tilt_axis = _rotation((0, 0, 1), rng.uniform(0, 2 * math.pi)) @ np.array([1.0, 0.0, 0.0])
    rot = _rotation(tilt_axis, math.radians(rng.uniform(0.0, 10.0))) @ _rotation((0, 0, 1), yaw)
    if design.round:  # a cylinder of radius r and half height h along axis a reaches h|a_i| + r sqrt(1 - a_i^2)
        axis = rot[:, 2]
        extent = design.half[2] * np.abs(axis) + design.half[0] * np.sqrt(np.maximum(1 - axis ** 2, 0))
    else:
        extent = np.abs(rot) @ design.half  # half size of the turned design's bounding box
    scale = float(np.min((fov_half - margin) / extent) * rng.uniform(0.9, 0.98))
    slack = np.maximum(fov_half - margin - scale * extent, 0.0)
    centre = (rng.uniform(-0.5, 0.5, 3) * slack).astype(np.float32)
    rot32 = rot.astype(np.float32)

    def world_sdf(p: np.ndarray) -> np.ndarray:
        return design.sdf(((p - centre) @ rot32) / np.float32(scale)) * np.float32(scale)

    return world_sdf, rot


# --- Rasterisation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Voxel centres of the volume in mm (RAS, centred at 0); shape (k, j, i), spacing along (i, j, k)."""

    shape: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray

    def points(self, k0: int, k1: int, j0: int = 0, j1: int | None = None, i0: int = 0, i1: int | None = None
               ) -> np.ndarray:
        """Centres of the voxels in a (k, j, i) index box, as (n, 3) float32 (x, y, z) in mm, k slowest."""
        nk, nj, ni = self.shape
        axes = [(np.arange(a, b if b is not None else n) * s + o).astype(np.float32)
                for a, b, n, s, o in ((i0, i1, ni, self.spacing[0], self.origin[0]),
                                      (j0, j1, nj, self.spacing[1], self.origin[1]),
                                      (k0, k1, nk, self.spacing[2], self.origin[2]))]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=-1)

    def centres(self, kji: np.ndarray) -> np.ndarray:
        """Centres (n, 3) float32 (x, y, z) in mm of the voxels with indices ``kji`` (n, 3)."""
        return (kji[:, ::-1] * self.spacing + self.origin).astype(np.float32)

    @property
    def half_diagonal(self) -> float:
        return 0.5 * float(np.linalg.norm(self.spacing))

    def subsample_offsets(self) -> np.ndarray:
        """Offsets (27, 3) mm of the centres of a 3x3x3 split of a voxel."""
        steps = np.array([-1.0, 0.0, 1.0]) / 3.0
        grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
        return (grid * self.spacing).astype(np.float32)


def _coverage(sdf: Sdf, points: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Fraction (n,) of each voxel centred at ``points`` (n, 3) that lies inside the shape, from sub-samples at
    ``offsets`` (m, 3) around each centre."""
    cov = np.empty(len(points), np.float32)
    for start in range(0, len(points), 65536):  # bounded memory: 65536 voxels x 27 samples at a time
        chunk = points[start:start + 65536]
        sub = (chunk[:, None, :] + offsets[None]).reshape(-1, 3)
        cov[start:start + len(chunk)] = (sdf(sub) < 0).reshape(len(chunk), -1).mean(axis=1)
    return cov


def _rasterise_part(sdf: Sdf, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Part coverage (k, j, i) float32 in [0, 1] and the SDF at voxel centres (mm, float32)."""
    nk, nj, ni = grid.shape
    cov = np.empty(grid.shape, np.float32)
    dist = np.empty(grid.shape, np.float32)
    offsets = grid.subsample_offsets()
    band = grid.half_diagonal
    step = max(1, (1 << 20) // (nj * ni))
    for k0 in range(0, nk, step):
        k1 = min(nk, k0 + step)
        pts = grid.points(k0, k1)
        d = sdf(pts)
        near = np.abs(d) < band
        c = (d < 0).astype(np.float32)
        if near.any():
            c[near] = _coverage(sdf, pts[near], offsets)
        cov[k0:k1] = c.reshape(k1 - k0, nj, ni)
        dist[k0:k1] = d.reshape(k1 - k0, nj, ni)
    return cov, dist


# --- Defects ------------------------------------------------------------------------------------------------------


@dataclass
class _DefectShape:
    """A defect drawn but not yet placed: its SDF in its own frame (mm), bounding radius and material."""

    type: str
    sdf: Sdf
    radius: float
    """Bounding radius in mm: the defect lies within this distance of its centre."""
    core: float
    """Depth (mm) its centre needs below the surface: its thinnest half-size."""
    fraction: float = 1.0
    """Tungsten (dense) or alumina (light) volume fraction of the inclusion; the rest is Ti or void."""
    orientation: str = "random"
    """"random"; "layers": its local z along the part's build direction (lack of fusion); "flat": thin along its
    local z, turned at random or, where the walls are thin, laid along the nearest wall (cracks)."""
    draw: int = 0
    """Position in the order of drawing, which sets the defect's id."""


def _polyhedron(rng: np.random.Generator, r: float) -> Sdf:
    """An angular particle: the intersection of 10-16 random half-spaces, trimmed by a sphere."""
    normals = _random_unit(rng, int(rng.integers(10, 17))).astype(np.float32)
    offsets = (r * rng.uniform(0.75, 1.0, len(normals))).astype(np.float32)
    return lambda q: np.maximum((q @ normals.T - offsets).max(axis=1), _norm(q) - np.float32(1.2 * r))


def _ellipsoid(rng: np.random.Generator, r: float, spread: float) -> tuple[Sdf, np.ndarray]:
    axes = r * rng.uniform(1 - spread, 1 + spread, 3)
    return (lambda q: _sd_ellipsoid(q, axes)), axes


def _draw_defect(rng: np.random.Generator, kind: str, v: float, size: float = 1.0) -> _DefectShape:
    """Draw the shape of one defect.

    ``v`` is the voxel size (mm) in which the sizes are chosen; ``size`` < 1 draws a smaller one (for a thin
    part, or for a defect that found no room), though never below about 3 voxels across.
    """
    if kind == "pore":
        diameter = v * max(3.0, size * math.exp(rng.uniform(math.log(3.0), math.log(10.0))))
        sdf, axes = _ellipsoid(rng, diameter / 2, 0.12)
        return _DefectShape(kind, sdf, float(axes.max()), float(axes.min()))
    if kind == "lack_of_fusion":
        return _lack_of_fusion(rng, v, size)
    if kind == "crack":
        return _crack(rng, v, size)
    if kind == "inclusion_dense":
        r = v * max(1.5, size * rng.uniform(1.5, 3.0))
        fraction = rng.uniform(0.15, 0.6)
    else:
        r = v * max(1.5, size * math.exp(rng.uniform(math.log(1.5), math.log(4.5))))
        fraction = rng.uniform(0.8, 1.0)
    if rng.random() < 0.6:
        return _DefectShape(kind, _polyhedron(rng, r), 1.2 * r, 0.75 * r, fraction)
    sdf, axes = _ellipsoid(rng, r, 0.2)
    return _DefectShape(kind, sdf, float(axes.max()), float(axes.min()), fraction)


def _lack_of_fusion(rng: np.random.Generator, v: float, size: float) -> _DefectShape:
    """A flat, irregular void between build layers: overlapping thin pancakes in the local x-y plane."""
    width = v * max(6.0, size * rng.uniform(8.0, 22.0))
    thickness = v * rng.uniform(2.0, 3.5)
    n = int(rng.integers(3, 7))
    angle = rng.uniform(0, 2 * math.pi, n)
    dist = rng.uniform(0.0, 0.3, n) * width
    centres = np.stack([dist * np.cos(angle), dist * np.sin(angle), rng.uniform(-0.4, 0.4, n) * v], -1)
    axes = np.stack([np.maximum(rng.uniform(0.2, 0.35, n) * width, 2 * v),
                     np.maximum(rng.uniform(0.2, 0.35, n) * width, 2 * v),
                     thickness / 2 * rng.uniform(0.75, 1.0, n)], -1)
    turns = [_rotation((0, 0, 1), a).astype(np.float32) for a in rng.uniform(0, math.pi, n)]
    centres32 = centres.astype(np.float32)

    def sdf(q: np.ndarray) -> np.ndarray:
        d = _sd_ellipsoid((q - centres32[0]) @ turns[0], axes[0])
        for c, ax, t in zip(centres32[1:], axes[1:], turns[1:]):
            d = _smin(d, _sd_ellipsoid((q - c) @ t, ax), 0.5 * v)
        return d

    radius = float(np.max(np.linalg.norm(centres, axis=1) + axes[:, :2].max(axis=1)))
    return _DefectShape("lack_of_fusion", sdf, radius, thickness / 2, orientation="layers")


def _crack_facet(rng: np.random.Generator, v: float, origin: np.ndarray, basis: np.ndarray, a: float, b: float,
                 half_t: float) -> Sdf:
    """One wavy planar patch of a crack with an irregular outline, thinning towards its tips.

    ``basis`` columns are the patch's in-plane axes u, v and its normal n; ``a``, ``b`` the outline's
    semi-axes along u and v (mm, at most ``_RIM_MAX`` times larger at the bulges); ``half_t`` the half opening
    (mm), which thins to half a voxel at the rim.
    """
    harmonics = np.arange(2, 5, dtype=np.float32)[:, None]
    wobble = rng.uniform(0.0, 0.08, (3, 1)).astype(np.float32)
    phases = rng.uniform(0, 2 * math.pi, (3, 1)).astype(np.float32)
    amp = rng.uniform(0.3, 0.8, 2) * v
    wave = rng.uniform(1.2, 2.4, 2) * a
    wphase = rng.uniform(0, 2 * math.pi, 2)
    # The waviness and the wobbly rim tilt the surfaces; dividing by their steepest slope keeps distance bounds.
    h_min = 0.5 * v
    steep = (math.sqrt(1 + sum((2 * math.pi * am / w) ** 2 for am, w in zip(amp, wave)))
             + max(0.0, half_t - h_min) / (0.3 * a))
    rim_scale = np.float32(min(a, b) / (1 + float((wobble * harmonics).sum())))
    origin32, basis32 = origin.astype(np.float32), basis.astype(np.float32)

    def sdf(q: np.ndarray) -> np.ndarray:
        local = (q - origin32) @ basis32
        u, w, n = local[:, 0] / np.float32(a), local[:, 1] / np.float32(b), local[:, 2]
        rim = 1.0 + (wobble * np.cos(harmonics * np.arctan2(w, u)[None] + phases)).sum(axis=0)
        outline = (np.sqrt(u ** 2 + w ** 2) - rim) * rim_scale
        offset = (amp[0] * np.sin(2 * math.pi * local[:, 0] / wave[0] + wphase[0])
                  + amp[1] * np.sin(2 * math.pi * local[:, 1] / wave[1] + wphase[1])).astype(np.float32)
        half = h_min + (half_t - h_min) * np.clip(-outline / np.float32(0.3 * a), 0.0, 1.0)
        return np.maximum((np.abs(n - offset) - half) / np.float32(steep), outline)

    return sdf


_RIM_MAX = 1.24  # largest outline radius of a crack facet relative to its semi-axis (1 + 3 x 0.08)


def _crack(rng: np.random.Generator, v: float, size: float) -> _DefectShape:
    """A thin, wavy crack of one main facet with one or two branches leaving it at 25-50 degrees."""
    a = v * max(4.0, size * rng.uniform(5.0, 12.0))
    b = a * rng.uniform(0.35, 0.7)
    half_t = v * rng.uniform(0.6, 1.1)
    facets = [_crack_facet(rng, v, np.zeros(3), np.eye(3), a, b, half_t)]
    radius = _RIM_MAX * a
    for _ in range(int(rng.integers(1, 3))):
        side = 1.0 if rng.random() < 0.5 else -1.0
        junction = np.array([side * a * rng.uniform(0.2, 0.6), b * rng.uniform(-0.3, 0.3), 0.0])
        beta = rng.uniform(math.radians(25), math.radians(50)) * (1 if rng.random() < 0.5 else -1)
        u_b = side * np.array([math.cos(beta), 0.0, math.sin(beta)])
        n_b = np.array([-math.sin(beta), 0.0, math.cos(beta)])
        basis = np.stack([u_b, np.array([0.0, 1.0, 0.0]), n_b], axis=1)
        a_b = a * rng.uniform(0.35, 0.6)
        b_b = b * rng.uniform(0.5, 0.9)
        origin = junction + u_b * 0.85 * a_b
        facets.append(_crack_facet(rng, v, origin, basis, a_b, b_b, half_t * rng.uniform(0.8, 1.0)))
        radius = max(radius, float(np.linalg.norm(origin)) + _RIM_MAX * max(a_b, b_b))

    def sdf(q: np.ndarray) -> np.ndarray:
        d = facets[0](q)
        for f in facets[1:]:
            d = np.minimum(d, f(q))
        return d

    return _DefectShape("crack", sdf, radius + 3 * v, half_t, orientation="flat")


@dataclass
class _Placed:
    """A defect rasterised where it was placed."""

    shape: _DefectShape
    lo: np.ndarray  # voxel index box (k, j, i) of ``coverage``
    hi: np.ndarray
    coverage: np.ndarray  # fraction of each voxel that is defect, (k, j, i) over lo..hi


def _default_counts(rng: np.random.Generator, part_voxels: int) -> dict[str, int]:
    """Defect counts per type, growing with the square root of the part's volume (14-26 for a 128^3 bracket)."""
    scale = math.sqrt(part_voxels / 300_000)
    return {t: max(1, int(round(rng.integers(lo, hi + 1) * scale))) for t, (lo, hi) in _DEFAULT_COUNTS.items()}


def _local_box(grid: _Grid, centre: np.ndarray, reach_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxel index box (k, j, i) lo/hi (hi exclusive) around a sphere; None when it reaches out of the volume."""
    ijk_c = (centre - grid.origin) / grid.spacing
    reach = reach_mm / grid.spacing + 1
    lo = np.floor(ijk_c - reach).astype(int)[::-1]
    hi = (np.ceil(ijk_c + reach).astype(int) + 1)[::-1]
    if np.any(lo < 0) or np.any(hi > np.array(grid.shape)):
        return None
    return lo, hi


def _place_defects(rng: np.random.Generator, shapes: list[_DefectShape], part_sdf: np.ndarray, grid: _Grid,
                   part_rotation: np.ndarray, v: float, size: float, required: bool) -> list[_Placed]:
    """Put each defect inside the metal, every voxel it touches at least 2 voxels from the surface and from
    every other defect.

    Larger defects go first so that they still find room. When one finds none (see :func:`_place_one`), the
    placement starts again with that one first, up to three times. After that a ``required`` defect makes the
    generator give up; one that is not (a default count) is left out and the rest are placed again.
    """
    gap = 2.0 * v
    flat_sdf = part_sdf.ravel()
    inside = np.flatnonzero(flat_sdf < -gap)
    depth = -flat_sdf[inside]
    by_depth = np.argsort(-depth, kind="stable")
    candidates = (inside[by_depth], depth[by_depth])
    order = sorted(shapes, key=lambda s: -s.radius)
    restarts = 0
    while True:
        occupied = np.zeros(grid.shape, bool)  # voxels touched by a placed defect or within ``gap`` of one
        placed: list[_Placed] = []
        for n, shape in enumerate(order):
            result = _place_one(rng, shape, candidates, part_sdf, occupied, grid, part_rotation, v, size)
            if result is None:
                break
            placed.append(result)
        else:
            return placed
        rest = order[:n] + order[n + 1:]
        if restarts < 3:
            order, restarts = [shape] + rest, restarts + 1
        elif not required:
            order, restarts = rest, 0
        else:
            raise InputError(
                f"Could not place a {shape.type} inside the part: no room left at least 2 voxels from the surface "
                f"and from the other defects ({len(shapes)} in all). Ask for fewer defects (defect_counts) or a "
                "larger volume.")


def _place_one(rng: np.random.Generator, shape: _DefectShape, candidates: tuple[np.ndarray, np.ndarray],
               part_sdf: np.ndarray, occupied: np.ndarray, grid: _Grid, part_rotation: np.ndarray, v: float,
               size: float) -> _Placed | None:
    """Find room for one defect, rasterise it and mark it in ``occupied``; None if it found no room.

    Candidate centres are drawn among the part's voxels deep enough for the defect's thinnest half-size
    (``candidates``: flat voxel indices and their depths, deepest first); each candidate, with a fresh
    orientation, is then checked voxel by voxel, so flat defects fit into plates and walls that their bounding
    sphere would not fit into. A defect that finds no room is drawn again smaller (three times, each time 75 %
    of the size it was drawn with, ``size``; never below about 3 voxels across).
    """
    gap = 2.0 * v
    inside, depth = candidates
    touch = grid.half_diagonal  # a voxel whose centre is farther than this from a shape does not touch it
    offsets = grid.subsample_offsets()
    for attempt in range(4):
        if attempt:
            shape = replace(_draw_defect(rng, shape.type, v, size * 0.75 ** attempt), draw=shape.draw)
        n_ok = int(np.searchsorted(-depth, -(shape.core + gap), side="right"))
        for pick in inside[rng.integers(0, n_ok, 160)] if n_ok else ():
            if occupied.ravel()[pick]:
                continue
            k, j, i = np.unravel_index(pick, grid.shape)
            centre = np.array([i, j, k]) * grid.spacing + grid.origin
            if shape.orientation == "layers":
                rotation = part_rotation @ _rotation((0, 0, 1), rng.uniform(0, 2 * math.pi))
            elif shape.orientation == "flat" and attempt >= 2:  # the random turns did not fit: follow the wall
                rotation = _frame_along(_wall_normal(part_sdf, (k, j, i)), rng)
            else:
                rotation = _random_rotation(rng)
            box = _local_box(grid, centre, shape.radius + gap + touch)
            if box is None:
                continue
            lo, hi = box
            region = tuple(slice(a, b) for a, b in zip(lo, hi))
            local = _oriented(shape.sdf, centre, rotation)
            # Only the voxels too close to the surface or to another defect can spoil a place; a sparse look at
            # them rejects most bad places before the full look.
            forbidden = np.argwhere((part_sdf[region] > -gap) | occupied[region]) + lo
            if any(np.any(local(grid.centres(forbidden[first::step])) < touch) for first, step in ((0, 16), (0, 1))):
                continue
            pts = grid.points(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
            d = local(pts)
            cov = np.zeros(len(pts), np.float32)
            near = d < touch
            cov[near] = _coverage(local, pts[near], offsets)
            if cov.max() >= 0.5:  # else too thin to own a voxel of the ground truth
                occupied[region] |= (d < touch + gap).reshape(tuple(hi - lo))
                return _Placed(shape, lo, hi, cov.reshape(tuple(hi - lo)))
    return None


def _wall_normal(part_sdf: np.ndarray, kji: tuple[int, int, int]) -> np.ndarray:
    """Direction (x, y, z) in which the part's SDF grows fastest at a voxel: towards the nearest surface."""
    grad = []
    for axis in range(3):
        lo_idx, hi_idx = list(kji), list(kji)
        lo_idx[axis] = max(kji[axis] - 1, 0)
        hi_idx[axis] = min(kji[axis] + 1, part_sdf.shape[axis] - 1)
        grad.append(float(part_sdf[tuple(hi_idx)] - part_sdf[tuple(lo_idx)]))
    g = np.array(grad[::-1])  # (k, j, i) -> (x, y, z); equal voxel sizes are not needed for a direction
    norm = np.linalg.norm(g)
    return g / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _frame_along(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rotation whose third column is ``normal`` tilted by up to 15 degrees, turned at random about it."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(normal, helper)
    u /= np.linalg.norm(u)
    frame = np.stack([u, np.cross(normal, u), normal], axis=1)
    tilt = _rotation((1, 0, 0), math.radians(rng.uniform(-15, 15)))
    return frame @ tilt @ _rotation((0, 0, 1), rng.uniform(0, 2 * math.pi))


def _oriented(sdf: Sdf, centre: np.ndarray, rotation: np.ndarray) -> Sdf:
    """The SDF of a shape moved to ``centre`` (mm) and turned by ``rotation`` (columns: its axes in the world)."""
    c32, rot32 = centre.astype(np.float32), rotation.astype(np.float32)
    return lambda p: sdf((p - c32) @ rot32)


# --- Acquisition and reconstruction -----------------------------------------------------------------------------


def _footprint_cdf(s: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Cumulative normalised footprint of a w1 x w2 pixel seen edge-on: the convolution of two boxes.

    The footprint (a trapezoid) is a second difference of ramps; integrating once more gives half-squared ramps.
    """
    def half_square_ramp(x: np.ndarray) -> np.ndarray:
        return np.square(np.maximum(x, 0.0)) / 2

    a, b = (w1 + w2) / 2, (w1 - w2) / 2
    return (half_square_ramp(s + a) - half_square_ramp(s + b) - half_square_ramp(s - b)
            + half_square_ramp(s - a)) / (w1 * w2)


def _projector(ni: int, nj: int, si: float, sj: float, n_angles: int) -> tuple[sparse.csr_matrix, int, float]:
    """Parallel-beam system matrix of one axial slice: exact area-weighted (strip) projection.

    Row ``a * n_det + u`` is the ray of angle ``pi * a / n_angles`` through detector bin ``u``; column
    ``j * ni + i`` is pixel (j, i); the entry is the mean chord length (mm) of the pixel over the bin. Returns
    the matrix, the number of detector bins (covering the slice diagonal) and the bin pitch (mm).
    """
    pitch = min(si, sj)
    n_det = int(math.ceil(math.hypot(ni * si, nj * sj) / pitch)) + 4
    x = (np.arange(ni) - (ni - 1) / 2) * si
    y = (np.arange(nj) - (nj - 1) / 2) * sj
    px, py = (a.ravel() for a in np.meshgrid(x, y))
    cols_all = np.arange(ni * nj, dtype=np.int32)
    span = int(math.ceil((si + sj) / pitch)) + 1
    rows, cols, vals = [], [], []
    chunk = max(1, (1 << 22) // (ni * nj))
    for a0 in range(0, n_angles, chunk):
        theta = np.pi * np.arange(a0, min(n_angles, a0 + chunk)) / n_angles
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        centre = px[None] * c + py[None] * s  # (angles, pixels), mm along the detector
        w1 = np.maximum(si * np.abs(c), 1e-4 * pitch)
        w2 = np.maximum(sj * np.abs(s), 1e-4 * pitch)
        first = np.floor((centre - (w1 + w2) / 2) / pitch + n_det / 2).astype(np.int64)
        for m in range(span):
            u = first + m
            lo_edge = (u - n_det / 2) * pitch - centre
            w = (_footprint_cdf(lo_edge + pitch, w1, w2) - _footprint_cdf(lo_edge, w1, w2)) * (si * sj / pitch)
            keep = (w > 1e-9) & (u >= 0) & (u < n_det)
            angle_idx = np.broadcast_to(np.arange(a0, a0 + len(theta))[:, None], u.shape)
            rows.append((angle_idx[keep] * n_det + u[keep]).astype(np.int32))
            cols.append(np.broadcast_to(cols_all[None], u.shape)[keep])
            vals.append(w[keep].astype(np.float32))
    matrix = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(n_angles * n_det, ni * nj))
    return matrix, n_det, pitch


def _spectrum(scanner: Scanner, n_bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Energy bins (keV) and their share of the detector signal in the open beam (sums to 1).

    Kramers' bremsstrahlung law, the tube's inherent aluminium and the copper pre-filter, weighted by photon
    energy because the detector integrates energy.
    """
    edges = np.linspace(15.0, scanner.kvp, n_bins + 1)
    e = (edges[:-1] + edges[1:]) / 2
    photons = (scanner.kvp - e) / e * np.diff(edges)
    photons *= np.exp(-_linear_attenuation("Cu", e) * scanner.filter_cu_mm - _linear_attenuation("Al", e)
                      * _INHERENT_AL_MM)
    signal = photons * e
    return e, signal / signal.sum()


def _linearise(sino: np.ndarray, energies: np.ndarray, weights: np.ndarray, strength: float) -> np.ndarray:
    """Beam-hardening correction as reconstruction software does it: map each measured -log(transmission) to
    the value a monochromatic beam would give through the same length of titanium, blended by ``strength``."""
    mu = _linear_attenuation("Ti", energies)
    lengths = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 400)])  # mm, far beyond any measurable path
    measured = -np.log(np.exp(-np.outer(lengths, mu)) @ weights)
    linear = lengths * float(weights @ mu)  # the slope at zero length: the beam's initial attenuation
    corrected = np.interp(sino, measured, linear).astype(np.float32)
    return sino + np.float32(strength) * (corrected - sino)


def _scan(materials: dict[str, np.ndarray], grid: _Grid, scanner: Scanner, rng: np.random.Generator
          ) -> np.ndarray:
    """Simulate the acquisition of the material maps and reconstruct; returns mu (1/mm), shape (k, j, i).

    ``materials`` maps "Ti", "W", "Al2O3" to (k, j, i) volume fractions.
    """
    nk, nj, ni = grid.shape
    si, sj = float(grid.spacing[0]), float(grid.spacing[1])
    n_angles = max(16, int(round(scanner.angles_per_voxel * max(ni, nj))))
    system, n_det, pitch = _projector(ni, nj, si, sj, n_angles)

    # Path length (mm) through each material for every ray; slices without a material are skipped.
    energies, weights = _spectrum(scanner)
    exponent_parts = []
    for name, vol in materials.items():
        slices = np.flatnonzero(vol.reshape(nk, -1).any(axis=1))
        if len(slices):
            cols = np.ascontiguousarray(vol[slices].reshape(len(slices), -1).T)
            paths = (system @ cols).reshape(n_angles, n_det, len(slices))
            exponent_parts.append((_linear_attenuation(name, energies).astype(np.float32), slices, paths))

    # Polychromatic transmission: each energy is attenuated differently (beam hardening).
    primary = np.zeros((n_angles, n_det, nk), np.float32)
    for e_idx, weight in enumerate(weights):
        exponent = np.zeros_like(primary)
        for mu, slices, paths in exponent_parts:
            exponent[:, :, slices] += mu[e_idx] * paths
        primary += np.float32(weight) * np.exp(-exponent)
    del exponent_parts

    if scanner.blur_px > 0:
        primary = ndimage.gaussian_filter1d(primary, scanner.blur_px, axis=1, mode="nearest")
        primary = ndimage.gaussian_filter1d(primary, scanner.blur_px * pitch / grid.spacing[2], axis=2,
                                            mode="nearest")
    # Scatter: photons taken out of the beam come back as a broad haze (a triple box filter ~ a wide Gaussian).
    removed = 1.0 - primary
    for _ in range(3):
        removed = ndimage.uniform_filter1d(removed, max(3, n_det // 6), axis=1, mode="nearest")
        removed = ndimage.uniform_filter1d(removed, max(3, nk // 6), axis=2, mode="nearest")
    signal = primary + np.float32(scanner.scatter_fraction) * removed
    del primary, removed

    # Detector: residual gain per element (constant over the scan: rings), Poisson and read-out noise.
    gain = 1.0 + scanner.ring_gain_std * (0.4 * rng.standard_t(3, size=(n_det, 1))
                                          + 0.8 * rng.normal(size=(n_det, nk)))
    counts = rng.poisson(signal * (scanner.photons * gain)[None]).astype(np.float32)
    counts += rng.normal(0.0, scanner.electronic_noise, counts.shape).astype(np.float32)
    sino = -np.log(np.maximum(counts, 1.0) / np.float32(scanner.photons))
    del counts, signal
    if scanner.bh_correction > 0:
        sino = _linearise(sino, energies, weights, scanner.bh_correction)

    # Filtered back-projection: ramp filter (Shepp-Logan window) along the detector, then the adjoint projector.
    n_fft = int(2 ** math.ceil(math.log2(2 * n_det)))
    n = np.arange(-(n_fft // 2), n_fft // 2)
    kernel = np.zeros(n_fft)
    kernel[n == 0] = 1 / (4 * pitch ** 2)
    odd = n % 2 == 1
    kernel[odd] = -1 / (np.pi * n[odd] * pitch) ** 2
    response = np.real(sfft.fft(sfft.ifftshift(kernel))) * pitch
    freq = sfft.fftfreq(n_fft)
    response *= np.sinc(freq)  # Shepp-Logan: sin(pi f)/(pi f) with f in cycles per bin
    response = response[: n_fft // 2 + 1].astype(np.float32)
    filtered = np.empty_like(sino)
    for a0 in range(0, n_angles, 16):
        spec = sfft.rfft(sino[a0:a0 + 16], n=n_fft, axis=1)
        filtered[a0:a0 + 16] = sfft.irfft(spec * response[None, :, None], n=n_fft, axis=1)[:, :n_det]
    del sino
    mu = system.T @ filtered.reshape(n_angles * n_det, nk)
    mu *= np.float32(math.pi / n_angles * pitch / (si * sj))
    return np.ascontiguousarray(mu.T).reshape(nk, nj, ni)


# --- Generator --------------------------------------------------------------------------------------------------


def _check_arguments(shape: Sequence[int], spacing_mm: Sequence[float], defect_counts: Mapping[str, int] | None,
                     part: str | None) -> tuple[tuple[int, int, int], np.ndarray]:
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or any(s < _MIN_SIZE or s > _MAX_SIZE for s in shape_t):
        raise InputError(f"Phantom shape must be three sizes (k, j, i) of {_MIN_SIZE} to {_MAX_SIZE} voxels, got "
                         f"{tuple(shape)}. The generator is designed for 96 to 256 voxels per axis.")
    spacing = np.asarray(spacing_mm, float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"Phantom spacing must be three positive sizes in mm along (i, j, k), got {spacing_mm}.")
    if spacing.max() > 4 * spacing.min():
        raise InputError(f"Phantom spacing {tuple(spacing_mm)} mm is too anisotropic (more than 4:1); defects are "
                         "sized in voxels and would be lines or sheets along the coarse axis.")
    if defect_counts is not None:
        unknown = set(defect_counts) - set(DEFECT_TYPES)
        if unknown:
            raise InputError(f"Unknown defect type(s) {sorted(unknown)}; choose from {list(DEFECT_TYPES)}.")
        bad = {t: c for t, c in defect_counts.items() if not isinstance(c, (int, np.integer)) or c < 0}
        if bad:
            raise InputError(f"Defect counts must be whole numbers >= 0, got {bad}.")
    if part is not None and part not in PART_KINDS:
        raise InputError(f"Unknown part kind {part!r}; choose from {list(PART_KINDS)}.")
    return shape_t, spacing


def generate_phantom(seed: int, shape: Sequence[int] = (128, 128, 128),
                     spacing_mm: Sequence[float] = (0.2, 0.2, 0.2), defect_counts: Mapping[str, int] | None = None,
                     part: str | None = None, scanner: Scanner | None = None) -> Phantom:
    """Build a part with defects, scan it and return the reconstruction with its exact ground truth.

    Args:
        seed: Everything random is drawn from ``numpy.random.default_rng(seed)``; the same arguments give
            bit-identical arrays.
        shape: Volume size in array order (k, j, i), 32 to 512 per axis (designed for 96 to 256).
        spacing_mm: Voxel size in mm along (i, j, k); defect sizes are chosen in voxels (their geometric mean).
        defect_counts: Number of defects of each type in :data:`DEFECT_TYPES`; types left out get none. None
            draws every type, 14-26 defects for a part of 300 000 voxels (a bracket in a 128^3 volume), more
            or fewer with the square root of the part's volume; in a part too thin to hold them all (below
            96^3) the ones that find no room are left out.
        part: One of :data:`PART_KINDS`; None lets the seed choose.
        scanner: Acquisition settings; None lets the seed choose typical ones (:meth:`Scanner.draw`).

    Returns:
        A :class:`Phantom` whose volumes all have ``shape`` and one geometry centred at RAS 0.

    Raises:
        InputError: Arguments out of range, or the defects asked for do not fit into the part.
    """
    shape_t, spacing = _check_arguments(shape, spacing_mm, defect_counts, part)
    part_rng, count_rng, defect_rng, scanner_rng, noise_rng = np.random.default_rng(seed).spawn(5)
    fov_half = np.array(shape_t[::-1], float) * spacing / 2
    origin = -(np.array(shape_t[::-1], float) - 1) / 2 * spacing
    grid = _Grid(shape_t, spacing, origin)
    v = float(np.prod(spacing) ** (1 / 3))

    # Drawn even when the caller names the part, so that naming the seed's own kind changes nothing.
    kind = PART_KINDS[int(part_rng.integers(len(PART_KINDS)))]
    kind = part or kind
    part_sdf, part_rotation = _place_part(part_rng, kind, fov_half, margin=4 * v)
    part_cov, part_dist = _rasterise_part(part_sdf, grid)

    counts = _default_counts(count_rng, int(np.count_nonzero(part_cov >= 0.5)))
    if defect_counts is not None:
        counts = {t: int(defect_counts.get(t, 0)) for t in DEFECT_TYPES}
    # Thin parts get smaller defects, as their walls could not hold the large ones.
    size = float(np.clip(-part_dist.min() / (12 * v), 0.5, 1.0))
    shapes = [_draw_defect(defect_rng, t, v, size) for t in DEFECT_TYPES for _ in range(counts[t])]
    for n, s in enumerate(shapes):
        s.draw = n
    placed = _place_defects(defect_rng, shapes, part_dist, grid, part_rotation, v, size,
                            required=defect_counts is not None)
    del part_dist
    placed.sort(key=lambda p: p.shape.draw)  # ids in type order, then in drawing order

    labels = np.zeros(shape_t, np.uint8)
    instances = np.zeros(shape_t, np.int32)
    titanium = part_cov.copy()
    tungsten = np.zeros(shape_t, np.float32)
    alumina = np.zeros(shape_t, np.float32)
    defects = []
    voxel_mm3 = float(np.prod(spacing))
    for ident, p in enumerate(placed, start=1):
        box = tuple(slice(a, b) for a, b in zip(p.lo, p.hi))
        titanium[box] -= p.coverage
        if p.shape.type == "inclusion_dense":
            titanium[box] += p.coverage * np.float32(1 - p.shape.fraction)
            tungsten[box] += p.coverage * np.float32(p.shape.fraction)
        elif p.shape.type == "inclusion_light":
            alumina[box] += p.coverage * np.float32(p.shape.fraction)
        member = p.coverage >= 0.5
        labels[box][member] = DEFECT_TYPES.index(p.shape.type) + 1
        instances[box][member] = ident
        kji = np.argwhere(member) + p.lo
        count = len(kji)
        defects.append(Defect(
            id=ident, type=p.shape.type,
            centre=tuple(float(c) for c in kji.mean(axis=0)[::-1]),
            lo=tuple(int(c) for c in kji.min(axis=0)[::-1]),
            hi=tuple(int(c) + 1 for c in kji.max(axis=0)[::-1]),
            voxel_count=int(count),
            equivalent_diameter_mm=float((6 * count * voxel_mm3 / math.pi) ** (1 / 3)),
        ))
    np.clip(titanium, 0.0, 1.0, out=titanium)

    scanner = scanner or Scanner.draw(scanner_rng, float(2 * fov_half[:2].max()))
    mu = _scan({"Ti": titanium, "W": tungsten, "Al2O3": alumina}, grid, scanner, noise_rng)
    del titanium, tungsten, alumina

    part_mask = part_cov >= 0.5
    ct = _calibrate(mu, part_mask, instances > 0)
    geometry = dict(spacing=tuple(spacing), origin=tuple(origin))
    return Phantom(
        ct=Volume(ct, **geometry), labels=Volume(labels, **geometry), instances=Volume(instances, **geometry),
        part=Volume(part_mask, **geometry), defects=defects, seed=int(seed), part_kind=kind, scanner=scanner,
    )


def _calibrate(mu: np.ndarray, part: np.ndarray, defect: np.ndarray) -> np.ndarray:
    """Map mu to the grey-value scale with the medians of clean air and clean bulk metal as the two anchors.

    "Clean" keeps 3 voxels away from the part surface and from the defects, out of reach of the blur.
    """
    air = ~ndimage.binary_dilation(part, iterations=3)
    metal = ndimage.binary_erosion(part, iterations=3) & ~ndimage.binary_dilation(defect, iterations=3)
    mu_air, mu_metal = float(np.median(mu[air])), float(np.median(mu[metal]))
    ct = CT_AIR + (CT_METAL - CT_AIR) * (mu - mu_air) / (mu_metal - mu_air)
    return ct.astype(np.float32)


# --- Output -----------------------------------------------------------------------------------------------------


def _colour_table() -> str:
    lines = ["# Color table file gt_labels.ctbl (CTXAI phantom defect types)",
             f"# {len(DEFECT_TYPES) + 1} values",
             "0 background 0 0 0 0"]
    lines += [f"{n} {name} {r} {g} {b} 255"
              for n, (name, (r, g, b)) in enumerate(zip(DEFECT_TYPES, _LABEL_COLOURS), start=1)]
    return "\n".join(lines) + "\n"


def save_phantom(phantom: Phantom, out_dir: str | Path) -> dict[str, Path]:
    """Write the scan and its ground truth into ``out_dir`` (created if needed); each file appears whole or not.

    Files: ``ct.nrrd`` (float32 grey values), ``gt_labels.nrrd`` (uint8 defect types) with the Slicer colour
    table ``gt_labels.ctbl`` beside it, ``gt_instances.nrrd`` (int32 defect ids), ``gt_part.nrrd`` (uint8 part
    mask) and ``defects.json`` (defect list, seed, part kind, scanner settings, shape and geometry).
    Returns the paths by role: ct, labels, colours, instances, part, defects.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": write_volume(phantom.ct, out / "ct.nrrd"),
        "labels": write_volume(phantom.labels, out / "gt_labels.nrrd"),
        "instances": write_volume(phantom.instances, out / "gt_instances.nrrd"),
        "part": write_volume(phantom.part, out / "gt_part.nrrd"),
    }
    texts = {
        "colours": ("gt_labels.ctbl", _colour_table()),
        "defects": ("defects.json", json.dumps({
            "seed": phantom.seed,
            "part_kind": phantom.part_kind,
            "shape_kji": list(phantom.ct.shape),
            "spacing_mm_ijk": list(phantom.ct.spacing),
            "origin_ras": list(phantom.ct.origin),
            "grey_scale": {"air": CT_AIR, "metal": CT_METAL},
            "defect_types": list(DEFECT_TYPES),
            "scanner": asdict(phantom.scanner),
            "defects": [d.to_dict() for d in phantom.defects],
        }, indent=2)),
    }
    for role, (name, text) in texts.items():
        with atomic_output(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths[role] = out / name
    return paths
