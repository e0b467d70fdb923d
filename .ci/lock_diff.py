"""Name the installed packages whose versions differ from a lock file (CI's drift check prints this).

python .ci/lock_diff.py requirements/lock.txt
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)", line)
        if match:
            pins[normalize(match[1])] = match[3]
    return pins


def main(path: str) -> int:
    locked = read_lock(path)
    installed = {normalize(d.metadata["Name"]): d.version for d in distributions()}
    installed.pop("lvpruning", None)
    changed = sorted((n, locked[n], v) for n, v in installed.items() if n in locked and locked[n] != v)
    added = sorted((n, v) for n, v in installed.items() if n not in locked and n not in ("pip", "setuptools"))
    removed = sorted(n for n in locked if n not in installed)
    if not (changed or added or removed):
        print(f"every installed package is at its version in {path}")
        return 0
    print(f"packages whose versions differ from {path} (locked -> installed):")
    for name, old, new in changed:
        print(f"  {name}: {old} -> {new}")
    for name, new in added:
        print(f"  {name}: not locked -> {new}")
    for name in removed:
        print(f"  {name}: {locked[name]} -> not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements/lock.txt"))
