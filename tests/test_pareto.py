"""Tests for sqa_search.search.pareto: hand-computed cases first, then property checks."""

import itertools
import time

import numpy as np
import pytest

from sqa_search.search.pareto import (
    IQR_PER_SD,
    dominates,
    group_names,
    hypervolume,
    indistinct_groups,
    hypervolume_history,
    knee_point,
    non_dominated_mask,
    non_dominated_sort,
    noise_aware_front,
    normalise,
    pareto_front,
    reference_point,
)

NAN, INF = float("nan"), float("inf")

# 2-D staircase used by several tests.
#
#   y
#   4 +-----------R            R = reference (4, 4)
#   3 A###########|            A = (1, 3): box [1,4] x [3,4]
#   2 |   B#######|            B = (2, 2): box [2,4] x [2,4]
#   1 |   |   C###|            C = (3, 1): box [3,4] x [1,4]
#   0 +---+---+---+-- x
#     1   2   3   4
#
# Sweep in x: [1,2) height 4-3 = 1 -> 1; [2,3) height 4-2 = 2 -> 2; [3,4) height 4-1 = 3 -> 3.
# Total 1 + 2 + 3 = 6.
STAIR = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
STAIR_REF = np.array([4.0, 4.0])


# --------------------------------------------------------------------------- domination


def test_dominates_basic_and_strictness():
    assert dominates([1, 2], [2, 2])
    assert not dominates([2, 2], [1, 2])
    assert not dominates([1, 2], [1, 2])  # equal vectors do not dominate each other
    assert not dominates([1, 3], [2, 2])  # incomparable
    assert not dominates([2, 2], [1, 3])


def test_dominates_directions_and_non_finite():
    # (loss, accuracy): lower loss and higher accuracy is better.
    assert dominates([1.0, 0.9], [1.1, 0.8], directions=["minimize", "maximize"])
    assert not dominates([1.0, 0.7], [1.1, 0.8], directions=["minimize", "maximize"])
    assert not dominates([NAN, 0.0], [5.0, 5.0])
    assert not dominates([0.0, 0.0], [NAN, 5.0])
    assert not dominates([-INF, 0.0], [5.0, 5.0])
    with pytest.raises(ValueError, match="objectives"):
        dominates([1, 2], [1, 2, 3])


def test_non_dominated_mask_duplicates_and_invalid_rows():
    pts = np.array(
        [
            [1.0, 3.0],
            [2.0, 2.0],
            [2.0, 2.0],  # duplicate of the row above: both stay on the front
            [3.0, 1.0],
            [3.0, 3.0],  # dominated by (2, 2)
            [NAN, 0.0],  # NaN: never on the front ...
            [-INF, -INF],  # ... and an infinity never dominates, even a "perfect" one
            [0.5, INF],
        ]
    )
    mask = non_dominated_mask(pts)
    assert mask.tolist() == [True, True, True, True, False, False, False, False]
    # All-identical points are all non-dominated.
    assert non_dominated_mask(np.ones((4, 3))).all()
    assert non_dominated_mask(np.empty((0, 2))).shape == (0,)


def test_non_dominated_sort_hand_labelled():
    pts = np.array(
        [
            [1.0, 4.0],  # 0 A  front 0
            [2.0, 2.0],  # 1 B  front 0
            [4.0, 1.0],  # 2 C  front 0
            [3.0, 3.0],  # 3 D  dominated by B only            -> front 1
            [2.0, 5.0],  # 4 E  dominated by A; D vs E incomparable -> front 1
            [4.0, 4.0],  # 5 F  dominated by D (and A, B, C)   -> front 2
            [5.0, 5.0],  # 6 G  dominated by F                 -> front 3
            [2.0, 2.0],  # 7 H  duplicate of B                  -> front 0
            [NAN, 1.0],  # 8    no rank
        ]
    )
    fronts = non_dominated_sort(pts)
    assert [f.tolist() for f in fronts] == [[0, 1, 2, 7], [3, 4], [5], [6]]
    assert non_dominated_sort(np.empty((0, 2))) == []


