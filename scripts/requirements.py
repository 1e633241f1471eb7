"""What install-deps.sh needs from pyproject.toml.

``requirements.py test`` prints the test tools to pip-install, one per line.
``requirements.py check`` verifies that every runtime requirement is met by a
Debian package (``/usr/lib/python3/dist-packages``), at the version pyproject
allows: the tests then run on exactly the libraries operators have.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

DEBIAN_SITE = "/usr/lib/python3/dist-packages"
# "name>=1.2; python_version >= '3.13'": the only forms pyproject uses
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9._-]+)\s*(?:>=\s*(?P<min>[0-9.]+))?"
    r"\s*(?:;\s*python_version\s*>=\s*['\"](?P<py>[0-9.]+)['\"])?\s*$"
)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:4])


def project() -> dict:
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def check() -> int:
    problems = []
    for spec in project()["dependencies"]:
        m = REQUIREMENT.match(spec)
        if m is None:
            problems.append(f"{spec!r}: cannot parse this requirement")
            continue
        if m["py"] and sys.version_info < version_tuple(m["py"]):
            continue
        try:
            dist = importlib.metadata.distribution(m["name"])
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{m['name']}: not installed (install its python3-* package)")
            continue
        where = str(dist.locate_file(""))
        if where != DEBIAN_SITE:
            problems.append(
                f"{m['name']} {dist.version} comes from {where}, not Debian's {DEBIAN_SITE}"
            )
        if m["min"] and version_tuple(dist.version) < version_tuple(m["min"]):
            problems.append(f"{m['name']} {dist.version} is older than pyproject's {m['min']}")
    for problem in problems:
        print(f"requirements: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if argv == ["test"]:
        print("\n".join(project()["optional-dependencies"]["test"]))
        return 0
    if argv == ["check"]:
        return check()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
