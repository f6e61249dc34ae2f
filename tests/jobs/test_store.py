"""The Redis job store: cap reservations and Idempotency-Key claims."""

from __future__ import annotations

import time

from jobs.store import KEY_FULL, QUEUE_FULL


def test_reservations_count_expire_and_are_consumed(store):
    a, _ = store.reserve_slot("alice", 2, 10, ttl_s=0.5)
    b, _ = store.reserve_slot("alice", 2, 10, ttl_s=0.5)
    assert a and b and store.reserve_slot("alice", 2, 10, ttl_s=0.5) == (None, KEY_FULL)
    assert store.reserve_slot("bob", 5, 2, ttl_s=0.5) == (None, QUEUE_FULL)
    store.release_slot("alice", b)
    assert store.reserved_count("alice") == 1
    job = store.create("alice", {}, sha256="0" * 64, size=1, request_hash="h", reservation=a)
    assert store.reserved_count() == 0 and store.active_count("alice") == 1
    c, _ = store.reserve_slot("alice", 2, 10, ttl_s=0.3)  # a request that then dies without releasing it
    assert c and store.reserve_slot("alice", 2, 10, ttl_s=0.3) == (None, KEY_FULL)
    time.sleep(0.4)
    assert store.reserve_slot("alice", 2, 10, ttl_s=0.3)[0] is not None
    assert store.get(job["id"])["status"] == "queued"


def test_a_recent_claim_is_kept_and_only_its_request_releases_it(store):
    claim = store.idempotency_claim("alice", "k", "hash", "a" * 32)
    assert store.idempotency_claim("alice", "k", "hash", "b" * 32) == claim  # not replaced: recent
    assert store.idempotency_release("alice", "k", "b" * 32) is False  # only its own claim is released
    assert store.idempotency_release("alice", "k", "a" * 32) is True
    assert store.idempotency_get("alice", "k") is None
