"""Importing kups_relax leaves JAX's global configuration alone; its calls bring their own float64 (issue 14).

Each check runs in a fresh Python process whose JAX has 64-bit types off, as a user's would
(the test process itself switches them on in conftest.py). The processes keep no compiled
programs on disk (``KUPS_RELAX_SAVED_EXECUTABLES=0``, no JAX cache folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = ("jax_enable_x64", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_enable_compilation_cache")


def run_python(code: str, timeout: int = 600) -> dict:
    """Run ``code`` in a fresh process (tests/ importable); it prints one JSON line last, returned here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "KUPS_RELAX_"))}
    env.update(JAX_PLATFORMS="cpu", KUPS_RELAX_SAVED_EXECUTABLES="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_changes_no_jax_configuration():
    out = run_python(f"""
        import json
        import jax
        import jax.numpy as jnp

        names = {CONFIG!r}
        before = {{n: getattr(jax.config, n) for n in names}}
        import kups_relax, kups_relax.ase, kups_relax.cli, potentials  # noqa: F401
        from potentials import EMT  # noqa: F401  (imported on first use)
        after = {{n: getattr(jax.config, n) for n in names}}
        x = jnp.ones(3) * 0.1
        y = jax.jit(lambda v: v @ v)(x)
        print(json.dumps(dict(before=before, after=after, dtypes=[str(x.dtype), str(y.dtype)])))
    """)
    assert out["after"] == out["before"]
    assert out["before"]["jax_enable_x64"] is False
    assert out["dtypes"] == ["float32", "float32"]


def test_relax_is_float64_with_x64_off_and_leaves_it_off():
    """ASE parity (steps and positions) of an LJ cluster relaxed in a process with 64-bit types off.

    Also: the caller's code runs in the caller's mode (``on_result``, a generator of structures,
    the loop body between ``relax_iter``'s items), potentials built outside any scope keep
    float64 parameters, and a float32 computation after the relaxation is still float32.
    """
    out = run_python("""
        import json
        import jax
        import jax.numpy as jnp
        import numpy as np
        from ase.calculators.lj import LennardJones as AseLJ
        from ase.optimize import LBFGS

        from kups_relax import relax, relax_iter
        from kups_relax.ase import Calculator, LBFGS as KupsLBFGS
        from potentials import LennardJones, get_potential
        from structures import LJ_PARAMS, random_cluster

        def x64():
            return bool(jax.config.jax_enable_x64)

        atoms = random_cluster(13, seed=3)
        ref = atoms.copy()
        ref.calc = AseLJ(**LJ_PARAMS)
        opt = LBFGS(ref, logfile=None)
        opt.run(fmax=0.01)

        seen = []
        def structures():
            seen.append(("generator", x64()))
            yield atoms.copy()
        (result,) = relax(structures(), LennardJones(**LJ_PARAMS), fmax=0.01,
                          on_result=lambda i, r: seen.append(("on_result", x64())))
        for index, item in relax_iter([atoms.copy()], LennardJones(**LJ_PARAMS), fmax=0.01):
            seen.append(("between items", x64()))
            iter_steps = item.steps

        drop_in = atoms.copy()
        drop_in.calc = Calculator(LennardJones(**LJ_PARAMS))
        drop_in_opt = KupsLBFGS(drop_in, logfile=None)
        drop_in_opt.run(fmax=0.01)

        pairs = get_potential("lj", sigma={"Ar": 3.4}, epsilon={"Ar": 0.0104}, rc={"Ar": 8.5})
        after = jnp.ones(3) * 0.1
        print(json.dumps(dict(
            steps=result.steps, ase_steps=opt.nsteps, iter_steps=iter_steps, drop_in_steps=drop_in_opt.nsteps,
            dpos=float(np.abs(result.atoms.positions - ref.positions).max()),
            drop_in_dpos=float(np.abs(drop_in.positions - ref.positions).max()),
            denergy=abs(result.energy - ref.get_potential_energy()),
            positions_dtype=str(result.atoms.positions.dtype), pair_dtype=str(pairs.pairs.values["sigma"].dtype),
            seen=seen, x64_after=x64(), after_dtype=str(after.dtype))))
    """)
    assert out["steps"] == out["ase_steps"] == out["iter_steps"] == out["drop_in_steps"]
    assert out["dpos"] <= 1e-8 and out["drop_in_dpos"] <= 1e-8 and out["denergy"] <= 1e-9
    assert out["positions_dtype"] == "float64" and out["pair_dtype"] == "float64"
    assert out["seen"] == [["generator", False], ["on_result", False], ["between items", False]]
    assert out["x64_after"] is False and out["after_dtype"] == "float32"


def test_scope_covers_our_code_only():
    """``precision.x64`` on a function and on a generator, called from code with 64-bit types off."""
    import jax

    from kups_relax.precision import enabled, x64

    seen = []

    @x64(user_code=("items", "callback"))
    def produce(items, callback=None):
        try:
            for item in items:
                seen.append(("ours", enabled()))
                if callback is not None:
                    callback(item)
                yield item
        finally:
            seen.append(("our clean-up", enabled()))

    @x64
    def plain():
        return enabled()

    def items():
        for k in range(3):
            seen.append(("their iterator", enabled()))
            yield k

    with jax.enable_x64(False):
        assert plain() is True and enabled() is False
        stream = produce(items(), callback=lambda item: seen.append(("their callback", enabled())))
        for item in stream:
            seen.append(("between items", enabled()))
            if item == 1:
                break
        stream.close()
        assert enabled() is False
    assert seen == [("their iterator", False), ("ours", True), ("their callback", False), ("between items", False),
                    ("their iterator", False), ("ours", True), ("their callback", False), ("between items", False),
                    ("our clean-up", True)]
