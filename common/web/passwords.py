"""Passwords, for the users who log in themselves: scrypt, salted, run off the event loop on a
bounded pool (each hash costs ~16 MB and tens of ms of a core)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from concurrent.futures import ThreadPoolExecutor

from common.web.http import ApiError

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
# Each hash costs ~16 MB and tens of ms of a core: at most this many at once, whatever the
# number of logins arriving, and a bounded queue behind them (beyond it: 429, try again).
HASH_THREADS = 2
HASH_QUEUE = 32
_HASH_POOL = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="scrypt")
_hash_waiting = 0


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=64 * 1024**2, **_SCRYPT)


async def _run_scrypt(password: str, salt: bytes) -> bytes:
    global _hash_waiting
    if _hash_waiting >= HASH_QUEUE:
        raise ApiError(
            429,
            "rate_limited",
            "Too many password checks at once; try again in a second.",
            headers={"Retry-After": "1"},
        )
    _hash_waiting += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_HASH_POOL, _scrypt, password, salt)
    finally:
        _hash_waiting -= 1


async def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = await _run_scrypt(password, salt)
    return f"scrypt${salt.hex()}${digest.hex()}"


async def check_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` ("scrypt$<salt>$<digest>"). A stored value of another
    shape (a row written by hand or by an import) matches nothing, at the same cost."""
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
        salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
        usable = scheme == "scrypt" and len(salt) > 0 and len(digest) > 0
    except ValueError:
        usable = False
    if not usable:
        _, salt_hex, digest_hex = DUMMY_HASH.split("$")
        salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    candidate = await _run_scrypt(password, salt)
    return hmac.compare_digest(candidate, digest) and usable


# A fixed hash to check against when the email is unknown, so both failures cost the same time.
DUMMY_HASH = "scrypt$" + "00" * 16 + "$" + "00" * 32
