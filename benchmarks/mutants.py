"""Mutation testing of the math core with mutmut 3, one group of modules at a time, each with its own fast tests.

mutmut runs, for each mutant, the tests of its configured selection that reached the mutated function. The
estimator tests reach nearly every function of ``factors.py`` and ``engine/``, so one selection for all modules
would run minutes of estimator tests for each surviving factor mutant. Each group below has its own selection
(the tests that exercise those modules directly); its scratch project is ``mutants/<group>/`` (git-ignored):
a copy of ``src/``, ``tests/`` and ``pyproject.toml`` whose ``[tool.mutmut]`` names the group's modules and
tests. Results are kept there between runs (mutmut re-tests only what changed, and survivors when named).

    python benchmarks/mutants.py GROUP [--jobs N] [PATTERN ...]   # run (PATTERN: fnmatch on mutant names)
    python benchmarks/mutants.py GROUP --score [PATTERN ...]      # the score table only (no run)

GROUP: ``core``, ``factors``, ``engine`` or ``all`` (each in turn). Run with PYTHONPATH unset (``make mutants``
does). The score counts timeouts as killed and leaves out the equivalent mutants listed in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import mutation_score  # noqa: E402

GROUPS: dict[str, dict[str, list[str]]] = {
    "core": {  # the formulas: spectral functions, output reductions, denoising, the linearized smoother, influence,
        # the symmetric blocked Gram
        "mutate": ["src/nnsim/algebra.py", "src/nnsim/outputs.py", "src/nnsim/estimators/denoising.py",
                   "src/nnsim/estimators/linearized.py", "src/nnsim/_gemm.py"],
        "tests": ["tests/test_algebra.py", "tests/test_algebra_edges.py", "tests/test_outputs_oracle.py",
                  "tests/test_error_paths.py", "tests/test_estimators_asymmetric.py", "tests/test_estimators.py",
                  "tests/test_mutation_algebra.py", "tests/test_mutation_denoising.py",
                  "tests/test_mutation_linearized.py", "tests/test_mutation_outputs.py", "tests/test_mutation_gemm.py",
                  # method="linearized" (kernel_matrix, linearized_report) and the realized noise model
                  "tests/test_denoising_linearized.py", "tests/test_linearized_realized.py"],
    },
    "factors": {  # the exact Gram products of factored gradients, the cost model, the projections
        "mutate": ["src/nnsim/factors.py"],
        # (not tests/test_cost_model.py: whole models and a 160 MB factor, 10x the time of a mutant; the cost
        # formulas and the memory cap are tested in test_mutation_factors.py, its survivors checked against it)
        "tests": ["tests/test_factors.py", "tests/test_mutation_factors.py",
                  "tests/test_speed_tile_scale.py"],  # elements, gram_range: the tile-scale rule's inputs
    },
    "engine": {  # chunks, the tile sweep, the rank report; density and neighbour counts, the running top-k
        "mutate": ["src/nnsim/engine/*", "src/nnsim/estimators/density.py", "src/nnsim/estimators/neighbors.py"],
        "tests": ["tests/test_mutation_engine.py", "tests/test_mutation_reducers.py",
                  "tests/test_estimators_asymmetric.py", "tests/test_error_paths.py",
                  "tests/test_speed_tile_scale.py",  # K(x, x)^-1/2 on the Gram tiles
                  "tests/test_speed_resize.py"],  # the chunk budget on the call that finds a kept plan stale
    },
}


def _toml_list(items: list[str]) -> str:
    return "[\n" + "".join(f'    "{x}",\n' for x in items) + "]"


def prepare(group: str) -> Path:
    """The group's scratch project, with the working tree's current src/ and tests/."""
    spec, work = GROUPS[group], ROOT / "mutants" / group
    work.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"(?m)^only_mutate = \[[^\]]*\]", "only_mutate = " + _toml_list(spec["mutate"]), text)
    text = re.sub(r"(?m)^pytest_add_cli_args_test_selection = \[[^\]]*\]",
                  "pytest_add_cli_args_test_selection = " + _toml_list(spec["tests"]), text)
    # The scratch project lies inside the git work tree: never let edits of the real tree reset its results.
    text = text.replace("[tool.mutmut]\n", "[tool.mutmut]\nuse_git_change_detection = false\n", 1)
    (work / "pyproject.toml").write_text(text)
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("group", choices=[*GROUPS, "all"])
    ap.add_argument("patterns", nargs="*", help="fnmatch patterns on mutant names (default: every mutant)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel mutmut workers")
    ap.add_argument("--score", action="store_true", help="print the score table of the last runs only")
    args = ap.parse_intermixed_args()
    for group in GROUPS if args.group == "all" else [args.group]:
        work = ROOT / "mutants" / group
        if not args.score:
            prepare(group)
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            mutmut = str(Path(sys.executable).parent / "mutmut")
            subprocess.run(["nice", "-n", "10", mutmut, "run", "--max-children", str(args.jobs), *args.patterns],
                           cwd=work, env=env, check=False)
        print(f"\n## {group}\n")
        mutation_score.main(args.patterns, work)


if __name__ == "__main__":
    main()
