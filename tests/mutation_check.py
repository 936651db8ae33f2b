"""The last step of `make mutation`: the mutation score, and every mutant the tests did not kill accounted for.

Reads mutmut's results (run from the project root after `mutmut run`) and tests/mutation_survivors.toml, the
checked-in list of surviving mutants, each with the change it makes and why no test kills it. Fails when a
survivor is not in the list (with a draft entry to fill in) or a listed one no longer survives (a stale entry).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

SURVIVORS = Path(__file__).with_name("mutation_survivors.toml")
NOT_KILLED = ("survived", "no tests", "timeout", "suspicious", "segfault")


def mutmut(*args: str) -> str:
    """Output of one mutmut command (mutmut next to this Python, as `make setup` installs it)."""
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=True).stdout


def statuses() -> dict[str, str]:
    """mutant name -> its status (killed, survived, no tests, timeout, ..., not checked)."""
    rows = (line.strip().rsplit(": ", 1) for line in mutmut("results", "--all", "true").splitlines())
    return {row[0]: row[1] for row in rows if len(row) == 2}


def change(name: str) -> str:
    """What a mutant changes, as `old -> new` of its diff's lines."""
    lines = mutmut("show", name).splitlines()
    old = " / ".join(x[1:].strip() for x in lines if x.startswith("-") and not x.startswith("---"))
    new = " / ".join(x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++"))
    return f"{old} -> {new}"


def draft(names: list[str]) -> str:
    """TOML entries for survivors not yet in the list, their reason left to fill in."""
    quote = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
    return "\n".join(f'[survivors.{quote(n)}]\nchange = {quote(change(n))}\nreason = ""\n' for n in names)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    status = statuses()
    counts = Counter(status.values())
    if not status or counts["not checked"]:
        print(f"mutmut has not checked {counts['not checked']} of {len(status)} mutants: run `mutmut run` first")
        return 1
    listed = tomllib.loads(SURVIVORS.read_text())["survivors"]
    alive = sorted(n for n, s in status.items() if s in NOT_KILLED)
    killed = counts["killed"] + counts["caught by type check"]
    print(f"mutation score: {killed}/{len(status)} mutants killed ({killed / len(status):.1%}); "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    reasons = Counter(entry["reason"].split(":")[0] for n, entry in listed.items() if n in status)
    print("survivors by reason: " + ", ".join(f"{k}: {v}" for k, v in reasons.most_common()))
    unlisted, stale = [n for n in alive if n not in listed], sorted(set(listed) - set(alive))
    if stale:
        print(f"{len(stale)} listed survivors no longer survive: remove them from {SURVIVORS.name}:")
        print("\n".join(f"  {n}" for n in stale))
    if unlisted:
        print(f"{len(unlisted)} survivors not accounted for: kill them with a test, or add these to "
              f"{SURVIVORS.name} with the reason:\n\n{draft(unlisted)}")
    return 1 if stale or unlisted else 0


if __name__ == "__main__":
    sys.exit(main())
