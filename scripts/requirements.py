"""Print the pinned requirements of pyproject.toml, one per line: the dependencies and the named extras,
then the setuptools that builds the project in the image (``BUILD``).

    python3 scripts/requirements.py pyproject.toml service onnx > requirements.txt

The Dockerfile installs these before it copies the code, so a code change does not reinstall PyTorch;
scripts/wheelhouse.sh downloads the same list for an offline build. Standard library only (tomllib).
"""

from __future__ import annotations

import sys
import tomllib

# The image builds the project offline from this wheel (pyproject's build-system asks for setuptools>=61).
BUILD = ["setuptools==80.9.0"]


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return list(project["dependencies"]) + [r for e in extras for r in optional[e]]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:]) + BUILD))
