"""Pareto fronts and hypervolume for trial objectives.

Plain functions on ``(n_points, n_objectives)`` numpy arrays. Internally every objective is
minimised; a ``directions`` argument (``"minimize"`` / ``"maximize"`` per column, Optuna's
spelling; ``"minimise"`` / ``"maximise"`` and Optuna ``StudyDirection`` values also accepted)
negates the maximised columns first, so callers pass values in their own units.

Conventions shared by every function here:

* A row with a NaN or an infinity (a failed or diverged trial) takes no part in domination:
  it is never on a front, never dominates another row, and contributes no hypervolume.
* Domination is strict Pareto domination: ``a`` dominates ``b`` when ``a`` is no worse in
  every objective and strictly better in at least one. Identical rows therefore do not
  dominate each other, and duplicates on the front are all kept.
* Noise-aware domination (``noise_aware_front``, ``indistinct_groups``) takes each figure's
  noise into account: ``a`` beats ``b`` beyond noise in one objective when
  ``a + z * sqrt(s_a**2 + s_b**2) < b`` (minimised), with ``s`` a standard-deviation-like
  scale per point and objective (a loss's standard error, a timing's IQR / 1.349, 0 for a
  prediction). ``a`` dominates ``b`` beyond noise when it beats ``b`` beyond noise in one
  objective and ``b`` beats ``a`` beyond noise in none. With every scale 0 this is strict
  Pareto domination, so the noise-aware front equals the exact one. The exact front stays what
  hypervolume is computed on: hypervolume measures the figures as they came out.
* Hypervolume is the Lebesgue measure of the union of boxes ``[p, reference]``. Only points
  strictly better than the reference in *every* objective contribute (a point on the
  reference's boundary spans a box of zero volume anyway). It is exact, not sampled.

Optuna has a hypervolume routine, but it is private (``optuna._hypervolume``) and may move in
any release, so this module carries its own; the tests cross-check the two (and fail, not skip,
when Optuna's moves).
"""

from __future__ import annotations


import numpy as np

__all__ = [
    "dominates",
    "non_dominated_mask",
    "noise_aware_front",
    "dominated_beyond_noise",
    "indistinct_groups",
    "group_names",
    "IQR_PER_SD",
    "NOISE_Z",
    "non_dominated_sort",
    "pareto_front",
    "hypervolume",
    "hypervolume_history",
    "reference_point",
    "knee_point",
    "normalise",
]

# The interquartile range of a normal distribution in standard deviations: a timing's IQR / 1.349
# is the standard deviation it would have if its repeats were normal (a robust estimate otherwise).
IQR_PER_SD = 1.349
# How many combined noise scales apart two figures must be to count as different: the report's and
# the halving planner's rule.
NOISE_Z = 2.0

_MINIMISE = {"minimize", "minimise", "min"}
_MAXIMISE = {"maximize", "maximise", "max"}

# Rows per block when building pairwise domination tables: keeps the temporary
# (block, n, n_objectives) comparison arrays to a few tens of MB for large studies.
_BLOCK = 256


# --------------------------------------------------------------------------- input handling


def _signs(directions, n_obj: int) -> np.ndarray:
    """+1 for a minimised column, -1 for a maximised one."""
    if directions is None:
        return np.ones(n_obj)
    if isinstance(directions, str):
        raise ValueError(
            f"directions must be a sequence with one entry per objective, got the string "
            f"{directions!r}; use e.g. [{directions!r}] * {n_obj}"
        )
    directions = list(directions)
    if len(directions) != n_obj:
        raise ValueError(
            f"directions has {len(directions)} entries but points have {n_obj} objectives"
        )
    signs = np.empty(n_obj)
    for i, d in enumerate(directions):
        # Optuna's StudyDirection is an enum whose .name is MINIMIZE / MAXIMIZE.
        name = str(getattr(d, "name", d)).lower()
        if name in _MINIMISE:
            signs[i] = 1.0
        elif name in _MAXIMISE:
            signs[i] = -1.0
        else:
            raise ValueError(
                f"directions[{i}] is {d!r}; allowed: 'minimize' or 'maximize'"
            )
    return signs