def test_non_dominated_sort_agrees_with_peeling():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(120, 3)).astype(float)  # many ties and duplicates
    fronts = non_dominated_sort(pts)
    remaining = np.arange(len(pts))
    for front in fronts:
        peeled = remaining[non_dominated_mask(pts[remaining])]
        assert front.tolist() == peeled.tolist()
        remaining = np.setdiff1d(remaining, front)
    assert remaining.size == 0


def test_pareto_front_sorted_by_first_objective():
    pts = np.array([[3.0, 1.0], [5.0, 5.0], [1.0, 3.0], [2.0, 2.0]])
    assert pareto_front(pts).tolist() == [2, 3, 0]
    # Maximised first objective: sorted by ascending raw value still.
    pts_max = np.array([[1.0, 1.0], [3.0, 3.0], [2.0, 2.0], [0.0, 5.0]])
    assert pareto_front(pts_max, ["maximize", "minimize"]).tolist() == [0, 2, 1]


def test_direction_validation():
    with pytest.raises(ValueError, match="directions has 1 entries"):
        non_dominated_mask(STAIR, ["minimize"])
    with pytest.raises(ValueError, match=r"directions\[1\]"):
        non_dominated_mask(STAIR, ["minimize", "up"])
    with pytest.raises(ValueError, match="sequence"):
        non_dominated_mask(STAIR, "minimize")
    # British spelling and Optuna's enum are accepted.
    # (1, 3) has the lowest x and the highest y: it dominates the rest.
    assert non_dominated_mask(STAIR, ["minimise", "maximise"]).tolist() == [True, False, False]
    from optuna.study import StudyDirection as d

    assert non_dominated_mask(STAIR, [d.MINIMIZE, d.MAXIMIZE]).tolist() == [True, False, False]


# --------------------------------------------------------------------------- hypervolume, by hand


def test_hypervolume_2d_staircase():
    assert hypervolume(STAIR, STAIR_REF) == pytest.approx(6.0)
    # Order does not matter.
    assert hypervolume(STAIR[::-1], STAIR_REF) == pytest.approx(6.0)
    # One point: a plain rectangle (4-2) * (4-2) = 4.
    assert hypervolume(STAIR[1:2], STAIR_REF) == pytest.approx(4.0)


def test_hypervolume_3d_two_overlapping_boxes():
    # Reference (4, 4, 4).
    #   a = (1, 2, 3): box [1,4] x [2,4] x [3,4] -> 3 * 2 * 1 = 6
    #   b = (2, 1, 2): box [2,4] x [1,4] x [2,4] -> 2 * 3 * 2 = 12
    #   a ^ b: lower corner max(a, b) = (2, 2, 3) -> 2 * 2 * 1 = 4
    # Inclusion-exclusion: 6 + 12 - 4 = 14.
    pts = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 2.0]])
    assert hypervolume(pts, [4.0, 4.0, 4.0]) == pytest.approx(14.0)


def test_hypervolume_3d_three_boxes_inclusion_exclusion():
    # Reference (3, 3, 3); a = (0, 1, 1), b = (1, 0, 1), c = (1, 1, 0).
    #   |a| = |b| = |c| = 3 * 2 * 2 = 12
    #   pairwise corners are all (1, 1, 1): |a^b| = |a^c| = |b^c| = 2 * 2 * 2 = 8
    #   triple corner (1, 1, 1): 8
    # 36 - 24 + 8 = 20.
    pts = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert hypervolume(pts, [3.0, 3.0, 3.0]) == pytest.approx(20.0)


def test_point_outside_or_on_reference_contributes_nothing():
    extra = np.array(
        [
            [5.0, 0.0],  # worse than the reference in x
            [0.0, 4.0],  # on the reference's boundary in y: zero-volume box
            [NAN, 0.0],
            [-INF, 0.0],  # a diverged trial must not blow the volume up
        ]
    )
    assert hypervolume(np.vstack([STAIR, extra]), STAIR_REF) == pytest.approx(6.0)
    assert hypervolume(extra, STAIR_REF) == 0.0
    assert hypervolume(np.empty((0, 2)), STAIR_REF) == 0.0
    assert hypervolume([], STAIR_REF) == 0.0


