"""Mutation score per module from a mutmut 3 run (the ``mutants/*.meta`` files) and docs/testing.md.

The equivalent mutants are the names listed in docs/testing.md (section "Equivalent mutants"); the score is
killed / (run - equivalent), timeouts counted as killed.  ``benchmarks/mutants.py GROUP --score`` prints it
for a group's scratch project (``mutants/GROUP``); this script alone reads a mutmut run in the repository root:

    python benchmarks/mutation_score.py [PATTERN ...]     # fnmatch patterns on mutant names, default all run
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# mutmut.stats.status_by_exit_code (copied: importing mutmut loads its configuration)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 2: "interrupted", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault"}


def equivalents() -> set[str]:
    text = (ROOT / "docs" / "testing.md").read_text()
    if "### Equivalent mutants" not in text:
        return set()
    section = text.split("### Equivalent mutants", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"nnsim\.[^`\s]*__mutmut_\d+", section))


def main(patterns: list[str], project: Path = ROOT) -> None:
    """The table for the mutmut project ``project`` (its ``mutants/`` directory): the root, or a group's."""
    eq = equivalents()
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    survivors = []
    for meta in sorted((project / "mutants" / "src").rglob("*.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if code is None or (patterns and not any(fnmatch.fnmatch(name, p) for p in patterns)):
                continue
            module = name.split(".x_")[0].split(".xǁ")[0]
            status = STATUS.get(code, "suspicious")
            if status == "survived" and name in eq:
                status = "equivalent"
            elif status == "survived":
                survivors.append(name)
            rows[module]["run"] += 1
            rows[module][status] += 1
    cols = ["run", "killed", "timeout", "equivalent", "survived", "no tests", "suspicious", "segfault"]
    print("| module | " + " | ".join(cols) + " | score |")
    print("|---" * (len(cols) + 2) + "|")
    total: dict[str, int] = defaultdict(int)
    for module, r in sorted(rows.items()):
        for c in cols:
            total[c] += r[c]
        print(f"| {module} | " + " | ".join(str(r[c]) for c in cols) + f" | {_score(r)} |")
    print("| all | " + " | ".join(str(total[c]) for c in cols) + f" | {_score(total)} |")
    if survivors:
        print("\nsurvivors not listed as equivalent:", *survivors, sep="\n  ")


def _score(r: dict[str, int]) -> str:
    denom = r["run"] - r["equivalent"]
    return f"{100 * (r['killed'] + r['timeout']) / denom:.1f} %" if denom else "-"


if __name__ == "__main__":
    main(sys.argv[1:])
