"""Generate exercises/NN_topic.ipynb from solutions/NN_topic.ipynb.

In a solution notebook, what the learner writes is marked in code cells by

    # BEGIN SOLUTION
    ...the solved code...
    # END SOLUTION

and is replaced, at the same indentation, by a stub that raises NotImplementedError. In markdown
cells, lines between <!-- BEGIN SOLUTION --> and <!-- END SOLUTION --> are dropped. Outputs are
cleared. Run after editing a solution:

    python scripts/make_exercises.py          # write exercises/
    python scripts/make_exercises.py --check  # exit 1 if exercises/ is out of date (tests do this)
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CODE_BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*$")
CODE_END = re.compile(r"^\s*# END SOLUTION\s*$")
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"


def _strip(source: str, is_code: bool, where: str) -> str:
    out, inside, indent = [], False, ""
    for number, line in enumerate(source.splitlines(), 1):
        begin = CODE_BEGIN.match(line) if is_code else line.strip() == MD_BEGIN
        end = CODE_END.match(line) if is_code else line.strip() == MD_END
        if begin:
            if inside:
                raise ValueError(f"{where}, line {number}: BEGIN SOLUTION inside another solution")
            inside, indent = True, CODE_BEGIN.match(line).group(1) if is_code else ""
            if is_code:
                out += [f"{indent}# YOUR CODE HERE", f'{indent}raise NotImplementedError("your code here")']
        elif end:
            if not inside:
                raise ValueError(f"{where}, line {number}: END SOLUTION without BEGIN SOLUTION")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: BEGIN SOLUTION is never closed")
    return "\n".join(out)


def exercise_from_solution(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The learner's notebook: solutions replaced by stubs, no outputs."""
    nb = copy.deepcopy(solution)
    for i, cell in enumerate(nb.cells):
        cell.source = _strip(cell.source, cell.cell_type == "code", f"{name}, cell {i}")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def render(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return nbformat.writes(exercise_from_solution(nb, path.name)) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that exercises/ is up to date")
    args = parser.parse_args()
    stale = []
    for solution in sorted((ROOT / "solutions").glob("*.ipynb")):
        target = ROOT / "exercises" / solution.name
        text = render(solution)
        if target.exists() and target.read_text() == text:
            continue
        stale.append(target.relative_to(ROOT))
        if not args.check:
            target.write_text(text)
    if args.check and stale:
        print("out of date (run python scripts/make_exercises.py):", *map(str, stale), sep="\n  ")
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
