"""Put pip into a virtual environment made without it (``python3 -m venv --without-pip``).

Debian's ``python3`` without the ``python3-venv`` package has no ``ensurepip``, so ``python3 -m venv`` fails;
a venv without pip still works. This fetches pip's wheel from the package index (``PIP_INDEX_URL`` or PyPI,
the simple API's JSON form), checks its sha256 against the index, and lets the wheel install itself:
``python pip.whl/pip install pip.whl``. Standard library only. Usage: ``python3 bootstrap_pip.py VENV_PYTHON``.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
JSON = "application/vnd.pypi.simple.v1+json"


def tls_context() -> ssl.SSLContext:
    """The certificates pip itself would trust: ``PIP_CERT`` and the usual variables, pip's configured
    ``cert``, else the system bundle (a proxy's own CA is often only there)."""
    candidates = [os.environ.get(v) for v in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")]
    for conf in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")):
        parser = configparser.ConfigParser()
        if parser.read(conf):
            candidates.append(parser.get("global", "cert", fallback=None))
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    cafile = next((c for c in candidates if c and os.path.isfile(c)), None)
    return ssl.create_default_context(cafile=cafile)


def fetch(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=120, context=tls_context()) as response:
        return response.read()


def latest_wheel() -> dict:
    files = json.loads(fetch(f"{INDEX}/pip/", JSON))["files"]
    wheels = [f for f in files if f["filename"].endswith("-py3-none-any.whl") and not f.get("yanked")]
    if not wheels:
        sys.exit(f"error: no pip wheel on {INDEX}/pip/")
    return wheels[-1]  # the simple API lists files oldest first


def main() -> None:
    python = sys.argv[1]
    wheel = latest_wheel()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / wheel["filename"]
        path.write_bytes(fetch(wheel["url"]))
        expected = wheel.get("hashes", {}).get("sha256")
        if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            sys.exit(f"error: {wheel['filename']} does not match the index's sha256")
        subprocess.run([python, str(path / "pip"), "install", "-q", "--no-index", str(path)], check=True)
    print(f"installed {wheel['filename']} into {python}")


if __name__ == "__main__":
    main()
