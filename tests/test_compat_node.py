"""The official OpenAI Node SDK against the server: scripts under tests/clients/node/ (the `openai`
npm package, pinned by its lockfile; `make test` runs `npm ci` there) print what the client saw
as JSON, and these tests assert it. A client nobody here wrote is the compatibility test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from tests.support import API_KEY

pytestmark = pytest.mark.process

NODE_DIR = Path(__file__).resolve().parent / "clients" / "node"


async def run_script(server: LoopbackServer, script: str) -> Any:
    """Run `node <script>` against `server`; its last stdout line, parsed."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (v20 or newer) is required for the Node SDK compatibility tests")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail(
            f"the Node SDK is not installed: run `npm ci --prefix {NODE_DIR}` (make test does)"
        )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CVI_BASE_URL": server.url + "/v1",
        "CVI_API_KEY": API_KEY,
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        script,
        cwd=NODE_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"node {script} did not finish within 60 s")
    assert proc.returncode == 0, f"node {script} failed:\n{err.decode()[-3000:]}"
    lines = out.decode().strip().splitlines()
    assert lines, f"node {script} printed nothing; stderr:\n{err.decode()[-3000:]}"
    return json.loads(lines[-1])


async def test_streaming_non_streaming_models_and_request_ids(server: LoopbackServer) -> None:
    seen = await run_script(server, "chat.mjs")
    streamed = seen["streamed"]
    assert streamed["text"] == "streaming through the node sdk"
    assert streamed["finish"] == "stop" and streamed["roles"] == ["assistant"]
    assert len(streamed["ids"]) == 1 and streamed["ids"][0].startswith("chatcmpl-")
    assert len(streamed["fingerprints"]) == 1 and streamed["fingerprints"][0].startswith("fp_")
    usage = streamed["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    completion = seen["completion"]
    assert completion["content"] == "once, not streamed" and completion["finish"] == "stop"
    assert completion["object"] == "chat.completion" and completion["usage"]["total_tokens"] > 0
    assert completion["fingerprint"] == streamed["fingerprints"][0]
    assert seen["requestId"].startswith("req_") and seen["parsedRequestId"].startswith("req_")
    assert seen["echoedRequestId"] == "node-trace-1"
    assert seen["model"] == {"id": "concierge", "object": "model", "owned_by": "cvi-agent"}
    assert {"echo", "concierge", "storyteller", "weather"} <= set(seen["models"])


async def test_client_tools_round_trip_and_tool_choice(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(
        Plan(
            steps=[
                ReplyStep(content="Checking. "),
                ReplyStep(tool_name="get_current_weather", tool_id="call_up_1"),
                ReplyStep(tool_arguments='{"location": '),
                ReplyStep(tool_arguments='"Oslo"}'),
            ],
            finish_reason="tool_calls",
        )
    )
    seen = await run_script(server, "tools.mjs")
    flow = seen["flow"]
    assert flow["first"]["text"] == "Let me check." and flow["first"]["finish"] == "tool_calls"
    (call,) = flow["first"]["calls"]
    assert call["name"] == "get_current_weather" and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == {"location": "Paris"}
    assert flow["second"]["text"] == "Here's the weather: 21 degrees and clear"
    assert flow["second"]["finish"] == "stop" and flow["second"]["calls"] == []

    up = seen["upstream"]
    assert up["first"]["text"] == "Checking. " and up["first"]["finish"] == "tool_calls"
    assert up["first"]["calls"] == [
        {"id": "call_up_1", "name": "get_current_weather", "arguments": '{"location": "Oslo"}'}
    ]
    assert (
        up["second"]["text"].startswith("The tool said: ") and "21 degrees" in up["second"]["text"]
    )
    # the upstream got the caller's tool result as the caller sent it
    assert upstream.records[-1].body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_up_1",
        "content": '{"summary":"21 degrees and clear"}',
    }

    assert seen["none"]["calls"] == [] and seen["none"]["finish"] == "stop"
    assert seen["required"]["finish"] == "tool_calls"
    assert [c["name"] for c in seen["required"]["calls"]] == ["get_current_weather"]
    assert seen["named"]["finish"] == "tool_calls"
    assert json.loads(seen["named"]["calls"][0]["arguments"]) == {"location": ""}
    assert seen["undeclared"]["calls"] == [] and seen["undeclared"]["finish"] == "stop"


async def test_response_format_reaches_the_upstream(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(upstream.reply('{"title": "The Fox"}'))
    seen = await run_script(server, "params.mjs")
    assert seen == {"content": '{"title": "The Fox"}'}
    sent = upstream.records[-1].body
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "story",
            "strict": True,
            "schema": {"type": "object", "properties": {"title": {"type": "string"}}},
        },
    }
    assert (sent["seed"], sent["stop"], sent["top_p"]) == (11, ["END"], 0.9)


async def test_errors_are_the_sdks_typed_errors(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(status=500), Plan(status=500))
    seen = await run_script(server, "errors.mjs")
    assert all(e["isAPIError"] for e in seen.values())
    assert all(e["requestID"] and e["requestID"].startswith("req_") for e in seen.values())
    assert seen["unauthorized"]["class"] == "AuthenticationError"
    assert seen["unauthorized"]["status"] == 401
    assert seen["unauthorized"]["type"] == "authentication_error"
    for name in ("unknownModel", "retrieveUnknown"):
        assert seen[name]["class"] == "NotFoundError" and seen[name]["status"] == 404
        assert seen[name]["code"] == "model_not_found" and seen[name]["param"] == "model"
    assert seen["unsupported"]["class"] == "BadRequestError"
    assert (seen["unsupported"]["param"], seen["unsupported"]["code"]) == (
        "n",
        "unsupported_parameter",
    )
    for name in ("upstreamDown", "upstreamDownStreamed"):
        assert seen[name]["class"] == "InternalServerError" and seen[name]["status"] == 502
        assert seen[name]["code"] == "upstream_error" and seen[name]["type"] == "server_error"


async def test_abort_mid_stream_closes_the_upstream(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ", sleep=0.05) for i in range(400)]))
    seen = await run_script(server, "abort.mjs")
    assert seen["seen"] == ["w0 ", "w1 ", "w2 "]
    record = upstream.records[-1]
    deadline = time.monotonic() + 2.0
    while record.disconnected is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert record.disconnected is not None, "the upstream never saw the abort"
    assert time.time() - seen["abortedAt"] < 5.0
    assert record.chunks_sent < 60, "the upstream stopped soon after the client aborted"
