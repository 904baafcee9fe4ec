r"""A synthetic multi-magnification whole-slide-image cohort written in the TRIDENT h5 layout.

The cohort is a test bed in which the answer is known: every patch carries its ground truth,
lesions are sparse and spatially coherent, and their signal is strong at high magnification and
diluted at low magnification, so attention-style methods that find the lesion patches beat mean
pooling, and zooming from low to high magnification pays off.

Generative model
----------------
Magnifications :math:`m_1 < \dots < m_L` with integer ratios :math:`r_\ell = m_{\ell+1}/m_\ell`
(default 5x, 10x, 20x). Each slide is "scanned" at a level-0 magnification drawn from
``level0_magnifications`` (default 20x or 40x), so a patch of ``patch_size`` pixels at
magnification :math:`m` covers ``patch_size * level0 / m`` level-0 pixels.

*Tissue* (highest level :math:`L`). One to three random ellipses; the tissue is the
:math:`N` lattice cells closest to an ellipse centre in the ellipse metric
:math:`\min_j \lVert \mathrm{diag}(a_j, b_j)^{-1} R_j (p - c_j) \rVert` (with slightly
ragged borders), :math:`N` drawn from ``patches_per_slide``; a small fraction ``hole_fraction``
of the cells is then removed (background inside the tissue). The lattice origin is shifted by a
random integer amount below one lowest-magnification patch, so lattices are not anchored at 0.
Every level-0 coordinate is an integer top-left corner.

*Lower levels.* A parent cell exists wherever at least one of its :math:`r_\ell^2` children exists
(the parent lattice shares the child lattice's origin and its side is :math:`r_\ell` child sides),
so every child's centre lies in exactly one parent's box, and parents at the tissue border or over
holes miss some children.

*Tissue types.* A Voronoi partition of the tissue around a few random seeds, each seed with one
of ``num_tissue_types`` types; a parent takes the most frequent type of its children.

*Lesions* (slides with label > 0). One to three blobs, each the nearest tissue patches to a random
tissue patch in a random ellipse metric, together covering a fraction of the tissue drawn from
``lesion_fraction`` (default 5–20 %).

*Features* at the highest level (dimension :math:`D`):

.. math::
    x_i = \mu_{t_i} + \beta_s + \lambda\,\ell_i\, u_{g_i} + \sigma\,\varepsilon_i,

with tissue-type means :math:`\mu_t \sim \mathcal{N}(0, \tau^2 I)` (shared by all classes), a
per-slide offset :math:`\beta_s \sim \mathcal{N}(0, \kappa^2 I)` (stain / scanner batch effect),
unit lesion directions :math:`u_g` for lesion grade :math:`g`, lesion indicator :math:`\ell_i`,
strength :math:`\lambda` and noise :math:`\varepsilon_i \sim \mathcal{N}(0, I)`. A parent's
feature is the mean of its children's features with their lesion component scaled by the
retention :math:`\gamma` (``signal_retention``), plus fresh noise that restores the per-patch
noise level to :math:`\sigma`:

.. math::
    x_p = \frac{1}{|C_p|}\sum_{c \in C_p} \bigl(x_c - (1-\gamma)\,s_c\bigr)
    + \sigma \sqrt{\max(1 - 1/|C_p|,\ 1/2)}\;\varepsilon_p,

where :math:`s_c` is the lesion component carried by child :math:`c` (so a parent carries
:math:`\gamma\,\bar s_{C_p}`). The floor of the fresh noise keeps a parent with a single child
from copying it (such border parents are a little noisier, as real patches of little tissue are).

With the defaults (:math:`\lambda = 3`, :math:`\gamma = 0.8`, :math:`\sigma = 1`) a lesion patch
stands :math:`3\sigma` out of the noise at 20x, :math:`2.4\sigma` at 10x and :math:`1.9\sigma`
at 5x inside a lesion, and much less at lesion borders, where a parent covers only a few lesion
children; as lesions are small next to a 5x patch, most 5x lesion patches are border patches. A
linear probe on single patches then scores an AUC of about 0.97 at 20x, 0.84 at 10x and 0.65 at
5x (default cohort, half the slides to train, half to test). The slide offset :math:`\beta_s`
and the tissue-type means (which project onto the lesion direction too) hide a lesion burden of
5–20 % in the slide mean, so mean pooling is visibly worse than an aggregator that finds the
lesion patches.

Tasks
-----
``task="binary"``: label 1 iff the slide has lesions (half of the patients).

``task="multiclass"``: an ordinal grade with three classes, the grade of the most severe lesion
present (as a pathologist grades a tumour by its worst component): 0 = no lesion; 1 = only
grade-1 lesions; 2 = at least one grade-2 lesion blob (the other blobs are grade 1 or 2 at
random). Grade-2 lesions have their own direction :math:`u_2` at 60° from :math:`u_1`
(cosine 0.5), so they are lesion-like along :math:`u_1` and distinguishable along the rest.

Both slides of a patient with two slides share the patient's label.

Files written by :meth:`SyntheticCohort.write`::

    root/labels.csv                      slide_id, case_id, label
    root/features/{mag:g}x/{slide}.h5    one per slide per magnification (5x, 10x, 20x, 2.5x ...)
    root/cohort.json                     generation parameters (written last)

Each h5 holds ``features`` float32 [N, D], ``coords`` int64 [N, 2] (top-left corners, level-0
pixels, raster order) with the attributes ``patch_size``, ``patch_size_level0``,
``target_magnification``, ``level0_magnification``, ``level0_width``, ``level0_height``,
``overlap`` and ``name`` (TRIDENT's names), and the per-patch ground truth ``lesion`` uint8 [N]
(1 = lesion patch; for a parent, 1 if any child is), ``lesion_grade`` uint8 [N] (0 = none,
for a parent the maximum over its children) and ``tissue`` int64 [N] (tissue type id).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "SyntheticCohort",
    "SyntheticLevel",
    "SyntheticSlide",
    "make_synthetic_cohort",
    "magnification_dirname",
]

# Bumped whenever the generator's output changes for the same parameters, so that a cohort
# written by an older generator is regenerated instead of being reused.
GENERATOR_VERSION = 1
FORMAT_NAME = "wsigraph-synthetic-cohort"
TASKS = ("binary", "multiclass")

PathLike = Union[str, os.PathLike]


def magnification_dirname(magnification: float) -> str:
    r"""Directory name of a magnification: ``20 -> "20x"``, ``2.5 -> "2.5x"``."""
    return f"{float(magnification):g}x"


def _number(value: float) -> Union[int, float]:
    r"""An integral float as ``int`` (so attributes read ``20``, not ``20.0``)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def _pair(value, name: str, kind=float) -> Tuple:
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = (value, value)
    value = tuple(kind(v) for v in value)
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be a number or a (low, high) pair with low <= high (got {value})")
    return value


