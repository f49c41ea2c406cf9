"""The live console in real headless Chromium (Debian's package), driven by Playwright.

One run covers what the console must explain by itself: the key is asked once; one status
badge (the conversation's) and the live feed as a small dot with a tooltip; a simulated
conversation whose turns fell back (the upstream is unreachable) shows them in red with their
cause, then says the script finished and it waits for Tavus's end-of-call callbacks, then that
it ended; the transcript grows over the live feed (Server-Sent Events read with fetch, the key
in a header: no websocket, no key in a URL); echoes over both paths; a latency chart with
labelled axes and values (the caller's time to first token and utterance-to-utterance beside
what the server added); `llm.turn` rows that say persona, TTFT and replayed/superseded/fallback;
a `#` column of event ids only; ended and idle conversations apart from live ones; no 401 for
the icon; usable at 800 px. Screenshots at 1366 and 800 px wide go to `test-artifacts/` (or
`CVI_TEST_ARTIFACTS`).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, Request, Response, async_playwright, expect

from cvi_agent.store import open_store
from cvi_agent.store.schema import conversations
from tests.support import API_KEY, ROOT, ServerFactory

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("CVI_TEST_ARTIFACTS") or ROOT / "test-artifacts")
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
AUTH = {"Authorization": f"Bearer {API_KEY}"}
RED = "rgb(240, 90, 90)"  # --bad in style.css


async def seed_quiet_conversations(database_url: str) -> None:
    """What `curl` or the CLI leave behind: one created an hour ago that never got an end
    callback, and one that ended."""
    store = await open_store(database_url)
    hour_ago = time.time() - 3600
    try:
        async with store.engine.begin() as conn:
            await conn.execute(
                conversations.insert(),
                [
                    {
                        "id": "c-curl-forgotten",
                        "persona": "echo",
                        "status": "active",
                        "meta": {},
                        "created_at": hour_ago,
                        "updated_at": hour_ago,
                    },
                    {
                        "id": "c-ended-earlier",
                        "persona": "echo",
                        "status": "ended",
                        "meta": {},
                        "created_at": hour_ago,
                        "updated_at": hour_ago + 60,
                        "ended_at": hour_ago + 60,
                    },
                ],
            )
    finally:
        await store.aclose()


async def layout(page: Page) -> dict[str, Any]:
    """Computed layout the 800 px checks need."""
    result: dict[str, Any] = await page.evaluate(
        """() => {
          const box = (sel) => { const r = document.querySelector(sel).getBoundingClientRect();
                                 return {left: r.left, right: r.right, width: r.width, height: r.height}; };
          const header = document.querySelector("header");
          return {
            viewport: document.documentElement.clientWidth,
            pageScroll: document.documentElement.scrollWidth,
            headerScroll: header.scrollWidth, headerClient: header.clientWidth,
            simulate: box("#simulate"), forget: box("#forget-key"), title: box("header h1"),
            table: box("#events"), row: box("#events tbody tr"),
            detail: box("#events tbody tr td.detail"),
            chart: box("#latency"),
          };
        }"""
    )
    return result


async def test_console_explains_itself(serve: ServerFactory, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is required (Debian package 'chromium'; `make test` installs it)")
    server = serve(None, callback_token="cb-console", local_rooms=True)  # upstream: unreachable
    await seed_quiet_conversations(f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # A conversation whose every turn falls back: `weather` and no upstream to reach.
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10) as http:
        started = await http.post(
            "/api/simulations", json={"persona": "weather", "linger": 15, "words_per_second": 150}
        )
        assert started.status_code == 202, started.text
        failing = started.json()["conversation_id"]

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1366, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            feeds: list[Request] = []
            page.on(
                "request",
                lambda request: feeds.append(request) if "/events/stream" in request.url else None,
            )
            refused: list[str] = []

            def on_response(response: Response) -> None:
                if response.status == 401 and "/api/" not in response.url:
                    refused.append(response.url)

            page.on("response", on_response)
            await page.goto(server.url + "/")

            # the icon: linked, served without a key (no 401 in the browser's console)
            assert await page.get_attribute("link[rel=icon]", "href") == "/favicon.ico"
            icon = await page.request.get(server.url + "/favicon.ico")
            assert icon.status == 200 and icon.headers["content-type"] == "image/svg+xml"

            # the key is asked once; a wrong one is refused with a message
            await expect(page.locator("#key-dialog")).to_be_visible()
            await page.fill("#key-input", "wrong-key")
            await page.click("#key-save")
            await expect(page.locator("#key-error")).to_contain_text("not accepted")
            await page.fill("#key-input", API_KEY)
            await page.click("#key-save")
            await expect(page.locator("#key-dialog")).to_be_hidden()
            assert await page.evaluate("sessionStorage.getItem('cvi-agent-api-key')") == API_KEY

            # the sidebar: live conversations apart from ended and long-idle ones
            await expect(page.locator(f"#conv-live li[data-id='{failing}']")).to_be_visible()
            forgotten = page.locator("#conv-done li[data-id='c-curl-forgotten']")
            await expect(forgotten).to_contain_text(re.compile(r"idle \d+ min"))
            await expect(page.locator("#conv-done li[data-id='c-ended-earlier']")).to_contain_text(
                "ended"
            )
            await expect(page.locator("#conv-live li[data-id='c-curl-forgotten']")).to_have_count(0)

            # the failing conversation: each fallen-back turn in red with its cause, an alert,
            # then "script finished — waiting for the end-of-call callbacks"
            await page.click(f"#conv-live li[data-id='{failing}']")
            failed = page.locator("#events tbody tr.failed")
            await expect(failed.first).to_contain_text("FELL BACK (upstream_unavailable)")
            await expect(failed.first).to_contain_text("connection refused")
            assert (
                await failed.first.locator("td.detail").evaluate(
                    "td => getComputedStyle(td.parentElement.querySelector('td')).color"
                )
                == RED
            )
            await expect(page.locator("#conv-alert")).to_contain_text("fell back")
            await expect(page.locator("#conv-alert")).to_contain_text(
                "could not connect to 127.0.0.1:9"
            )
            phase = page.locator("#conv-phase")
            await expect(phase).to_contain_text(
                "Script finished — waiting for Tavus's end-of-call callbacks", timeout=15_000
            )
            await expect(phase).to_contain_text(re.compile(r"due in about \d+ s"))
            await expect(page.locator("#latency rect.failed").first).to_be_attached()
            await expect(page.locator("#latency text.x-tick.failed").first).to_contain_text("✕")
            await page.screenshot(path=str(ARTIFACTS / "console-fallback-1366.png"), full_page=True)

            # a simulated conversation from the page: one status badge, the feed as a dot
            await page.click("#simulate")
            await expect(page.locator("#detail")).to_be_visible(timeout=15_000)
            await expect(page.locator("#conv-status")).to_have_text("live", timeout=15_000)
            assert await page.locator(".detail-head .badge").count() == 1
            dot = page.locator("#feed-state")
            await expect(dot).to_have_attribute("data-state", "connected", timeout=15_000)
            await expect(dot).to_have_attribute("title", re.compile("^Live feed: connected"))
            assert (await dot.inner_text()) == ""
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
            # the same over Tavus's REST API (the simulation's stand-in)
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

            # the latency chart: labelled axes, tick values, per-turn values of the caller's
            # view beside the server's
            chart = page.locator("#latency")
            await expect(chart.locator("rect.caller").nth(1)).to_be_attached(timeout=20_000)
            await expect(chart.locator("rect.u2u").nth(1)).to_be_attached()
            await expect(chart.locator("rect.server").first).to_be_attached(timeout=10_000)
            await expect(chart.locator("text.y-title")).to_have_text("milliseconds")
            await expect(chart.locator("text.x-title")).to_have_text("turn")
            ticks = await chart.locator("text.tick:not(.x-tick)").all_text_contents()
            assert ticks[0] == "0" and 3 <= len(ticks) <= 6, ticks
            assert all(float(t) > 0 for t in ticks[1:]), ticks
            assert await chart.locator("text.x-tick").first.text_content() == "1"
            assert await chart.locator("text.value").count() >= 2
            await expect(page.locator("#latency-summary")).to_contain_text(
                "median caller's time to first token"
            )
            await expect(page.locator("#latency-summary")).to_contain_text("added by the server")

            # llm.turn rows say who answered, how fast, and what became of the answer
            turns = page.locator("#events tbody tr[data-kind='llm.turn']")
            await expect(turns.first).to_contain_text(re.compile(r"persona concierge · TTFT \d"))
            outcome = re.compile(r"· (answered|replayed|superseded|abandoned by the caller|FELL)")
            for detail in await turns.locator("td.detail").all_inner_texts():
                assert outcome.search(detail), detail
            # `#` is one kind of number: the event's id, in arrival order
            numbers = await page.locator("#events tbody td.num").all_inner_texts()
            assert numbers and all(n.isdigit() for n in numbers), numbers
            ids = [int(n) for n in numbers]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            await expect(page.locator("#events th.num")).to_have_attribute(
                "title", re.compile("event's id")
            )

            # every event arrived over the SSE feed, the key in the Authorization header
            assert sockets == [], sockets
            assert feeds, "the console never opened the event stream"
            for request in feeds:
                assert API_KEY not in request.url and "key=" not in request.url
                assert (await request.all_headers())["authorization"] == f"Bearer {API_KEY}"
            await page.screenshot(path=str(ARTIFACTS / "console-1366.png"), full_page=True)

            # 800 px: nothing clipped, the events table readable, no sideways scrolling
            await page.set_viewport_size({"width": 800, "height": 900})
            box = await layout(page)
            assert box["viewport"] == 800 and box["pageScroll"] <= 800, box
            assert box["headerScroll"] <= box["headerClient"], box
            for name in ("simulate", "forget", "title", "table", "chart"):
                assert 0 <= box[name]["left"] and box[name]["right"] <= 800, (name, box)
            assert box["row"]["height"] > 0 and box["detail"]["width"] >= 200, box
            await expect(page.locator("#events tbody tr").first).to_be_visible()
            await page.screenshot(path=str(ARTIFACTS / "console-800.png"), full_page=True)

            # back to the failing conversation: it ended; it is grouped with the ended ones
            await page.click(f"#conversations li[data-id='{failing}']")
            await expect(page.locator("#conv-status")).to_have_text("ended", timeout=30_000)
            await expect(phase).to_contain_text("Ended (end_conversation_endpoint_hit)")
            await expect(phase).to_contain_text("transcript received", timeout=10_000)
            await expect(page.locator(f"#conv-done li[data-id='{failing}']")).to_be_visible(
                timeout=10_000
            )
            await page.screenshot(path=str(ARTIFACTS / "console-ended-800.png"), full_page=True)
            assert refused == [], refused
            assert errors == [], errors
        finally:
            await browser.close()
