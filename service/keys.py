"""API keys: ``python -m service.keys create --name alice`` prints a new key once; only its sha256 is stored.

Keys are random 256-bit tokens, so a plain sha256 (no salt, no slow hash) is enough to make a Redis dump
useless to an attacker while keeping the per-request check to one lookup.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis
import typer

from jobs.settings import get_settings

KEY_PREFIX = "kgn_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, client: redis.Redis, prefix: str = "kegnet") -> None:
        self.r = client
        self.p = prefix

    def create(self, name: str = "") -> tuple[str, str]:
        """Returns ``(key_id, key)``; the key itself is not stored anywhere."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "k" + secrets.token_hex(8)
        record = {"id": key_id, "name": name, "created_at": time.time()}
        pipe = self.r.pipeline()
        pipe.set(f"{self.p}:apikey:{hash_key(key)}", json.dumps(record))
        pipe.set(f"{self.p}:apikeyid:{key_id}", hash_key(key))
        pipe.execute()
        return key_id, key

    def lookup(self, key: str) -> str | None:
        """The owner id for a presented key, or None."""
        raw = self.r.get(f"{self.p}:apikey:{hash_key(key)}")
        return json.loads(raw)["id"] if raw else None

    def revoke(self, key_or_id: str) -> bool:
        digest = hash_key(key_or_id) if key_or_id.startswith(KEY_PREFIX) else self.r.get(
            f"{self.p}:apikeyid:{key_or_id}")
        if not digest:
            return False
        raw = self.r.get(f"{self.p}:apikey:{digest}")
        if not raw:
            return False
        key_id = json.loads(raw)["id"]
        return bool(self.r.delete(f"{self.p}:apikey:{digest}", f"{self.p}:apikeyid:{key_id}"))


cli = typer.Typer(help="Manage API keys of the KegNet service.", no_args_is_help=True)


def _store() -> KeyStore:
    s = get_settings()
    return KeyStore(redis.Redis.from_url(s.redis_url, decode_responses=True), s.key_prefix)


@cli.command()
def create(name: str = typer.Option("", help="a label for the key's owner")) -> None:
    """Create a key and print it (it cannot be shown again)."""
    key_id, key = _store().create(name)
    typer.echo(f"key id: {key_id}", err=True)
    typer.echo(key)


@cli.command()
def revoke(key_or_id: str) -> None:
    """Revoke a key, given the key itself or its id."""
    if not _store().revoke(key_or_id):
        typer.echo("no such key", err=True)
        raise typer.Exit(1)
    typer.echo("revoked", err=True)


if __name__ == "__main__":
    cli()
