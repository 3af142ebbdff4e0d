"""Password hashes: a stored value that is not one of ours matches nothing and raises nothing."""

from __future__ import annotations

import pytest

from common.web.passwords import DUMMY_HASH, check_password, hash_password


async def test_a_hash_matches_its_password_only() -> None:
    stored = await hash_password("correct horse")
    assert await check_password("correct horse", stored)
    assert not await check_password("correct horsf", stored)


@pytest.mark.parametrize(
    "stored",
    ["x", "", "scrypt$zz$00", "bcrypt$00$00", "scrypt$$", "a$b$c$d", DUMMY_HASH.replace("scrypt", "md5")],
)
async def test_a_stored_value_of_another_shape_matches_nothing(stored: str) -> None:
    assert not await check_password("anything at all", stored)
    assert not await check_password("", stored)