@dataclass(frozen=True)
class SyntheticLevel:
    r"""One magnification of a synthetic slide (arrays in raster order, row-major, x fastest)."""
    magnification: float
    patch_size_level0: int
    features: np.ndarray      # float32 [N, D]
    coords: np.ndarray        # int64 [N, 2], top-left (x, y) in level-0 pixels
    lesion: np.ndarray        # uint8 [N], 1 = lesion patch
    lesion_grade: np.ndarray  # uint8 [N], 0 = none
    tissue: np.ndarray        # int64 [N], tissue type id

    @property
    def num_patches(self) -> int:
        return int(self.coords.shape[0])


@dataclass(frozen=True)
class SyntheticSlide:
    r"""A synthetic slide: its identifiers, label and one :class:`SyntheticLevel` per magnification."""
    slide_id: str
    case_id: str
    label: int
    level0_magnification: float
    level0_size: Tuple[int, int]   # (width, height) in level-0 pixels
    levels: Dict[float, SyntheticLevel]


@dataclass(frozen=True)
class SyntheticCohort:
    r"""Parameters of a synthetic cohort; :meth:`write` puts it on disk, deterministically from ``seed``.

    Args:
        num_slides: number of slides.
        seed: seed of everything (slide ``i`` depends only on ``seed``, ``i`` and the parameters).
        task: ``"binary"`` (lesion present) or ``"multiclass"`` (ordinal grade 0/1/2 of the worst lesion).
        magnifications: patch levels, any order; consecutive ratios must be integers ≥ 2.
        feature_dim: feature dimension :math:`D`.
        num_tissue_types: number of tissue types.
        patches_per_slide: number (or ``(low, high)`` range) of tissue patches at the highest
            magnification before holes are removed.
        patch_size: patch side in pixels at every target magnification.
        level0_magnifications: scan magnifications drawn per slide (each must be ≥ the highest
            magnification and give integer level-0 patch sizes).
        two_slide_fraction: probability that a patient has two slides.
        tissue_blobs: ``(low, high)`` number of tissue pieces.
        tissue_seeds: ``(low, high)`` number of Voronoi seeds of the tissue-type map.
        hole_fraction: fraction of highest-level tissue cells removed as background.
        lesion_fraction: ``(low, high)`` fraction of tissue covered by lesions in a lesion slide.
        lesion_blobs: ``(low, high)`` number of lesion blobs in a lesion slide.
        lesion_strength: :math:`\lambda`, norm of the lesion signal at the highest magnification.
        signal_retention: :math:`\gamma`, share of the lesion signal a parent keeps per zoom step.
        noise: :math:`\sigma`, per-dimension patch noise at every level.
        tissue_scale: :math:`\tau`, per-dimension spread of the tissue-type means.
        slide_effect: :math:`\kappa`, per-dimension spread of the per-slide offset.
    """
    num_slides: int = 60
    seed: int = 0
    task: str = "binary"
    magnifications: Tuple[float, ...] = (5, 10, 20)
    feature_dim: int = 64
    num_tissue_types: int = 4
    patches_per_slide: Tuple[int, int] = (300, 800)
    patch_size: int = 256
    level0_magnifications: Tuple[float, ...] = (20, 40)
    two_slide_fraction: float = 0.3
    tissue_blobs: Tuple[int, int] = (1, 3)
    tissue_seeds: Tuple[int, int] = (3, 6)
    hole_fraction: float = 0.02
    lesion_fraction: Tuple[float, float] = (0.05, 0.2)
    lesion_blobs: Tuple[int, int] = (1, 3)
    lesion_strength: float = 3.0
    signal_retention: float = 0.8
    noise: float = 1.0
    tissue_scale: float = 1.0
    slide_effect: float = 0.3

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} (got '{self.task}')")
        if int(self.num_slides) < 1:
            raise ValueError("num_slides must be >= 1")
        set_("num_slides", int(self.num_slides))
        set_("seed", int(self.seed))
        mags = sorted(float(m) for m in self.magnifications)
        if not mags or mags[0] <= 0 or len(set(mags)) != len(mags):
            raise ValueError(f"magnifications must be distinct positive numbers (got {self.magnifications})")
        for low, high in zip(mags[:-1], mags[1:]):
            ratio = high / low
            if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 2:
                raise ValueError(f"consecutive magnifications need an integer ratio >= 2 ({low:g}x -> {high:g}x)")
        set_("magnifications", tuple(_number(m) for m in mags))
        scans = tuple(_number(m) for m in sorted(float(m) for m in self.level0_magnifications))
        if not scans:
            raise ValueError("level0_magnifications must not be empty")
        for scan in scans:
            if scan < mags[-1]:
                raise ValueError(f"level-0 magnification {scan:g}x is below the highest level {mags[-1]:g}x")
            for mag in mags:
                size = self.patch_size * scan / mag
                if abs(size - round(size)) > 1e-9:
                    raise ValueError(f"patch_size {self.patch_size} at {mag:g}x is not an integer number "
                                     f"of level-0 pixels for a {scan:g}x scan")
        set_("level0_magnifications", scans)
        set_("patches_per_slide", _pair(self.patches_per_slide, "patches_per_slide", int))
        set_("tissue_blobs", _pair(self.tissue_blobs, "tissue_blobs", int))
        set_("tissue_seeds", _pair(self.tissue_seeds, "tissue_seeds", int))
        set_("lesion_fraction", _pair(self.lesion_fraction, "lesion_fraction", float))
        set_("lesion_blobs", _pair(self.lesion_blobs, "lesion_blobs", int))
        if self.patches_per_slide[0] < 1 or self.tissue_blobs[0] < 1 or self.tissue_seeds[0] < 1 \
                or self.lesion_blobs[0] < 1:
            raise ValueError("patch, blob and seed counts must be >= 1")
        if not (0 < self.lesion_fraction[0] and self.lesion_fraction[1] < 1):
            raise ValueError("lesion_fraction must lie in (0, 1)")
        if not 0 <= self.hole_fraction < 0.5 or not 0 <= self.two_slide_fraction <= 1:
            raise ValueError("hole_fraction must lie in [0, 0.5) and two_slide_fraction in [0, 1]")
        if not 0 <= self.signal_retention <= 1:
            raise ValueError("signal_retention must lie in [0, 1]")
        if self.feature_dim < 2 or self.num_tissue_types < 1 or self.patch_size < 1:
            raise ValueError("feature_dim must be >= 2, num_tissue_types and patch_size >= 1")

    # ------------------------------------------------------------------ cohort-level facts
    @property
    def num_classes(self) -> int:
        return 2 if self.task == "binary" else 3

    @property
    def feature_dirs(self) -> Dict[float, str]:
        r"""Feature directory of every magnification, relative to the cohort root."""
        return {m: f"features/{magnification_dirname(m)}" for m in self.magnifications}

    def parameters(self) -> dict:
        r"""All generation parameters as JSON-ready values."""
        params = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}

    def patch_size_level0(self, level0_magnification: float, magnification: float) -> int:
        return int(round(self.patch_size * float(level0_magnification) / float(magnification)))

    def _cohort_rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0])

    def lesion_directions(self) -> np.ndarray:
        r"""Unit lesion directions [num_grades + 1, D]; row 0 (no lesion) is zero."""
        rng = np.random.default_rng([self.seed, 1])
        first = rng.standard_normal(self.feature_dim)
        first /= np.linalg.norm(first)
        directions = np.zeros((3 if self.task == "multiclass" else 2, self.feature_dim))
        directions[1] = first
        if self.task == "multiclass":
            other = rng.standard_normal(self.feature_dim)
            other -= (other @ first) * first
            other /= np.linalg.norm(other)
            directions[2] = 0.5 * first + math.sqrt(0.75) * other   # cosine 0.5 with grade 1
        return directions

    def tissue_means(self) -> np.ndarray:
        r"""Tissue-type means [num_tissue_types, D], shared by all classes."""
        rng = np.random.default_rng([self.seed, 2])
        return self.tissue_scale * rng.standard_normal((self.num_tissue_types, self.feature_dim))

    def cases(self) -> List[Tuple[str, str, int]]:
        r"""``(slide_id, case_id, label)`` of every slide; the classes are balanced over patients."""
        rng = self._cohort_rng()
        sizes: List[int] = []
        remaining = self.num_slides
        while remaining > 0:
            two = remaining >= 2 and rng.random() < self.two_slide_fraction
            sizes.append(2 if two else 1)
            remaining -= sizes[-1]
        labels = np.arange(len(sizes)) % self.num_classes
        rng.shuffle(labels)
        rows = []
        for case, (size, label) in enumerate(zip(sizes, labels)):
            for _ in range(size):
                rows.append((f"slide_{len(rows):03d}", f"case_{case:03d}", int(label)))
        return rows

    # ------------------------------------------------------------------ one slide
    def generate_slide(self, index: int, cases: Optional[List[Tuple[str, str, int]]] = None) -> SyntheticSlide:
        r"""Slide ``index`` of the cohort, in memory."""
        slide_id, case_id, label = (cases or self.cases())[index]
        rng = np.random.default_rng([self.seed, 3, index])
        mags = [float(m) for m in self.magnifications]
        ratios = [int(round(high / low)) for low, high in zip(mags[:-1], mags[1:])]
        total_ratio = int(np.prod(ratios)) if ratios else 1
        scan = float(self.level0_magnifications[rng.integers(len(self.level0_magnifications))])

        # Highest level: tissue cells on an integer lattice, ordered by (y, x).
        cells = self._tissue_cells(rng)
        shift = -(cells.min(axis=0) // total_ratio) * total_ratio + total_ratio * rng.integers(1, 4, size=2)
        cells = cells + shift
        cells = cells[np.lexsort((cells[:, 0], cells[:, 1]))]
        tissue = self._tissue_types(rng, cells)
        grade = self._lesion_grades(rng, cells, label)

        dim = self.feature_dim
        directions = self.lesion_directions()
        signal = self.lesion_strength * directions[grade]                      # [N, D]
        base = (self.tissue_means()[tissue] + self.slide_effect * rng.standard_normal(dim)
                + self.noise * rng.standard_normal((cells.shape[0], dim)))

        ps0_low = self.patch_size_level0(scan, mags[0])
        origin = rng.integers(0, ps0_low, size=2)                               # sub-patch lattice offset
        levels: Dict[float, SyntheticLevel] = {}
        level_cells, level_grade, level_tissue = cells, grade, tissue
        for depth in range(len(mags) - 1, -1, -1):
            mag = mags[depth]
            ps0 = self.patch_size_level0(scan, mag)
            levels[mag] = SyntheticLevel(
                magnification=_number(mag), patch_size_level0=ps0,
                features=(base + signal).astype(np.float32),
                coords=(origin + level_cells * ps0).astype(np.int64),
                lesion=(level_grade > 0).astype(np.uint8), lesion_grade=level_grade.astype(np.uint8),
                tissue=level_tissue.astype(np.int64))
            if depth == 0:
                break
            # Parent lattice: same origin, side = ratio child sides, so a child's parent is a floor division.
            ratio = ratios[depth - 1]
            parent_cells, parent = np.unique(level_cells // ratio, axis=0, return_inverse=True)
            parent = parent.reshape(-1)
            order = np.lexsort((parent_cells[:, 0], parent_cells[:, 1]))       # raster order (y, x)
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            parent_cells, parent = parent_cells[order], rank[parent]
            num_parents = parent_cells.shape[0]
            count = np.bincount(parent, minlength=num_parents).astype(np.float64)
            fresh_noise = self.noise * np.sqrt(np.maximum(1.0 - 1.0 / count, 0.5))[:, None]
            base = _group_mean(base, parent, num_parents, count) + fresh_noise * rng.standard_normal((num_parents, dim))
            signal = self.signal_retention * _group_mean(signal, parent, num_parents, count)
            parent_grade = np.zeros(num_parents, dtype=np.int64)
            np.maximum.at(parent_grade, parent, level_grade)
            votes = np.zeros((num_parents, self.num_tissue_types), dtype=np.int64)
            np.add.at(votes, (parent, level_tissue), 1)
            level_cells, level_grade, level_tissue = parent_cells, parent_grade, votes.argmax(axis=1)

        extent = origin + (cells.max(axis=0) + total_ratio + 1) * self.patch_size_level0(scan, mags[-1])
        return SyntheticSlide(slide_id=slide_id, case_id=case_id, label=label,
                              level0_magnification=_number(scan),
                              level0_size=(int(extent[0]), int(extent[1])),
                              levels={m: levels[float(m)] for m in mags})

    def slides(self) -> Iterator[SyntheticSlide]:
        cases = self.cases()
        for index in range(len(cases)):
            yield self.generate_slide(index, cases)

    def _tissue_cells(self, rng: np.random.Generator) -> np.ndarray:
        r"""Integer (x, y) cells of the highest-level tissue: the cells nearest a union of ellipses."""
        target = int(rng.integers(self.patches_per_slide[0], self.patches_per_slide[1] + 1))
        num_blobs = int(rng.integers(self.tissue_blobs[0], self.tissue_blobs[1] + 1))
        shares = rng.dirichlet(np.full(num_blobs, 2.0))
        area = 1.1 * target * shares
        aspect = rng.uniform(1.0, 2.2, size=num_blobs)
        semi_major = np.sqrt(area / math.pi * aspect)
        semi_minor = np.sqrt(area / math.pi / aspect)
        angle = rng.uniform(0.0, math.pi, size=num_blobs)
        spread = 0.9 * math.sqrt(target) * (num_blobs - 1) / 2
        centre = rng.uniform(-spread, spread, size=(num_blobs, 2))
        reach = 2.0 * semi_major.max() + 2
        low = np.floor(centre.min(axis=0) - reach).astype(np.int64)
        high = np.ceil(centre.max(axis=0) + reach).astype(np.int64)
        xs, ys = np.meshgrid(np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1))
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        distance = _ellipse_distance(grid + 0.5, centre, semi_major, semi_minor, angle).min(axis=1)
        distance *= np.exp(0.06 * rng.standard_normal(distance.shape))        # ragged borders
        cells = grid[np.argpartition(distance, target - 1)[:target]]
        keep = rng.random(target) >= self.hole_fraction
        return cells[keep] if keep.any() else cells[:1]

    def _tissue_types(self, rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
        num_seeds = int(rng.integers(self.tissue_seeds[0], self.tissue_seeds[1] + 1))
        seeds = cells[rng.choice(cells.shape[0], size=min(num_seeds, cells.shape[0]), replace=False)]
        seed_type = rng.integers(0, self.num_tissue_types, size=seeds.shape[0])
        nearest = ((cells[:, None, :] - seeds[None, :, :]) ** 2).sum(-1).argmin(axis=1)
        return seed_type[nearest].astype(np.int64)

    def _lesion_grades(self, rng: np.random.Generator, cells: np.ndarray, label: int) -> np.ndarray:
        num = cells.shape[0]
        grade = np.zeros(num, dtype=np.int64)
        if label == 0:
            return grade
        fraction = rng.uniform(*self.lesion_fraction)
        num_blobs = int(rng.integers(self.lesion_blobs[0], self.lesion_blobs[1] + 1))
        total = max(num_blobs, int(round(fraction * num)))
        sizes = np.maximum(1, np.round(total * rng.dirichlet(np.full(num_blobs, 3.0)))).astype(np.int64)
        sizes = np.minimum(sizes, num)
        if self.task == "binary":
            blob_grade = np.ones(num_blobs, dtype=np.int64)
        elif label == 1:
            blob_grade = np.ones(num_blobs, dtype=np.int64)
        else:   # the worst lesion decides the grade: at least one grade-2 blob
            blob_grade = rng.integers(1, 3, size=num_blobs)
            blob_grade[rng.integers(num_blobs)] = 2
        centre = cells[rng.integers(0, num, size=num_blobs)] + 0.5
        aspect = rng.uniform(1.0, 2.5, size=num_blobs)
        angle = rng.uniform(0.0, math.pi, size=num_blobs)
        distance = _ellipse_distance(cells + 0.5, centre, np.sqrt(aspect), 1.0 / np.sqrt(aspect), angle)
        distance *= np.exp(0.1 * rng.standard_normal(distance.shape))
        # The size[j] cells nearest blob j's centre; later blobs overwrite earlier ones where they overlap.
        rank = np.argsort(np.argsort(distance, axis=0, kind="stable"), axis=0, kind="stable")
        inside = rank < sizes[None, :]
        for_cell = np.where(inside.any(axis=1), num_blobs - 1 - inside[:, ::-1].argmax(axis=1), -1)
        grade[for_cell >= 0] = blob_grade[for_cell[for_cell >= 0]]
        return grade

    # ------------------------------------------------------------------ disk
    def write(self, root: PathLike) -> Path:
        r"""Write the cohort under ``root`` and return ``root`` as a :class:`~pathlib.Path`.

        Idempotent: when ``root/cohort.json`` records the same parameters (and generator version),
        nothing is rewritten. ``cohort.json`` is written last, so an interrupted write is redone.
        With other parameters the cohort is regenerated and the files of the previous synthetic
        cohort that the new one does not have are removed (only files listed in its ``cohort.json``).
        Every file is written to a temporary file in its directory and moved into place.
        """
        root = Path(root)
        manifest_path = root / "cohort.json"
        previous = _read_manifest(manifest_path)
        manifest = self._manifest()
        if previous is not None and previous.get("format") == FORMAT_NAME \
                and previous.get("generator_version") == GENERATOR_VERSION \
                and previous.get("parameters") == manifest["parameters"]:
            return root
        if manifest_path.exists():
            manifest_path.unlink()   # a half-rewritten cohort must not look complete
        for mag in self.magnifications:
            (root / self.feature_dirs[mag]).mkdir(parents=True, exist_ok=True)
        cases = self.cases()
        written = set()
        for index in range(len(cases)):
            slide = self.generate_slide(index, cases)
            for mag, level in slide.levels.items():
                path = root / self.feature_dirs[mag] / f"{slide.slide_id}.h5"
                _write_level_h5(path, slide, level)
                written.add(path.resolve())
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["slide_id", "case_id", "label"])
        writer.writerows(cases)
        _atomic_write_text(root / "labels.csv", buffer.getvalue())
        if previous is not None and previous.get("format") == FORMAT_NAME:
            for relative in previous.get("files", []):
                stale = root / relative
                if stale.resolve() not in written and stale.is_file():
                    stale.unlink()
        _atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        return root

    def _manifest(self) -> dict:
        cases = self.cases()
        return {
            "format": FORMAT_NAME,
            "generator_version": GENERATOR_VERSION,
            "parameters": self.parameters(),
            "num_classes": self.num_classes,
            "labels": "labels.csv",
            "feature_dirs": {f"{m:g}": d for m, d in self.feature_dirs.items()},
            "slides": [row[0] for row in cases],
            "files": [f"{self.feature_dirs[m]}/{row[0]}.h5" for row in cases for m in self.magnifications],
        }

    @classmethod
    def from_root(cls, root: PathLike) -> "SyntheticCohort":
        r"""The parameters of the cohort written under ``root``."""
        manifest = _read_manifest(Path(root) / "cohort.json")
        if manifest is None or manifest.get("format") != FORMAT_NAME:
            raise FileNotFoundError(f"No synthetic cohort under {root}")
        return cls(**manifest["parameters"])


def make_synthetic_cohort(root: PathLike, **kwargs) -> Path:
    r"""Write ``SyntheticCohort(**kwargs)`` under ``root`` (see :meth:`SyntheticCohort.write`)."""
    return SyntheticCohort(**kwargs).write(root)


# ---------------------------------------------------------------------- helpers
def _ellipse_distance(points: np.ndarray, centre: np.ndarray, semi_major: np.ndarray,
                      semi_minor: np.ndarray, angle: np.ndarray) -> np.ndarray:
    r"""Ellipse-metric distance [P, B] of points [P, 2] to B ellipses (1 on each boundary)."""
    delta = points[:, None, :] - centre[None, :, :]
    cos, sin = np.cos(angle), np.sin(angle)
    along = delta[..., 0] * cos + delta[..., 1] * sin
    across = -delta[..., 0] * sin + delta[..., 1] * cos
    return np.sqrt((along / semi_major) ** 2 + (across / semi_minor) ** 2)


def _group_mean(values: np.ndarray, group: np.ndarray, num_groups: int, count: np.ndarray) -> np.ndarray:
    total = np.zeros((num_groups, values.shape[1]), dtype=np.float64)
    np.add.at(total, group, values)
    return total / count[:, None]


def _read_manifest(path: Path) -> Optional[dict]:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _temporary_path(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_level_h5(path: Path, slide: SyntheticSlide, level: SyntheticLevel) -> None:
    import h5py

    temporary = _temporary_path(path)
    try:
        with h5py.File(temporary, "w") as handle:
            features = handle.create_dataset("features", data=level.features)
            features.attrs["name"] = slide.slide_id
            features.attrs["encoder"] = "synthetic"
            coords = handle.create_dataset("coords", data=level.coords)
            coords.attrs["patch_size"] = int(
                round(level.patch_size_level0 * float(level.magnification) / float(slide.level0_magnification)))
            coords.attrs["patch_size_level0"] = int(level.patch_size_level0)
            coords.attrs["target_magnification"] = level.magnification
            coords.attrs["level0_magnification"] = slide.level0_magnification
            coords.attrs["level0_width"] = slide.level0_size[0]
            coords.attrs["level0_height"] = slide.level0_size[1]
            coords.attrs["overlap"] = 0
            coords.attrs["name"] = slide.slide_id
            handle.create_dataset("lesion", data=level.lesion)
            handle.create_dataset("lesion_grade", data=level.lesion_grade)
            handle.create_dataset("tissue", data=level.tissue)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