def test_hypervolume_duplicates_and_dominated_points():
    pts = np.vstack([STAIR, STAIR[1], [3.0, 3.0], [2.0, 2.0]])
    assert hypervolume(pts, STAIR_REF) == pytest.approx(6.0)
    pts3 = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [2.0, 1.0, 2.0], [3.0, 3.0, 3.0]])
    assert hypervolume(pts3, [4.0, 4.0, 4.0]) == pytest.approx(14.0)


def test_hypervolume_maximise_flip():
    # (loss, accuracy) with accuracy maximised, reference (4, 0).
    # Negating accuracy gives (1,-1), (2,-2), (3,-3) against (4, 0): the staircase shifted
    # down by 4, so the same 1 + 2 + 3 = 6.
    pts = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert hypervolume(pts, [4.0, 0.0], ["minimize", "maximize"]) == pytest.approx(6.0)
    # Without the flip every point is worse than the reference in accuracy.
    assert hypervolume(pts, [4.0, 0.0]) == 0.0


def test_hypervolume_1d():
    assert hypervolume([[3.0], [1.0], [2.0]], [5.0]) == pytest.approx(4.0)


def test_hypervolume_reference_mismatch_names_arguments():
    with pytest.raises(ValueError, match="reference.*points"):
        hypervolume(STAIR, [4.0, 4.0, 4.0])
    with pytest.raises(ValueError, match="reference"):
        hypervolume(STAIR, [4.0, INF])
    with pytest.raises(ValueError, match="points"):
        hypervolume(np.ones((2, 2, 2)), [4.0, 4.0])


# --------------------------------------------------------------------------- hypervolume, properties


def _grid_hv(pts: np.ndarray, ref: np.ndarray) -> int:
    """Brute force for integer points: count unit cells [c, c+1) covered by some box [p, ref)."""
    axes = [np.arange(int(lo), int(r)) for lo, r in zip(pts.min(axis=0), ref)]
    cells = np.array(list(itertools.product(*axes)), dtype=float)
    covered = (pts[None, :, :] <= cells[:, None, :]).all(axis=2).any(axis=1)
    return int(covered.sum())


@pytest.mark.parametrize("dim,n,side", [(2, 15, 10), (3, 25, 8), (3, 60, 6), (4, 12, 5)])
def test_hypervolume_matches_integer_grid(dim, n, side):
    rng = np.random.default_rng(dim * 100 + n)
    for _ in range(5):
        pts = rng.integers(0, side, size=(n, dim)).astype(float)
        ref = np.full(dim, float(side))
        # Integer coordinates: every partial sum is an integer, so the match is exact.
        assert hypervolume(pts, ref) == _grid_hv(pts, ref)


def test_hypervolume_matches_monte_carlo_3d():
    rng = np.random.default_rng(1234)
    n_samples = 100_000
    for n_points in (5, 20, 40):
        pts = rng.uniform(0.0, 1.0, size=(n_points, 3))
        ref = np.array([1.0, 1.0, 1.0])
        samples = rng.uniform(0.0, 1.0, size=(n_samples, 3))
        hit = np.zeros(n_samples, dtype=bool)
        for p in pts:
            hit |= (samples >= p).all(axis=1)
        frac = hit.mean()
        # Box volume is 1, so HV = fraction covered. Binomial std error sqrt(f(1-f)/N) is at
        # most 0.0016 here; 5 sigma (plus a floor for f near 0 or 1) essentially never fails
        # for a correct implementation, yet catches any real slab or overlap error.
        tol = 5 * np.sqrt(frac * (1 - frac) / n_samples) + 1e-4
        assert abs(hypervolume(pts, ref) - frac) < tol


