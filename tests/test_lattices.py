"""Nearest-point search against brute force, coordinates, and second moments by Monte Carlo."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from medu_jax.lattices import A2, D4, E8, LATTICES, Z, get_lattice

ALL = [Z, A2, D4, E8]


def brute_candidates(lat, x):
    """Lattice points near x (float64, shape (L,)), enumerated without the fast algorithm.

    Z, D4, E8 have covering radius <= 1 at this scale, so each coordinate of the nearest point is within 1 of
    x's: enumerate integer (and, for E8, half-integer) vectors in that box and keep the lattice members.
    A2: every basis-coordinate vector within +-2 of round(G^-1 x).
    """
    if lat.name == "A2":
        c0 = np.round(np.linalg.solve(lat.generator, x))
        offs = np.array(list(itertools.product(range(-2, 3), repeat=2)))
        return (lat.generator @ (c0 + offs).T).T
    fl = np.floor(x)
    box = np.array(list(itertools.product(*[(f - 1, f, f + 1, f + 2) for f in fl])))
    if lat.name == "Z":
        return box
    if lat.name == "D4":
        return box[np.sum(box, axis=1) % 2 == 0]
    ints = np.array(list(itertools.product(*[(f, f + 1) for f in np.floor(x)])))
    halves = np.array(list(itertools.product(*[(np.floor(v - 0.5) + 0.5, np.floor(v - 0.5) + 1.5) for v in x])))
    cands = np.concatenate([ints, halves])
    return cands[np.abs(np.sum(cands, axis=1)) % 2 == 0]


def is_member(lat, p, tol=1e-6):
    c = np.linalg.solve(lat.generator, np.asarray(p, np.float64).T)
    return np.all(np.abs(c - np.round(c)) < tol, axis=0)


@pytest.mark.parametrize("lat", ALL, ids=lambda l: l.name)
@given(data=st.data())
def test_nearest_matches_brute_force(lat, data):
    n = data.draw(st.integers(1, 6))
    scale = data.draw(st.sampled_from([0.3, 1.0, 7.0, 1e3]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).normal(size=(n, lat.dim)) * scale
    with jax.enable_x64(True):
        q = np.asarray(lat.nearest(jnp.asarray(x.T, jnp.float64))).T
    assert is_member(lat, q).all()
    for xi, qi in zip(x, q):
        best = np.min(np.sum((brute_candidates(lat, xi) - xi) ** 2, axis=1))
        assert np.sum((qi - xi) ** 2) <= best + 1e-9


@pytest.mark.parametrize("lat", ALL, ids=lambda l: l.name)
def test_ties_give_a_nearest_point(lat):
    # midpoints between lattice points (and deep holes of D4/E8) are ties: any nearest point is correct.
    g = lat.generator
    pts = [0.5 * g[:, 0], 0.5 * (g[:, 0] + g[:, -1]), np.full(lat.dim, 0.5), np.zeros(lat.dim)]
    if lat.name in ("D4", "E8"):
        pts.append(np.eye(lat.dim)[0])  # a deep hole of D_n (distance 1 from the nearest points)
    x = np.stack(pts)
    q = np.asarray(lat.nearest(jnp.asarray(x.T, jnp.float32))).T
    assert is_member(lat, q).all()
    for xi, qi in zip(x, q):
        best = np.min(np.sum((brute_candidates(lat, xi) - xi) ** 2, axis=1))
        assert np.sum((qi - xi) ** 2) <= best + 1e-6


@pytest.mark.parametrize("lat", ALL, ids=lambda l: l.name)
def test_zero_and_huge_inputs(lat):
    zero = jnp.zeros((lat.dim, 3), jnp.float32)
    assert np.all(np.asarray(lat.nearest(zero)) == 0)
    with jax.enable_x64(True):
        big = np.random.default_rng(0).normal(size=(lat.dim, 5)) * 1e9
        q = np.asarray(lat.nearest(jnp.asarray(big)))
        assert is_member(lat, q.T, tol=1e-3).all()
        assert np.all(np.linalg.norm(q - big, axis=0) <= lat.covering_radius + 1e-3)


@pytest.mark.parametrize("lat", ALL, ids=lambda l: l.name)
@given(seed=st.integers(0, 2**31 - 1))
def test_coords_round_trip(lat, seed):
    c = np.random.default_rng(seed).integers(-1000, 1000, size=(lat.dim, 17)).astype(np.int32)
    p = lat.from_coords(jnp.asarray(c), jnp.float32)
    assert np.array_equal(np.asarray(lat.to_coords(p)), c)
    np.testing.assert_allclose(np.asarray(p), lat.generator @ c, rtol=1e-6, atol=1e-3)
    # lattice points are their own nearest point
    np.testing.assert_allclose(np.asarray(lat.nearest(p)), np.asarray(p), atol=1e-4)


@pytest.mark.parametrize("lat", ALL, ids=lambda l: l.name)
def test_second_moment_monte_carlo(lat):
    n = 400_000 // lat.dim
    x = jax.random.uniform(jax.random.key(1), (lat.dim, n), minval=-50.0, maxval=50.0)
    e = np.asarray(x - lat.nearest(x), np.float64)
    g = np.mean(np.sum(e**2, axis=0)) / lat.dim / lat.volume ** (2 / lat.dim)
    assert abs(g / lat.second_moment - 1) < 0.02, (lat.name, g)
    assert np.max(np.linalg.norm(e, axis=0)) <= lat.covering_radius + 1e-5


def test_known_second_moments_and_volumes():
    assert Z.second_moment == pytest.approx(1 / 12)
    assert A2.second_moment == pytest.approx(5 / (36 * np.sqrt(3)))
    assert D4.second_moment == pytest.approx(0.0766, abs=1e-4)
    assert E8.second_moment == pytest.approx(0.0717, abs=1e-4)
    assert E8.volume == pytest.approx(1.0) and D4.volume == pytest.approx(2.0)


def test_get_lattice():
    assert get_lattice("a2") is A2 and get_lattice(E8) is E8 and set(LATTICES) == {"Z", "A2", "D4", "E8"}
    with pytest.raises(ValueError, match="unknown lattice 'B7'"):
        get_lattice("B7")
