"""The live console in real headless Chromium (Debian's package), driven by Playwright:
enter the key, start a simulated conversation, watch the transcript grow over the live feed
(Server-Sent Events read with fetch, the key in a header: no websocket, no key in a URL), send
an echo from the page and see the simulated replica speak it. Saves a screenshot as a test
artifact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.async_api import Request, async_playwright, expect

from tests.support import API_KEY, ROOT, ServerFactory

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def test_console_drives_a_simulated_conversation(
    serve: ServerFactory, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is required (Debian package 'chromium'; `make test` installs it)")
    server = serve(None, callback_token="cb-console", local_rooms=True)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            feeds: list[Request] = []
            page.on(
                "request",
                lambda request: feeds.append(request) if "/events/stream" in request.url else None,
            )
            await page.goto(server.url + "/")

            # the key is asked once; a wrong one is refused with a message
            await expect(page.locator("#key-dialog")).to_be_visible()
            await page.fill("#key-input", "wrong-key")
            await page.click("#key-save")
            await expect(page.locator("#key-error")).to_contain_text("not accepted")
            await page.fill("#key-input", API_KEY)
            await page.click("#key-save")
            await expect(page.locator("#key-dialog")).to_be_hidden()
            assert await page.evaluate("sessionStorage.getItem('cvi-agent-api-key')") == API_KEY

            # start a simulated conversation from the page; the transcript grows live
            await page.click("#simulate")
            await expect(page.locator("#detail")).to_be_visible(timeout=15_000)
            await expect(page.locator("#live-state")).to_have_text("live", timeout=15_000)
            transcript = page.locator("#transcript li")
            await expect(transcript.nth(2)).to_be_visible(timeout=30_000)
            first_count = await transcript.count()
            await expect(transcript.nth(first_count)).to_be_visible(timeout=30_000)
            await expect(page.locator("#conversations li.active")).to_have_count(1)

            # send an echo from the page: the simulated replica speaks it into the room
            echo = "Hello from the console page"
            await page.fill("#control-text", echo)
            await page.click("#controls button[data-action=echo]")
            await expect(page.locator("#control-result")).to_contain_text(
                "sent echo via bot", timeout=20_000
            )
            await expect(page.locator("#transcript li.replica", has_text=echo)).to_be_visible(
                timeout=30_000
            )

            # the same over Tavus's REST API (the simulation's stand-in): the replica speaks
            # it, and the event list shows the interaction with its path
            over_rest = "Hello over Tavus's API"
            await page.select_option("#control-via", "rest")
            await page.fill("#control-text", over_rest)
            await page.click("#controls button[data-action=echo]")
            await expect(page.locator("#control-result")).to_contain_text(
                "sent echo via rest", timeout=20_000
            )
            await expect(page.locator("#transcript li.replica", has_text=over_rest)).to_be_visible(
                timeout=30_000
            )
            await expect(
                page.locator("#events tbody tr", has_text="[via rest, delivered]").first
            ).to_be_visible()
            await expect(
                page.locator("#events tbody tr", has_text="interaction.conversation.echo").first
            ).to_be_visible()
            await expect(page.locator("#latency rect").first).to_be_attached(timeout=20_000)

            # every event above arrived over the SSE feed: no websocket was opened, and the key
            # travelled in the Authorization header, never in a URL
            assert sockets == [], sockets
            assert feeds, "the console never opened the event stream"
            for request in feeds:
                assert API_KEY not in request.url and "key=" not in request.url
                assert (await request.all_headers())["authorization"] == f"Bearer {API_KEY}"
            answered = [r for r in feeds if await r.response() is not None]
            response = await answered[-1].response()
            assert response is not None and response.status == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            await page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            assert errors == [], errors
        finally:
            await browser.close()
