"""Inject the realistic bugs of issue 15 one at a time into a scratch copy and check that the tests catch each.

    PYTHONPATH= /work/main/.venv/bin/python benchmarks/inject_bugs.py [NAME ...]

Copies src/ and tests/ to a temporary folder, applies one textual mutation, runs the named tests there
(-x, one thread) and reports CAUGHT / SURVIVED. The working tree is never modified.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T = ["tests/test_estimators_asymmetric.py", "tests/test_error_paths.py", "tests/test_outputs_oracle.py"]
# The bias checks alone: a 3 % bias must fail the Monte-Carlo tests themselves, not only the exact ones.
MC = "tests/test_estimators_asymmetric.py::test_"
MC_DENOISING = [MC + "approximate_denoising_is_unbiased_where_it_really_projects"]
MC_FEATURES = [MC + "features_are_unbiased_where_they_really_project"]

# name: (file, old text, new text, tests to run)
BUGS: dict[str, tuple[str, str, str, list[str]]] = {
    "include_self subtracts 1": (
        "src/nnsim/estimators/density.py",
        "score = score - self_gram(fs).diagonal(dim1=-2, dim2=-1).sum(-1)",
        "score = score - (self._d_eff if normalized else self_gram(fs).diagonal(dim1=-2, dim2=-1).sum(-1))", T),
    "denoising factor R^-T Q R^-1": (
        "src/nnsim/estimators/denoising.py", "D = Rinv @ Q64 @ Rinv.transpose(-1, -2)",
        "D = Rinv.transpose(-1, -2) @ Q64 @ Rinv", T),
    "off-diagonal tile: K_ij for K_ji in R": (
        "src/nnsim/estimators/denoising.py", "R[ib] += t64.sum(0).transpose(-1, -2)", "R[ib] += t64.sum(0)", T),
    "off-diagonal tile: K_ij for K_ji in Q": (
        "src/nnsim/estimators/denoising.py", 'Q[ib] += torch.einsum("ijec,ijef->jcf", t64, t64)',
        'Q[ib] += torch.einsum("ijce,ijfe->jcf", t64, t64)', T),
    "off-diagonal tile: K_ij for K_ji in Y": (
        "src/nnsim/estimators/denoising.py", 'Y[ib] += torch.einsum("ijec,ie->jc", t64, ya.double())',
        'Y[ib] += torch.einsum("ijce,ie->jc", t64, ya.double())', T),
    "influence transpose dropped": (
        "src/nnsim/algebra.py", "return K_ab.transpose(-1, -2) @ pinv_a.unsqueeze(1)",
        "return K_ab @ pinv_a.unsqueeze(1)", T),
    "approximate denoising: one sketch for both factors": (
        "src/nnsim/estimators/denoising.py",
        "return project(fs, dim, seed).double(), project(fs, dim, seed + SECOND_SKETCH_SEED).double()",
        "return project(fs, dim, seed).double(), project(fs, dim, seed).double()", MC_DENOISING),
    "approximate denoising: 3 % bias": (
        "src/nnsim/estimators/denoising.py", 'q = phi @ C["C"] @ psi.transpose(-1, -2)',
        'q = 1.03 * phi @ C["C"] @ psi.transpose(-1, -2)',
        MC_DENOISING),
    "features: 3 % bias": (
        "src/nnsim/similarity.py", "parts.append(project(c.groups[ALL], dim, seed))",
        "parts.append(1.03**0.5 * project(c.groups[ALL], dim, seed))", MC_FEATURES),
    "hard count >= instead of >": (
        "src/nnsim/estimators/density.py", "v = (tile > threshold)", "v = (tile >= threshold)", T),
    "dense projection missing 1/sqrt(k)": (
        "src/nnsim/factors.py", "return out / math.sqrt(k)", "return out", MC_FEATURES),
    "Kronecker projection missing 1/sqrt(rows)": (
        "src/nnsim/factors.py", "generator=gen, dtype=torch.float64) / math.sqrt(rows)).to(like)",
        "generator=gen, dtype=torch.float64)).to(like)", MC_FEATURES),
    "center_pixel off by one": (
        "src/nnsim/outputs.py", "*(s // 2 for s in out.shape[2:])", "*((s - 1) // 2 for s in out.shape[2:])", T),
    "density tiles ignore normalized=False": (
        "src/nnsim/estimators/density.py", 'quantity = Quantity.SIMILARITY if normalized else Quantity.KERNEL  # only',
        'quantity = Quantity.SIMILARITY  # only', T),
    "denoising: no check of the predictions' columns": (
        "src/nnsim/estimators/denoising.py", "if predictions.shape[1] != chunker.d:", "if False:", T),
    "metric check raises ValueError": (
        "src/nnsim/algebra.py", "from .errors import InputError", "InputError = ValueError", T),
}


def run(name: str) -> tuple[str, float]:
    path, old, new, tests = BUGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("src", "tests"):
            shutil.copytree(ROOT / d, Path(tmp) / d, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp)
        f = Path(tmp) / path
        text = f.read_text()
        if text.count(old) != 1:
            return f"NOT APPLIED ({text.count(old)} matches)", 0.0
        f.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src"), "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=tmp, env=env, capture_output=True, text=True)
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        verdict = f"CAUGHT by {failed[0][7:].split(' - ')[0]}" if proc.returncode == 1 and failed else (
            "SURVIVED" if proc.returncode == 0 else f"ERROR rc={proc.returncode}: {proc.stdout[-300:]}")
        return verdict, time.time() - t0


if __name__ == "__main__":
    names = sys.argv[1:] or list(BUGS)
    for n in names:
        verdict, secs = run(n)
        print(f"{n:55s} {verdict}  ({secs:.0f} s)", flush=True)
