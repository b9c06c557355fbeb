"""Compiled programs saved to disk (kups_relax.executables): keys, loading, damaged files.

The end-to-end check (a second CLI run compiles nothing, in a fresh process) is in test_cli.py.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from kups_relax import executables


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(executables, "cache_dir", lambda: tmp_path)
    yield tmp_path
    executables.clear()


def scaled_inverse(matrix, factor, *, power):
    return jnp.linalg.inv(matrix) * factor ** power


def test_saved_then_loaded_without_compiling(folder):
    f = executables.CachedJit(scaled_inverse, static_argnames=("power",))
    m = jnp.asarray([[2.0, 1.0], [0.0, 4.0]])
    first = f(m, 3.0, power=2)
    assert len(list(folder.glob("*.exe"))) == 1
    executables.clear()
    loaded = executables.loaded_from_disk
    again = f(m, 3.0, power=2)
    assert executables.loaded_from_disk == loaded + 1
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, np.linalg.inv(np.asarray(m)) * 9.0, rtol=1e-14)


def test_key_has_static_values_shapes_and_dtypes(folder):
    f = executables.CachedJit(scaled_inverse, static_argnames=("power",))
    f(jnp.eye(2), 1.0, power=1)
    f(jnp.eye(2), 2.0, power=1)  # another value of a traced argument: same program
    f(jnp.eye(2), 1.0, power=2)  # another static value
    f(jnp.eye(3), 1.0, power=1)  # another shape
    f(jnp.eye(3, dtype=jnp.float32), 1.0, power=1)  # another dtype
    assert len(list(folder.glob("*.exe"))) == 4


def test_unstable_static_arguments_are_never_saved(folder):
    f = executables.CachedJit(lambda x, *, how: how(x), static_argnames=("how",))
    assert float(f(jnp.asarray(4.0), how=jnp.sqrt)) == 2.0  # a function: printed with its address
    assert not list(folder.glob("*.exe"))


def test_damaged_file_is_a_miss_and_is_replaced(folder, caplog):
    f = executables.CachedJit(scaled_inverse, static_argnames=("power",))
    m = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    expected = f(m, 2.0, power=1)
    (path,) = folder.glob("*.exe")
    path.write_bytes(b"not an executable")
    executables.clear()
    with caplog.at_level(logging.WARNING, logger="kups_relax.executables"):
        np.testing.assert_array_equal(f(m, 2.0, power=1), expected)
    assert "compiling it again" in caplog.text
    assert path.read_bytes() != b"not an executable"
