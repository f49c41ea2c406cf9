"""Argil: script splitting, the client against the fake API (create → render → DONE, 429s,
errors), webhook parsing and account-webhook registration."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cvi_agent.devtools.fakes.videos import FakeVideoProviders
from cvi_agent.videos.argil import MOMENT_LIMIT, ArgilVideos, parse_callback, split_script
from cvi_agent.videos.base import CreateVideo, ProviderError
from tests.support import load_fixture
from tests.videos_support import FAST_RETRY, fake_providers, fake_url, poll_video

AVATAR = "a1b2c3d4-0000-4000-8000-000000000001"
VOICE = "v1b2c3d4-0000-4000-8000-000000000002"


# -- split_script --------------------------------------------------------------------------------


def test_short_script_is_one_moment() -> None:
    assert split_script("  Hi Maya,\n here is   your recap. ") == ["Hi Maya, here is your recap."]
    assert split_script("") == [] and split_script(" \n ") == []


def test_sentences_are_packed_up_to_the_limit_and_never_cut() -> None:
    sentences = [f"Sentence number {i} says something useful about the call." for i in range(12)]
    moments = split_script(" ".join(sentences))
    assert len(moments) > 1
    assert all(len(m) <= MOMENT_LIMIT for m in moments)
    # every moment is a run of whole sentences
    for moment in moments:
        assert moment.endswith(".")
        assert moment.startswith("Sentence number")
    assert " ".join(moments) == " ".join(sentences)


def test_sentence_boundaries_keep_closing_quotes_and_other_enders() -> None:
    text = 'She said "we are done." Really? Yes! Next… "Fine." (Done.) End'
    moments = split_script(text, limit=20)
    assert moments == ['She said "we are', 'done." Really? Yes!', 'Next… "Fine."', "(Done.) End"]


def test_a_sentence_longer_than_the_limit_is_cut_at_clauses_then_words() -> None:
    clause = "and then we talked about the quarterly plan in a lot of detail"
    long_sentence = ", ".join([clause] * 6) + "."
    assert len(long_sentence) > MOMENT_LIMIT
    script = f"Short intro. {long_sentence} Short outro."
    moments = split_script(script)
    assert all(len(m) <= MOMENT_LIMIT for m in moments)
    assert " ".join(moments) == script
    assert moments[0].startswith("Short intro.")
    # the long sentence was cut after a comma, not mid-clause
    assert moments[0].endswith(",") or moments[1].endswith(",")
    # no clauses at all: cut between words
    words = "word " * 80
    cut = split_script(words.strip() + ".")
    assert all(len(m) <= MOMENT_LIMIT for m in cut) and len(cut) == 2
    assert " ".join(cut) == words.strip() + "."


def test_a_word_longer_than_the_limit_is_cut_hard() -> None:
    word = "x" * 600
    moments = split_script(f"Hi. {word} bye.")
    assert all(len(m) <= MOMENT_LIMIT for m in moments)
    assert "".join(moments).replace(" ", "") == f"Hi.{word}bye."


@given(st.lists(st.text(alphabet="abc .,!?\n", min_size=0, max_size=40), max_size=30))
def test_split_keeps_all_text_within_the_limit(parts: list[str]) -> None:
    script = " ".join(parts)
    moments = split_script(script, limit=50)
    assert all(0 < len(m) <= 50 for m in moments)
    assert " ".join(moments) == " ".join(script.split())


# -- the client against the fake API ------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeVideoProviders]:
    with fake_providers(stage_seconds=0.1) as f:
        yield f


@pytest.fixture
async def argil(fake: FakeVideoProviders) -> AsyncIterator[ArgilVideos]:
    client = ArgilVideos("fake-video-key", fake_url(fake) + "/argil/v1", retry=FAST_RETRY)
    yield client
    await client.aclose()


async def test_create_renders_and_polls_to_done(
    fake: FakeVideoProviders, argil: ArgilVideos
) -> None:
    script = " ".join(f"This is sentence {i} of a fairly long recap script." for i in range(10))
    event = await argil.create_video(
        CreateVideo(avatar=AVATAR, voice=VOICE, script=script, title="Recap", conversation_id="c1")
    )
    assert event.status == "rendering" and event.conversation_id == "c1"
    [body] = fake.creates["argil"]
    assert body["name"] == "Recap" and body["extras"] == {"conversation_id": "c1"}
    assert len(body["moments"]) == len(split_script(script)) > 1
    assert all(m["avatarId"] == AVATAR and m["voiceId"] == VOICE for m in body["moments"])
    assert fake.count("argil", "POST", "/render") == 1
    seen = await poll_video(lambda: argil.get_video(event.video_id), "ready")
    assert seen[-1].status == "ready" and seen[-1].url and seen[-1].url.endswith(".mp4")
    assert seen[-1].conversation_id == "c1"
    # The documented progression, as the fake served it.
    assert fake.served[("argil", event.video_id)] == [
        "IDLE",
        "GENERATING_AUDIO",
        "GENERATING_VIDEO",
        "DONE",
    ]


async def test_429_is_retried_with_backoff(fake: FakeVideoProviders, argil: ArgilVideos) -> None:
    fake.fail_next("argil", "POST", "/videos", status=429, times=2)
    fake.fail_next("argil", "GET", "/videos/", status=429, times=1)
    event = await argil.create_video(CreateVideo(avatar=AVATAR, script="Hello there."))
    assert len(fake.creates["argil"]) == 1
    assert fake.count("argil", "POST", "/videos") == 4  # 2 refused + create + render
    assert (await argil.get_video(event.video_id)).video_id == event.video_id


async def test_retries_are_bounded(fake: FakeVideoProviders, argil: ArgilVideos) -> None:
    fake.fail_next("argil", "GET", "/videos/", status=503, times=10)
    with pytest.raises(ProviderError) as err:
        await argil.get_video("whatever")
    assert err.value.status == 503 and err.value.retryable
    assert fake.count("argil", "GET", "/videos/") == FAST_RETRY.attempts


async def test_a_500_on_create_is_not_repeated(
    fake: FakeVideoProviders, argil: ArgilVideos
) -> None:
    """A create may have happened behind a 500: repeating it could bill a second video."""
    fake.fail_next("argil", "POST", "/videos", status=500, times=1)
    with pytest.raises(ProviderError) as err:
        await argil.create_video(CreateVideo(avatar=AVATAR, script="Hello."))
    assert err.value.status == 500
    assert fake.count("argil", "POST", "/videos") == 1


async def test_a_refused_render_names_the_created_video(
    fake: FakeVideoProviders, argil: ArgilVideos
) -> None:
    fake.fail_next(
        "argil", "POST", "/render", status=402, body={"code": 402, "message": "No credits"}
    )
    with pytest.raises(ProviderError) as err:
        await argil.create_video(CreateVideo(avatar=AVATAR, script="Hello."))
    assert err.value.video_id is not None and "No credits" in str(err.value)
    assert len(fake.creates["argil"]) == 1


async def test_api_errors_carry_status_and_message(fake: FakeVideoProviders) -> None:
    bad = ArgilVideos("wrong-key", fake_url(fake) + "/argil/v1", retry=FAST_RETRY)
    try:
        with pytest.raises(ProviderError) as err:
            await bad.list_avatars()
        assert err.value.status == 401 and "Unauthorized" in str(err.value)
    finally:
        await bad.aclose()


async def test_avatars_and_voices(argil: ArgilVideos) -> None:
    avatars = await argil.list_avatars()
    voices = await argil.list_voices()
    assert AVATAR in [a.id for a in avatars] and VOICE in [v.id for v in voices]


async def test_register_webhook_creates_then_updates(
    fake: FakeVideoProviders, argil: ArgilVideos
) -> None:
    url = "https://agent.example.test/callbacks/argil?token=one"
    hook, created = await argil.register_webhook(url)
    assert created and hook["callbackUrl"] == url
    rotated = "https://agent.example.test/callbacks/argil?token=two"
    again, created = await argil.register_webhook(rotated)
    assert not created and again["id"] == hook["id"]
    assert [h["callbackUrl"] for h in fake.argil_webhooks.values()] == [rotated]
    assert set(again["events"]) == {"VIDEO_GENERATION_SUCCESS", "VIDEO_GENERATION_FAILED"}


# -- webhooks ------------------------------------------------------------------------------------


def test_webhook_fixtures_normalize() -> None:
    ok = parse_callback(load_fixture("argil_webhook_video_success.json"))
    assert ok.event is not None and ok.event.status == "ready"
    assert ok.event.url == "https://storage.example.test/argil/3c90c3cc.mp4"
    assert ok.conversation_id == ok.event.conversation_id == "c0a1b2c3d4"
    assert ok.dedupe_key == "argil:VIDEO_GENERATION_SUCCESS:3c90c3cc-0d44-4b50-8888-8dd25736052a"
    failed = parse_callback(load_fixture("argil_webhook_video_failed.json"))
    assert failed.event is not None and failed.event.status == "failed" and failed.event.url is None
    avatar = parse_callback(
        {"event": "AVATAR_TRAINING_SUCCESS", "data": {"avatarId": "av1", "avatarName": "A"}}
    )
    assert avatar.event is None and avatar.dedupe_key == "argil:AVATAR_TRAINING_SUCCESS:av1"
    odd = parse_callback({"something": "else"})
    assert (
        odd.event is None and odd.kind == "unknown" and odd.dedupe_key.startswith("argil:unknown:")
    )


def test_video_object_fixture_normalizes() -> None:
    from cvi_agent.videos.argil import video_event

    event = video_event(load_fixture("argil_video_done.json"))
    assert event.status == "ready" and event.conversation_id == "c0a1b2c3d4"
    assert event.url == "https://storage.example.test/argil/3c90c3cc.mp4"
    assert video_event({"id": "x", "status": "CONTENT_MODERATED"}).status == "failed"
    assert video_event({"id": "x", "status": "SOMETHING_NEW"}).status == "rendering"