def test_hypervolume_invariant_to_scaling_and_objective_order():
    rng = np.random.default_rng(7)
    pts = rng.uniform(0, 1, size=(40, 3))
    ref = np.array([1.1, 1.2, 1.3])
    hv = hypervolume(pts, ref)
    perm = [2, 0, 1]
    assert hypervolume(pts[:, perm], ref[perm]) == pytest.approx(hv, rel=1e-12)
    scale = np.array([2.0, 0.5, 10.0])
    assert hypervolume(pts * scale, ref * scale) == pytest.approx(hv * 10.0, rel=1e-12)


def test_hypervolume_3d_few_hundred_points_is_fast():
    rng = np.random.default_rng(3)
    # Points on the simplex-like surface x + y + z = 1: all non-dominated, the worst case.
    raw = rng.dirichlet([1.0, 1.0, 1.0], size=400)
    t0 = time.perf_counter()
    hv = hypervolume(raw, [1.0, 1.0, 1.0])
    elapsed = time.perf_counter() - t0
    assert non_dominated_mask(raw).all()
    # The boxes only cover the region above the plane x + y + z = 1 (volume 5/6) in the
    # limit; 400 points cover most of it.
    assert 0.75 < hv < 5 / 6
    assert elapsed < 1.0, f"3-D hypervolume of 400 front points took {elapsed:.2f} s"


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_hypervolume_matches_optuna_private_routine(dim):
    # Optuna's routine is private (it may move in any release): if this import or call breaks,
    # the cross-check is lost, which should be seen as a failure, not a skip.
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(dim)
    for n in (1, 2, 7, 30):
        pts = rng.uniform(0, 1, size=(n, dim))
        ref = np.full(dim, 1.05)
        expected = float(compute_hypervolume(pts, ref))
        assert expected > 0
        assert hypervolume(pts, ref) == pytest.approx(expected, rel=1e-10, abs=1e-12)


# --------------------------------------------------------------------------- history, reference


def test_hypervolume_history_by_hand():
    trials = np.array(
        [
            [2.0, 2.0],  # box 2 * 2 = 4                      -> 4
            [5.0, 5.0],  # outside the reference               -> 4
            [1.0, 3.0],  # adds [1,2] x [3,4] = 1              -> 5
            [2.0, 2.0],  # duplicate                            -> 5
            [NAN, 1.0],  # failed trial                         -> 5
            [3.0, 1.0],  # adds [3,4] x [1,2] = 1              -> 6
            [2.5, 2.5],  # dominated                            -> 6
        ]
    )
    np.testing.assert_allclose(hypervolume_history(trials, STAIR_REF), [4, 4, 5, 5, 5, 6, 6])
    # The same trials with the second objective maximised (negated values and reference).
    flipped, ref_flipped = trials * [1, -1], STAIR_REF * [1, -1]
    np.testing.assert_allclose(
        hypervolume_history(flipped, ref_flipped, ["minimize", "maximize"]), [4, 4, 5, 5, 5, 6, 6]
    )


def test_hypervolume_history_matches_prefix_hypervolumes():
    rng = np.random.default_rng(11)
    trials = rng.uniform(0, 1, size=(50, 3))
    trials[::9] = np.nan
    ref = np.array([0.9, 0.9, 0.9])  # some trials fall outside
    hist = hypervolume_history(trials, ref)
    expected = [hypervolume(trials[: k + 1], ref) for k in range(len(trials))]
    np.testing.assert_allclose(hist, expected, rtol=1e-12, atol=1e-15)
    assert (np.diff(hist) >= 0).all()
    # Default reference: the one reference_point gives for the whole set.
    np.testing.assert_allclose(
        hypervolume_history(trials), hypervolume_history(trials, reference_point(trials))
    )
    assert hypervolume_history(np.empty((0, 3)), ref).shape == (0,)
    with pytest.raises(ValueError, match="reference"):
        hypervolume_history(trials, [1.0, 1.0])


