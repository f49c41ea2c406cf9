"""`POST /api/simulations`, the console's button: a simulation started by the server itself runs
to its end; an unknown persona and a bad key are refused, and so is a server without local
rooms."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.support import API_KEY, ServerFactory

TOKEN = "cb-token-for-tests"


async def test_console_button_starts_a_simulation(serve: ServerFactory) -> None:
    server = serve(None, callback_token=TOKEN, local_rooms=True)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:
        resp = await http.post("/api/simulations", json={"linger": 0, "words_per_second": 80})
        assert resp.status_code == 202, resp.text
        cid = resp.json()["conversation_id"]
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            got = await http.get(f"/api/conversations/{cid}")
            if got.status_code == 200:
                status = got.json()["conversation"]["status"]
                if status == "ended":
                    break
            await asyncio.sleep(0.2)
        assert status == "ended"
        bad = await http.post("/api/simulations", json={"persona": "nobody"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "persona_not_found"
        assert (
            await http.post("/api/simulations", json={}, headers={"Authorization": "Bearer x"})
        ).status_code == 401


async def test_simulations_need_local_rooms(serve: ServerFactory) -> None:
    """A simulation meets in a local room on loopback: without CVI_LOCAL_ROOMS the button is
    refused at once, naming the setting, instead of a simulation whose bot is never sent."""
    server = serve(None, callback_token=TOKEN)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:
        resp = await http.post("/api/simulations", json={"linger": 0})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "local_rooms_off" and "CVI_LOCAL_ROOMS" in error["message"]
