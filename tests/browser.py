"""What the browser tests share: Debian's Chromium driven through Playwright (which then downloads
no browser of its own). tests/conftest.py imports the `browser` fixture, so every test has it."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The closed network of a test machine: nothing that phones home, or Chromium stalls at start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert os.path.exists(CHROMIUM), (  # noqa: ASYNC240 - once, before the browser starts
        f"Chromium is not at {CHROMIUM}: `make browser` installs Debian's chromium package"
    )
    async with async_playwright() as playwright:
        # launch() gives every browser a fresh profile of its own, removed on close.
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()