def test_reference_point():
    # worst (3, 3), range (2, 2): 3 + 0.1 * 2 = 3.2 per objective.
    np.testing.assert_allclose(reference_point(STAIR), [3.2, 3.2])
    # Maximised second column: worst is the smallest (1), pushed down: 1 - 0.1 * 2 = 0.8.
    np.testing.assert_allclose(reference_point(STAIR, ["minimize", "maximize"]), [3.2, 0.8])
    # NaN rows are ignored; a zero-range objective uses max(|worst|, 1) as its span.
    pts = np.array([[1.0, 5.0], [2.0, 5.0], [NAN, 100.0]])
    np.testing.assert_allclose(reference_point(pts, margin=0.5), [2.5, 7.5])
    # The extremes of the front now contribute volume.
    assert hypervolume(STAIR, reference_point(STAIR)) > 0
    with pytest.raises(ValueError, match="finite"):
        reference_point([[NAN, 1.0]])


# --------------------------------------------------------------------------- knee, normalise


def test_knee_point_of_l_shaped_front():
    # An L: a steep arm down x ~ 0 and a flat arm along y ~ 0, meeting near (1, 1).
    # Normalised by the front's extremes (0..10 on each axis) the corner is at (0.1, 0.1),
    # the farthest point from the line x + y = 1 between the extremes.
    pts = np.array(
        [
            [0.0, 10.0],
            [0.2, 6.0],
            [0.5, 3.0],
            [1.0, 1.0],  # the corner: index 3
            [3.0, 0.5],
            [6.0, 0.2],
            [10.0, 0.0],
            [9.0, 9.0],  # dominated, far from the line on the wrong side: not a knee
        ]
    )
    assert knee_point(pts) == 3
    # The same front as (loss, accuracy) with accuracy maximised.
    flipped = pts.copy()
    flipped[:, 1] = -flipped[:, 1]
    assert knee_point(flipped, ["minimize", "maximize"]) == 3
    # Order independence.
    perm = np.random.default_rng(0).permutation(len(pts))
    assert perm[knee_point(pts[perm])] == 3