def _as_points(points, name: str = "points", n_obj: int | None = None) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        if n_obj is None:
            n_obj = arr.shape[-1] if arr.ndim == 2 else 0
        return np.empty((0, n_obj))
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_points, n_objectives), got shape {arr.shape}"
        )
    if n_obj is not None and arr.shape[1] != n_obj:
        raise ValueError(
            f"{name} have {arr.shape[1]} objectives but {n_obj} were expected"
        )
    return arr


def _oriented(points, directions) -> tuple[np.ndarray, np.ndarray]:
    """Points as a minimisation problem, and the mask of rows that are fully finite."""
    arr = _as_points(points)
    signs = _signs(directions, arr.shape[1])
    arr = arr * signs
    return arr, np.isfinite(arr).all(axis=1)


def _dominated_by_any(p: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each row of ``p``, whether some row of ``others`` dominates it (both finite)."""
    out = np.zeros(len(p), dtype=bool)
    for start in range(0, len(p), _BLOCK):
        block = p[start : start + _BLOCK, None, :]  # (b, 1, m)
        le = (others[None, :, :] <= block).all(axis=2)
        lt = (others[None, :, :] < block).any(axis=2)
        out[start : start + _BLOCK] = (le & lt).any(axis=1)
    return out


# --------------------------------------------------------------------------- domination


def dominates(a, b, directions=None) -> bool:
    """Whether objective vector ``a`` Pareto-dominates ``b``.

    ``a`` is no worse than ``b`` in every objective and strictly better in one. A vector with
    a NaN or an infinity never dominates and is never dominated (see the module notes).
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a has {a.size} objectives but b has {b.size}")
    signs = _signs(directions, a.size)
    a, b = a * signs, b * signs
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return False
    return bool((a <= b).all() and (a < b).any())


def non_dominated_mask(points, directions=None) -> np.ndarray:
    """Boolean mask of the rows on the Pareto front.

    Identical rows are all non-dominated; rows with NaN/inf are always False.
    """
    arr, finite = _oriented(points, directions)
    mask = np.zeros(len(arr), dtype=bool)
    idx = np.flatnonzero(finite)
    if idx.size:
        valid = arr[idx]
        mask[idx] = ~_dominated_by_any(valid, valid)
    return mask


def _noise_table(noise, shape) -> np.ndarray:
    """The noise scales as an array of ``shape``: NaN and None count as 0 (no estimate), a
    negative scale is an error."""
    arr = np.asarray(noise, dtype=float) if noise is not None else np.zeros(shape)
    if arr.shape != shape:
        raise ValueError(f"noise has shape {arr.shape} but points have shape {shape}; one scale per figure")
    arr = np.where(np.isnan(arr), 0.0, arr)
    if (arr < 0).any():
        raise ValueError(f"noise scales must be >= 0, got {arr[arr < 0].tolist()}")
    return arr


def _noise_comparisons(points, noise, directions, z: float):
    """(oriented points, finite rows, beats[i, j, k]: row i beats row j beyond noise in objective
    k, within[i, j]: rows i and j are within noise of each other in every objective)."""
    if z < 0:
        raise ValueError(f"z must be >= 0, got {z}")
    arr, finite = _oriented(points, directions)
    noise = _noise_table(noise, arr.shape)
    margin = z * np.sqrt(noise[:, None, :] ** 2 + noise[None, :, :] ** 2)  # (n, n, m)
    beats = arr[:, None, :] + margin < arr[None, :, :]
    within = ~(beats | beats.transpose(1, 0, 2)).any(axis=2)
    both = finite[:, None] & finite[None, :]
    return arr, finite, beats & both[:, :, None], within & both


def dominated_beyond_noise(points, noise, directions=None, z: float = 2.0) -> np.ndarray:
    """``table[i, j]``: row ``i`` dominates row ``j`` beyond noise (see `noise_aware_front`);
    False wherever either row has a NaN/inf."""
    _, _, beats, _ = _noise_comparisons(points, noise, directions, z)
    return beats.any(axis=2) & ~beats.transpose(1, 0, 2).any(axis=2)


def noise_aware_front(points, noise, directions=None, z: float = 2.0) -> np.ndarray:
    """Boolean mask of the rows no other row dominates beyond noise.

    ``noise`` has the shape of ``points``: a standard-deviation-like scale for every figure (NaN
    or None: no estimate, taken as 0). Row ``a`` dominates row ``b`` beyond noise when ``a`` beats
    ``b`` beyond noise in one objective and ``b`` beats ``a`` beyond noise in none (module notes).
    A row that is better than another only by less than its noise is therefore not a front point
    for that alone, and a row slightly behind a front point, within noise, is not pushed off the
    front by it. Rows with NaN/inf are always False. Pairwise: meant for the hundreds of points a
    study has, not millions.
    """
    arr, finite = _oriented(points, directions)
    return finite & ~dominated_beyond_noise(arr, noise, None, z).any(axis=0)


def indistinct_groups(points, noise, directions=None, z: float = 2.0, among=None) -> list[np.ndarray]:
    """Rows that cannot be told apart: two rows within noise of each other in every objective
    (neither beats the other beyond noise anywhere) are in one group, and groups are joined
    transitively (a ~ b and b ~ c puts a, b, c together even if a and c differ beyond noise).

    ``among`` (a boolean mask or row indices) limits the grouping to those rows, e.g. the front.
    Returns the groups as arrays of row indices, a group of one included, ordered by their first
    row; rows with NaN/inf are in no group.
    """
    arr, finite, _, within = _noise_comparisons(points, noise, directions, z)
    keep = np.zeros(len(arr), dtype=bool)
    if among is None:
        keep[:] = True
    else:
        among = np.asarray(among)
        keep[among if among.dtype != bool else np.flatnonzero(among)] = True
    rows = np.flatnonzero(keep & finite)
    label = {int(r): int(r) for r in rows}  # union-find with the smallest row as each group's root

    def root(r: int) -> int:
        while label[r] != r:
            label[r] = label[label[r]]
            r = label[r]
        return r

    for i, j in zip(*np.nonzero(np.triu(within[np.ix_(rows, rows)], k=1))):
        a, b = root(int(rows[i])), root(int(rows[j]))
        label[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(root(int(r)), []).append(int(r))
    return [np.array(g) for _, g in sorted(groups.items())]


def group_names(n: int) -> list[str]:
    """Names for ``n`` groups: A, B, ..., Z, AA, AB, ... (spreadsheet columns)."""
    names = []
    for k in range(n):
        name, k = "", k + 1
        while k:
            k, rest = divmod(k - 1, 26)
            name = chr(ord("A") + rest) + name
        names.append(name)
    return names


def non_dominated_sort(points, directions=None) -> list[np.ndarray]:
    """Fronts 0, 1, 2, ... as arrays of row indices (NSGA-II's fast non-dominated sort).

    Front 0 is the Pareto front; front k is the front of what remains after removing fronts
    0..k-1. Each array is in ascending index order. Rows with NaN/inf are in no front (they
    have no rank); find them with ``~np.isfinite(points).all(axis=1)``.
    """
    arr, finite = _oriented(points, directions)
    idx = np.flatnonzero(finite)
    valid = arr[idx]
    n = len(valid)
    if n == 0:
        return []
    # dom[i, j]: i dominates j. One n x n bool table, built in blocks.
    dom = np.empty((n, n), dtype=bool)
    for start in range(0, n, _BLOCK):
        block = valid[start : start + _BLOCK, None, :]
        dom[start : start + _BLOCK] = (block <= valid[None]).all(axis=2) & (
            block < valid[None]
        ).any(axis=2)
    count = dom.sum(axis=0)  # how many rows dominate each row
    fronts = []
    current = np.flatnonzero(count == 0)
    assigned = np.zeros(n, dtype=bool)
    while current.size:
        fronts.append(idx[current])
        assigned[current] = True
        count = count - dom[current].sum(axis=0)
        current = np.flatnonzero((count == 0) & ~assigned)
    return fronts


def pareto_front(points, directions=None) -> np.ndarray:
    """Indices of the non-dominated rows, sorted by ascending value of the first objective.

    Ties are broken by the following objectives, then by index, so a 2-D front comes out as
    the staircase a plot draws.
    """
    arr = _as_points(points)
    idx = np.flatnonzero(non_dominated_mask(arr, directions))
    if idx.size == 0:
        return idx
    sub = arr[idx]
    # np.lexsort sorts by the last key first; the index is the final tie-breaker.
    order = np.lexsort((idx,) + tuple(sub[:, k] for k in reversed(range(arr.shape[1]))))
    return idx[order]


# --------------------------------------------------------------------------- hypervolume


def _hv2d(p: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume by a sweep along the first objective.

    ``p`` must lie strictly inside ``ref``; dominated points and duplicates are skipped.
    """
    if len(p) == 0:
        return 0.0
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    # After sorting by x (then y), a point is on the front iff its y is below every earlier y.
    prev_min = np.minimum.accumulate(np.concatenate(([np.inf], p[:-1, 1])))
    front = p[p[:, 1] < prev_min]
    widths = np.diff(np.concatenate((front[:, 0], ref[:1])))
    return float(np.dot(widths, ref[1] - front[:, 1]))


def _hv(p: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume of points strictly inside ``ref`` (HSO: slice along the last axis).

    Sorted by the last objective, the region between levels z_i and z_{i+1} is dominated
    exactly by the (d-1)-D projections of the first i+1 points, so the volume is the sum of
    slab thickness times a (d-1)-D hypervolume. 2-D is the sweep above, so 3-D costs
    O(n^2 log n) (a few ms for hundreds of points); higher d grows fast and is meant for the
    tens of points a 4+-objective study puts on its front.
    """
    n, d = p.shape
    if n == 0:
        return 0.0
    if d == 1:
        return float(ref[0] - p[:, 0].min())
    if d == 2:
        return _hv2d(p, ref)
    if n == 1:
        return float(np.prod(ref - p[0]))
    p = p[np.argsort(p[:, -1], kind="stable")]
    z = p[:, -1]
    thickness = np.diff(np.concatenate((z, ref[-1:])))
    total = 0.0
    for i in range(n):
        if thickness[i] == 0.0:
            continue  # next point sits at the same level; its slab is counted with it
        proj = p[: i + 1, :-1]
        if d - 1 > 2 and i > 0:
            proj = proj[~_dominated_by_any(proj, proj)]
        total += thickness[i] * _hv(proj, ref[:-1])
    return float(total)


def _prepare_hv(points, reference, directions) -> tuple[np.ndarray, np.ndarray]:
    """Oriented reference and the oriented points that can contribute volume."""
    ref = np.asarray(reference, dtype=float).ravel()
    arr = _as_points(points, n_obj=None)
    if arr.shape[0] and arr.shape[1] != ref.size:
        raise ValueError(
            f"reference has {ref.size} objectives but points have {arr.shape[1]}; "
            f"reference must have one entry per column of points"
        )
    if not np.isfinite(ref).all():
        raise ValueError(f"reference must be finite, got {ref.tolist()}")
    signs = _signs(directions, ref.size)
    ref = ref * signs
    if arr.shape[0] == 0:
        return np.empty((0, ref.size)), ref
    arr = arr * signs
    keep = np.isfinite(arr).all(axis=1) & (arr < ref).all(axis=1)
    return arr[keep], ref


def hypervolume(points, reference, directions=None) -> float:
    """Exact hypervolume dominated by ``points`` and bounded by ``reference``.

    ``reference`` is in the same units as ``points`` (maximised columns are flipped for both).
    Points that are not strictly better than the reference in every objective, and rows with
    NaN/inf, contribute nothing. Raises ValueError when the reference's length differs from
    the number of objectives.
    """
    p, ref = _prepare_hv(points, reference, directions)
    if len(p) > 1 and p.shape[1] > 2:
        p = p[~_dominated_by_any(p, p)]
    return _hv(p, ref)


def hypervolume_history(points_in_trial_order, reference=None, directions=None) -> np.ndarray:
    """Hypervolume of the first k trials, for k = 1..n (the study's progress curve).

    One reference is used for the whole curve so its values are comparable; with
    ``reference=None`` it is ``reference_point`` of all the points given. Rows that cannot
    contribute (NaN/inf, outside the reference, dominated by the front so far) leave the value
    unchanged; otherwise the hypervolume of the updated front is recomputed exactly.
    """
    arr = _as_points(points_in_trial_order, "points_in_trial_order")
    if reference is None:
        reference = reference_point(arr, directions)
    _, ref = _prepare_hv(arr, reference, directions)  # validates reference against arr
    out = np.zeros(len(arr))
    if len(arr) == 0:
        return out
    oriented = arr * _signs(directions, ref.size)
    useful = np.isfinite(oriented).all(axis=1) & (oriented < ref).all(axis=1)
    front = np.empty((0, ref.size))
    current = 0.0
    for k in range(len(arr)):
        if useful[k]:
            q = oriented[k]
            # Weakly dominated (including an exact duplicate): the union of boxes is unchanged.
            if not (front <= q).all(axis=1).any():
                front = front[~(q <= front).all(axis=1)]
                front = np.vstack((front, q))
                current = _hv(front, ref)
        out[k] = current
    return out


def reference_point(points, directions=None, margin: float = 0.1) -> np.ndarray:
    """A default hypervolume reference: the worst value per objective pushed out by a margin.

    For each objective, ``worst + margin * (worst - best)`` in the worse direction (larger for a
    minimised objective, smaller for a maximised one), over the finite rows. The margin lets
    the extreme points of the front contribute volume; without it they would sit on the
    reference's boundary and count for nothing. Where an objective has zero range (one trial,
    or a constant), ``margin * max(|worst|, 1)`` is used instead.

    Hypervolumes are comparable only under the same reference. Fix it once for a study (from
    an early batch, from a known bound such as the MHA baseline's loss and latency, or from
    the finished study) and pass the same array to every ``hypervolume`` call; recomputing it
    as trials arrive moves it and the curve stops meaning progress.
    """
    arr, finite = _oriented(points, directions)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    valid = arr[finite]
    if len(valid) == 0:
        raise ValueError("points has no row with all objectives finite; cannot place a reference")
    worst = valid.max(axis=0)
    span = worst - valid.min(axis=0)
    span = np.where(span > 0, span, np.maximum(np.abs(worst), 1.0))
    return (worst + margin * span) * _signs(directions, arr.shape[1])


# --------------------------------------------------------------------------- choosing a point


def normalise(points, ideal, nadir) -> np.ndarray:
    """Map each objective so ``ideal`` goes to 0 and ``nadir`` to 1.

    Works for either direction (a maximised column has ideal > nadir and still maps to
    [0, 1]). An objective with ``ideal == nadir`` maps to 0.
    """
    arr = np.asarray(points, dtype=float)
    ideal = np.asarray(ideal, dtype=float)
    nadir = np.asarray(nadir, dtype=float)
    span = nadir - ideal
    safe = np.where(span != 0, span, 1.0)
    return np.where(span != 0, (arr - ideal) / safe, 0.0)


def knee_point(points, directions=None) -> int:
    """Row index of the knee of a 2-objective front.

    The front is normalised so its two extremes sit at (0, 1) and (1, 0); the knee is the
    front point farthest from the line between them on the ideal side, i.e. the one with the
    smallest ``f1 + f2`` after normalising. It is the trade-off where a little more of one
    objective starts to cost a lot of the other. On a straight or concave front every point
    is at or behind that line and the least-bad one is returned; ties go to the smaller first
    objective (in minimisation orientation). Raises ValueError for other than 2 objectives or
    no finite row.
    """
    arr, _ = _oriented(points, directions)
    if arr.shape[1] != 2:
        raise ValueError(f"knee_point needs exactly 2 objectives, points have {arr.shape[1]}")
    front = np.flatnonzero(non_dominated_mask(arr))
    if front.size == 0:
        raise ValueError("points has no row with all objectives finite; no knee to pick")
    f = arr[front]
    z = normalise(f, f.min(axis=0), f.max(axis=0))
    # Signed distance to the line x + y = 1 is (1 - x - y) / sqrt(2); the sqrt(2) is moot.
    score = 1.0 - z.sum(axis=1)
    order = np.lexsort((front, f[:, 1], f[:, 0], -score))
    return int(front[order[0]])
