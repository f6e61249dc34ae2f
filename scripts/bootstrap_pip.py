"""Put pip into a virtual environment made without it (``python3 -m venv --without-pip``).

Debian's ``python3`` without the ``python3-venv`` package has no ``ensurepip``, so ``python3 -m venv`` fails;
a venv without pip still works. This fetches pip's wheel from the package index (``PIP_INDEX_URL`` or PyPI,
the simple API's JSON form), checks its sha256 against the index, and lets the wheel install itself:
``python pip.whl/pip install pip.whl``. Standard library only. Usage: ``python3 bootstrap_pip.py VENV_PYTHON``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
JSON = "application/vnd.pypi.simple.v1+json"


def latest_wheel() -> dict:
    request = urllib.request.Request(f"{INDEX}/pip/", headers={"Accept": JSON})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    wheels = [f for f in files if f["filename"].endswith("-py3-none-any.whl") and not f.get("yanked")]
    if not wheels:
        sys.exit(f"error: no pip wheel on {INDEX}/pip/")
    return wheels[-1]  # the simple API lists files oldest first


def main() -> None:
    python = sys.argv[1]
    wheel = latest_wheel()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / wheel["filename"]
        with urllib.request.urlopen(wheel["url"], timeout=120) as response:
            path.write_bytes(response.read())
        expected = wheel.get("hashes", {}).get("sha256")
        if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            sys.exit(f"error: {wheel['filename']} does not match the index's sha256")
        subprocess.run([python, str(path / "pip"), "install", "-q", "--no-index", str(path)], check=True)
    print(f"installed {wheel['filename']} into {python}")


if __name__ == "__main__":
    main()