def test_knee_point_edge_cases():
    assert knee_point([[1.0, 2.0]]) == 0
    assert knee_point([[NAN, 0.0], [1.0, 2.0]]) == 1
    with pytest.raises(ValueError, match="2 objectives"):
        knee_point(np.ones((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        knee_point([[NAN, 0.0]])


def test_normalise():
    pts = np.array([[1.0, 10.0], [3.0, 20.0], [2.0, 15.0]])
    np.testing.assert_allclose(
        normalise(pts, ideal=[1.0, 10.0], nadir=[3.0, 20.0]), [[0, 0], [1, 1], [0.5, 0.5]]
    )
    # Maximised column (ideal above nadir) and a zero-range column.
    out = normalise([[2.0, 5.0]], ideal=[3.0, 5.0], nadir=[1.0, 5.0])
    np.testing.assert_allclose(out, [[0.5, 0.0]])


# --------------------------------------------------------------------------- noise-aware domination


def test_the_issue_s_fake_front_point_is_not_a_front_point_beyond_noise():
    """Issue 14: sSQA 4q/4kv timed 47.70 ms, 0.04 ms faster than SQA 4q/2kv's 47.74 ms, with a
    timing IQR of 1.7 ms, and its loss is worse beyond the loss's noise: on the exact front only
    because of the 0.04 ms."""
    lat_sd = 1.7e-3 / IQR_PER_SD
    points = np.array([[2.300, 47.74e-3],   # SQA 4q/2kv
                       [2.340, 47.70e-3],   # sSQA 4q/4kv
                       [2.250, 60.00e-3]])  # MHA: slower, better loss
    noise = np.array([[0.005, lat_sd], [0.005, lat_sd], [0.005, lat_sd]])
    assert non_dominated_mask(points).tolist() == [True, True, True]
    assert noise_aware_front(points, noise).tolist() == [True, False, True]
    # with the losses within noise of each other as well, neither can be told from the other:
    # both stay, as one group
    close = points.copy()
    close[1, 0] = 2.310
    wide = noise.copy()
    wide[:2, 0] = 0.02
    assert noise_aware_front(close, wide).tolist() == [True, True, True]
    groups = indistinct_groups(close, wide, among=noise_aware_front(close, wide))
    assert [g.tolist() for g in groups] == [[0, 1], [2]]


def test_noise_aware_front_without_noise_is_the_exact_front():
    rng = np.random.default_rng(3)
    for _ in range(20):
        pts = rng.integers(0, 6, size=(30, rng.integers(2, 4))).astype(float)  # many ties
        pts[rng.integers(0, 30)] = NAN
        exact = non_dominated_mask(pts)
        assert noise_aware_front(pts, np.zeros_like(pts)).tolist() == exact.tolist()
        assert noise_aware_front(pts, None).tolist() == exact.tolist()
        groups = indistinct_groups(pts, None)
        for g in groups:  # without noise only identical rows are indistinct
            assert (pts[g] == pts[g[0]]).all()
        assert sorted(i for g in groups for i in g) == np.flatnonzero(np.isfinite(pts).all(axis=1)).tolist()


def test_beaten_beyond_noise_in_one_objective_and_within_noise_in_the_other():
    # b is 1 faster beyond the latency noise (0.1), a's better loss is within its noise (0.02):
    # b dominates a beyond noise, though a is on the exact front
    pts = np.array([[2.000, 10.0], [2.010, 9.0]])
    noise = np.array([[0.02, 0.1], [0.02, 0.1]])
    assert non_dominated_mask(pts).tolist() == [True, True]
    assert noise_aware_front(pts, noise).tolist() == [False, True]
    # a point behind a front point by less than the noise is not pushed off the front by it
    pts = np.array([[2.000, 10.0], [2.001, 10.01]])
    assert non_dominated_mask(pts).tolist() == [True, False]
    assert noise_aware_front(pts, noise).tolist() == [True, True]
    # the margin is z * sqrt(s_a^2 + s_b^2): 2 * sqrt(0.03^2 + 0.04^2) = 0.1
    pts = np.array([[1.0, 0.0], [1.0999, 0.0], [1.1001, 0.0]])
    noise = np.array([[0.03, 0.0], [0.04, 0.0], [0.04, 0.0]])
    assert noise_aware_front(pts[[0, 1]], noise[[0, 1]]).tolist() == [True, True]
    assert noise_aware_front(pts[[0, 2]], noise[[0, 2]]).tolist() == [True, False]
    assert noise_aware_front(pts[[0, 2]], noise[[0, 2]], z=3.0).tolist() == [True, True]


def test_noise_aware_front_directions_missing_estimates_and_bad_input():
    # (loss, accuracy): accuracy maximised; a NaN noise is "no estimate" (0), a NaN figure no point
    pts = np.array([[1.0, 0.90], [1.0, 0.85], [NAN, 0.99]])
    noise = np.array([[0.0, 0.01], [NAN, 0.01], [0.0, 0.0]])
    assert noise_aware_front(pts, noise, ["minimize", "maximize"]).tolist() == [True, False, False]
    assert noise_aware_front(pts, [[0, 0.03], [0, 0.03], [0, 0]], ["minimize", "maximize"]).tolist() == \
        [True, True, False]
    assert noise_aware_front(np.empty((0, 2)), np.empty((0, 2))).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        noise_aware_front(pts, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=">= 0"):
        noise_aware_front(pts, -np.ones((3, 2)))


def test_indistinct_groups_are_transitive_and_can_be_limited():
    # a ~ b and b ~ c (each 0.15 apart, margin 2 * sqrt(2) * 0.1 = 0.28), a and c 0.3 apart:
    # still one group; d is far from all
    pts = np.array([[1.00, 5.0], [1.15, 5.0], [1.30, 5.0], [3.00, 5.0]])
    noise = np.array([[0.1, 0.0]] * 4)
    assert [g.tolist() for g in indistinct_groups(pts, noise)] == [[0, 1, 2], [3]]
    assert [g.tolist() for g in indistinct_groups(pts, noise, among=[0, 2, 3])] == [[0], [2], [3]]
    assert [g.tolist() for g in indistinct_groups(pts, noise, among=np.array([0, 1, 0, 1], bool))] == [[1], [3]]
    assert group_names(3) == ["A", "B", "C"] and group_names(28)[-2:] == ["AA", "AB"]
