"""Agent authentication's pure rules and its review cache.

The reviews themselves come from the real API server in
tests/integration/test_gateway_agent_auth.py; here a review is a function the test supplies,
so that the cache's arithmetic (TTLs, token expiry, concurrent calls, failures) is exact.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from typing import Any

import pytest

from slm_gateway.auth import (
    AuthUnavailable,
    Identity,
    TokenReviewer,
    bearer_token,
    identity_from_review,
    may_call,
    token_expiry,
)

AUD = "slm-fleet-gateway"


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer  abc ", "abc"),
        (None, None),
        ("", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer a b", None),
    ],
)
def test_bearer_token(header: str | None, want: str | None) -> None:
    assert bearer_token(header) == want


def review(username: str = "system:serviceaccount:agents:router", **kw: Any) -> dict[str, Any]:
    return {"authenticated": True, "audiences": [AUD], "user": {"username": username}, **kw}


def test_a_service_account_token_for_our_audience_is_an_identity() -> None:
    assert identity_from_review(review(), AUD) == Identity("agents", "router")


@pytest.mark.parametrize(
    "status",
    [
        review(authenticated=False),
        review(audiences=["https://kubernetes.default.svc"]),
        review(audiences=[]),  # an API server that ignored the audience we asked for
        {"authenticated": True, "user": {"username": "system:serviceaccount:agents:router"}},
        review("alice@example.com"),
        review("system:node:worker-1"),
        review("system:serviceaccount:agents"),
        review("system:serviceaccount::router"),
        {},
    ],
)
def test_anything_else_is_no_identity(status: dict[str, Any]) -> None:
    assert identity_from_review(status, AUD) is None


def jwt(claims: dict[str, Any]) -> str:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_token_expiry_is_read_from_the_claims_when_there_is_one() -> None:
    assert token_expiry(jwt({"exp": 1_900_000_000})) == 1_900_000_000
    assert token_expiry(jwt({"sub": "x"})) is None
    assert token_expiry(jwt({"exp": True})) is None
    assert token_expiry("opaque-token") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c") is None


def test_agents_call_their_own_namespace_and_file_routes_take_any() -> None:
    agent = Identity("agents", "router")
    assert may_call(agent, "agents")
    assert not may_call(agent, "billing")
    assert may_call(agent, "")


class Reviews:
    """The API server's answers, counted: ``answers[token]`` is a status or an exception."""

    def __init__(self, answers: Mapping[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, api: Any, token: str, audience: str) -> Mapping[str, Any]:
        self.asked.append(token)
        answer = self.answers[token]
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, dict)
        return answer


def reviewer(
    answers: Mapping[str, Any], now: list[float], **kw: Any
) -> tuple[TokenReviewer, Reviews]:
    reviews = Reviews(answers)
    return TokenReviewer(None, AUD, review=reviews, clock=lambda: now[0], **kw), reviews


def test_a_review_is_reused_for_its_ttl_and_a_refusal_for_a_short_one() -> None:
    now = [1000.0]
    r, reviews = reviewer({"good": review(), "bad": review(authenticated=False)}, now)

    async def run() -> None:
        assert await r.identify("good") == Identity("agents", "router")
        now[0] += 59
        assert await r.identify("good") is not None
        assert reviews.asked == ["good"]
        now[0] += 2  # past 60 s
        await r.identify("good")
        assert reviews.asked == ["good", "good"]
        assert await r.identify("bad") is None
        now[0] += 4
        assert await r.identify("bad") is None
        assert reviews.asked.count("bad") == 1
        now[0] += 2  # past 5 s: a token that starts working is not refused for long
        await r.identify("bad")
        assert reviews.asked.count("bad") == 2

    asyncio.run(run())


def test_a_review_is_not_trusted_past_the_tokens_own_expiry() -> None:
    now = [1000.0]
    short = jwt({"exp": 1010})
    r, reviews = reviewer({short: review()}, now)

    async def run() -> None:
        await r.identify(short)
        now[0] = 1011
        await r.identify(short)

    asyncio.run(run())
    assert reviews.asked == [short, short]


def test_concurrent_calls_with_one_token_share_one_review() -> None:
    now = [1000.0]
    r, reviews = reviewer({"good": review()}, now)

    async def run() -> list[Identity | None]:
        return await asyncio.gather(*(r.identify("good") for _ in range(50)))

    assert asyncio.run(run()) == [Identity("agents", "router")] * 50
    assert reviews.asked == ["good"]


def test_an_api_server_failure_reaches_every_waiter_and_is_not_remembered() -> None:
    now = [1000.0]
    answers: dict[str, Any] = {"good": AuthUnavailable("ConnectionError")}
    r, reviews = reviewer(answers, now)

    async def run() -> list[Any]:
        return await asyncio.gather(*(r.identify("good") for _ in range(5)), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(x, AuthUnavailable) for x in results)
    answers["good"] = review()
    assert asyncio.run(r.identify("good")) == Identity("agents", "router")
    assert reviews.asked == ["good", "good"]


def test_the_cache_is_bounded() -> None:
    now = [1000.0]
    tokens = {f"t{i}": review() for i in range(10)}
    r, reviews = reviewer(tokens, now, max_entries=4)

    async def run() -> None:
        for t in tokens:
            await r.identify(t)
        await r.identify("t9")  # the newest stay
        await r.identify("t0")  # the oldest went

    asyncio.run(run())
    assert len(r._cache) <= 4
    assert reviews.asked.count("t9") == 1 and reviews.asked.count("t0") == 2
