"""Agent authentication's pure rules and its review cache.

The reviews themselves come from the real API server in
tests/integration/test_gateway_agent_auth.py; here a review is a function the test supplies,
so that the cache's arithmetic (TTLs, token expiry, concurrent calls, failures) is exact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from slm_gateway.auth import (
    AuthNotConfigured,
    AuthRateLimited,
    AuthUnavailable,
    Identity,
    TokenReviewer,
    bearer_token,
    identity_from_review,
    may_call,
    token_expiry,
    token_reviewer,
)

AUD = "slm-fleet-gateway"
OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"


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
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, dict)
        return answer


def reviewer(
    answers: Mapping[str, Any], now: list[float], **kw: Any
) -> tuple[TokenReviewer, Reviews]:
    reviews = Reviews(answers)
    clock = lambda: now[0]  # noqa: E731 - both clocks move together here
    return TokenReviewer(None, AUD, review=reviews, clock=clock, wall=clock, **kw), reviews


def agent_jwt(**claims: Any) -> str:
    """A token shaped like a bound ServiceAccount token for our audience (the signature is
    the API server's business; here a review is a function)."""
    return jwt({"aud": [AUD], "exp": 4_000_000_000, **claims})


GOOD, BAD = agent_jwt(sub="good"), agent_jwt(sub="bad")


def test_what_is_no_jwt_of_a_sane_size_is_refused_without_a_review() -> None:
    """Garbage in the Authorization header costs the API server nothing (200 made-up keys
    made 200 TokenReviews), and a token of megabytes is no outage (the API server answered
    413, which read as "cannot review": a 503 and a false alert)."""
    now = [1000.0]
    huge = jwt({"sub": "x" * 20_000})
    r, reviews = reviewer({}, now)
    for token in ("x1", "sk-proj-abc", "a.b", "a.b.c.d", "a.b!.c", huge):
        assert asyncio.run(r.identify(token)) is None
    assert reviews.asked == []


def test_a_review_is_reused_for_its_ttl_and_a_refusal_for_a_short_one() -> None:
    now = [1000.0]
    r, reviews = reviewer({GOOD: review(), BAD: review(authenticated=False)}, now)

    async def run() -> None:
        assert await r.identify(GOOD) == Identity("agents", "router")
        now[0] += 59
        assert await r.identify(GOOD) is not None
        assert reviews.asked == [GOOD]
        now[0] += 2  # past 60 s
        await r.identify(GOOD)
        assert reviews.asked == [GOOD, GOOD]
        assert await r.identify(BAD) is None
        now[0] += 4
        assert await r.identify(BAD) is None
        assert reviews.asked.count(BAD) == 1
        now[0] += 2  # past 5 s: a token that starts working is not refused for long
        await r.identify(BAD)
        assert reviews.asked.count(BAD) == 2

    asyncio.run(run())


def test_a_review_is_not_trusted_past_the_tokens_own_expiry() -> None:
    now = [1000.0]
    short = agent_jwt(exp=1010)
    r, reviews = reviewer({short: review()}, now)

    async def run() -> list[Identity | None]:
        first = await r.identify(short)
        now[0] = 1009
        cached = await r.identify(short)
        now[0] = 1011
        return [first, cached, await r.identify(short)]

    assert asyncio.run(run()) == [Identity("agents", "router")] * 2 + [None]
    assert reviews.asked == [short]  # expired: refused without asking


def test_concurrent_calls_with_one_token_share_one_review() -> None:
    now = [1000.0]
    r, reviews = reviewer({GOOD: review()}, now)

    async def run() -> list[Identity | None]:
        return await asyncio.gather(*(r.identify(GOOD) for _ in range(50)))

    assert asyncio.run(run()) == [Identity("agents", "router")] * 50
    assert reviews.asked == [GOOD]


def test_a_cancelled_caller_does_not_leave_the_others_hanging() -> None:
    """The first caller of a review is cancelled (its client went away, a shutdown): the
    review goes on, and the calls that share it get its answer."""
    now = [1000.0]
    r, reviews = reviewer({GOOD: review()}, now)

    async def run() -> list[Any]:
        first = asyncio.ensure_future(r.identify(GOOD))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(r.identify(GOOD)) for _ in range(3)]
        first.cancel()
        return await asyncio.wait_for(
            asyncio.gather(first, *others, return_exceptions=True), timeout=5
        )

    results = asyncio.run(run())
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [Identity("agents", "router")] * 3
    assert reviews.asked == [GOOD]


def test_an_api_server_failure_reaches_every_waiter_and_is_not_remembered() -> None:
    now = [1000.0]
    answers: dict[str, Any] = {GOOD: AuthUnavailable("ConnectionError")}
    r, reviews = reviewer(answers, now)

    async def run() -> list[Any]:
        return await asyncio.gather(*(r.identify(GOOD) for _ in range(5)), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(x, AuthUnavailable) for x in results)
    answers[GOOD] = review()
    # For a second after a failure, no review is asked for: every call gets its 503 at once.
    with pytest.raises(AuthUnavailable):
        asyncio.run(r.identify(GOOD))
    assert reviews.asked == [GOOD]
    now[0] += 1.5
    assert asyncio.run(r.identify(GOOD)) == Identity("agents", "router")
    assert reviews.asked == [GOOD, GOOD]


def test_a_bug_in_the_review_path_is_a_503_not_a_500_or_a_hang() -> None:
    now = [1000.0]
    r, _ = reviewer({GOOD: KeyError("status")}, now)

    async def run() -> list[Any]:
        return await asyncio.gather(*(r.identify(GOOD) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(x, AuthUnavailable) for x in asyncio.run(run()))


def test_cached_tokens_keep_working_while_the_api_server_is_down() -> None:
    now = [1000.0]
    answers: dict[str, Any] = {GOOD: review(), BAD: AuthUnavailable("ConnectionError")}
    r, _ = reviewer(answers, now)
    assert asyncio.run(r.identify(GOOD)) is not None
    with pytest.raises(AuthUnavailable):
        asyncio.run(r.identify(BAD))
    assert asyncio.run(r.identify(GOOD)) == Identity("agents", "router")


def test_the_caches_are_bounded_and_bad_tokens_cannot_push_good_ones_out() -> None:
    now = [1000.0]
    good = {agent_jwt(sub=f"g{i}"): review() for i in range(10)}
    bad = {agent_jwt(sub=f"b{i}"): review(authenticated=False) for i in range(50)}
    r, reviews = reviewer({**good, **bad}, now, max_entries=10)

    async def run() -> None:
        for t in [*good, *bad]:
            await r.identify(t)
        for t in good:
            assert await r.identify(t) is not None

    asyncio.run(run())
    assert len(r._good) <= 10 and len(r._bad) <= 1
    assert all(reviews.asked.count(t) == 1 for t in good)


def test_tokens_that_no_review_could_accept_cost_no_review() -> None:
    """Expired (the API server still accepted one 5 s past its exp, and nothing could be
    cached for it: a review per call), minted for another audience, or without an expiry
    (only bound tokens carry our audience)."""
    now = [1000.0]
    expired = agent_jwt(exp=999)
    others = jwt({"aud": ["https://kubernetes.default.svc"], "exp": 4_000_000_000})
    aud_string = jwt({"aud": AUD, "exp": 4_000_000_000})
    no_exp = jwt({"aud": [AUD]})
    r, reviews = reviewer({aud_string: review()}, now)
    for token in (expired, others, no_exp):
        assert asyncio.run(r.identify(token)) is None
    assert reviews.asked == []
    assert asyncio.run(r.identify(aud_string)) is not None  # a single audience as a string


def test_a_token_for_other_audiences_too_is_refused_without_a_review() -> None:
    """A token minted for the gateway and the API server at once passes a TokenReview for
    the gateway's audience, yet would let a leaked gateway key call the API server (and an
    API credential call the gateway): it is refused, and costs no review."""
    now = [1000.0]
    both = jwt({"aud": [AUD, "https://kubernetes.default.svc"], "exp": 4_000_000_000})
    r, reviews = reviewer({both: review()}, now)
    assert asyncio.run(r.identify(both)) is None
    assert reviews.asked == []


def test_a_refusal_is_cached_even_for_a_token_about_to_expire() -> None:
    now = [1000.0]
    soon = agent_jwt(exp=1001)
    r, reviews = reviewer({soon: review(authenticated=False)}, now)
    for _ in range(5):
        assert asyncio.run(r.identify(soon)) is None
    assert reviews.asked == [soon]


@pytest.mark.parametrize("kubeconfig", [None, "missing"])
def test_serviceaccount_auth_without_credentials_ends_the_start_in_one_line(
    tmp_path: Path, kubeconfig: str | None
) -> None:
    """Outside a cluster and with no kubeconfig, the start ended in a kubernetes
    ConfigException traceback from deep inside the app's construction; it is now one line
    naming the setting, exit 2 like a bad flag."""
    routes = tmp_path / "routes.yaml"
    routes.write_text("tasks: {}\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLM_GATEWAY_", "KUBERNETES_")) and k != "KUBECONFIG"
    }
    env |= {"HOME": str(tmp_path), "PYTHONPATH": str(OPERATOR_DIR)}
    argv = ["--routes", str(routes), "--port", "0", "--agent-auth", "serviceaccount"]
    if kubeconfig:
        argv += ["--kubeconfig", str(tmp_path / kubeconfig)]
    done = subprocess.run(
        [sys.executable, "-m", "slm_gateway", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "slm-gateway: error: --agent-auth serviceaccount needs Kubernetes credentials to "
            "review agent tokens (in-cluster, --kubeconfig, or the default kubeconfig), and none "
            "could be loaded (ConfigException: "
        )
    )


def test_a_kubeconfig_that_is_not_one_is_named_by_its_error_type_only(tmp_path: Path) -> None:
    """A YAML error's text quotes a line of the file, which may hold a token: only the
    error's type is shown."""
    bad = tmp_path / "kubeconfig"
    bad.write_text("users: [{token: sk-TESTSECRET\n")
    with pytest.raises(AuthNotConfigured) as exc:
        token_reviewer(str(bad), AUD, 60.0)
    assert "TESTSECRET" not in str(exc.value)
    assert str(exc.value).endswith("could be loaded (ParserError)")


def outcomes(r: TokenReviewer, tokens: Any) -> list[Any]:
    """``identify`` of each token in turn: its identity, or the exception it raised."""

    async def run() -> list[Any]:
        out: list[Any] = []
        for t in tokens:
            try:
                out.append(await r.identify(t))
            except Exception as exc:
                out.append(exc)
        return out

    return asyncio.run(run())


def test_new_tokens_are_reviewed_at_a_bounded_rate_and_the_rest_told_to_come_back() -> None:
    """Forged tokens shaped like ours (our audience, a future expiry, a random signature)
    never repeat, so no cache matched them and each cost a TokenReview: 2,000 in 4.4 s, and
    an API server that throttles the gateway then failed real agents with 503s. After a burst
    of 500, at most 100 tokens a second are reviewed; the others are refused at once as rate
    limited (a 429 the SDKs retry), which neither holds back reviews as an outage does nor
    touches the tokens already cached."""
    now = [1000.0]
    forged = [agent_jwt(sub=f"forged-{i}") for i in range(700)]
    fresh = agent_jwt(sub="fresh")
    answers = {
        GOOD: review(),
        fresh: review(),
        **dict.fromkeys(forged, review(authenticated=False)),
    }
    r, reviews = reviewer(answers, now)
    assert asyncio.run(r.identify(GOOD)) == Identity("agents", "router")

    results = outcomes(r, forged)
    assert len(reviews.asked) == 500  # the burst, GOOD's review included
    assert results[:499] == [None] * 499
    assert all(isinstance(x, AuthRateLimited) for x in results[499:])
    assert asyncio.run(r.identify(GOOD)) == Identity("agents", "router")  # cached: no review
    assert len(reviews.asked) == 500

    now[0] += 0.1  # ten reviews' worth: no outage backoff stands in a new token's way
    assert asyncio.run(r.identify(fresh)) == Identity("agents", "router")
    # Refused tokens were not remembered as refused: each is reviewed once there is room.
    assert outcomes(r, forged[499:508]) == [None] * 9
    assert len(reviews.asked) == 510

    now[0] += 60  # an idle minute saves up no more than the burst
    more = [agent_jwt(sub=f"more-{i}") for i in range(600)]
    reviews.answers = {**answers, **dict.fromkeys(more, review(authenticated=False))}
    results = outcomes(r, more)
    assert len(reviews.asked) == 1010
    assert sum(isinstance(x, AuthRateLimited) for x in results) == 100


def test_the_review_rate_is_a_setting_and_calls_sharing_a_review_take_one() -> None:
    now = [1000.0]
    tokens = [agent_jwt(sub=f"agent-{i}") for i in range(12)]
    r, reviews = reviewer(dict.fromkeys(tokens, review()), now, reviews_per_s=2)

    async def run() -> list[Any]:
        calls = (r.identify(t) for t in tokens for _ in range(10))
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    # A burst of five seconds' worth: ten tokens reviewed, ten calls sharing each review.
    assert results[:100] == [Identity("agents", "router")] * 100
    assert all(isinstance(x, AuthRateLimited) for x in results[100:])
    assert reviews.asked == tokens[:10]
    now[0] += 0.5  # one more review a half second at 2 a second
    last = outcomes(r, tokens[10:])
    assert last[0] == Identity("agents", "router") and isinstance(last[1], AuthRateLimited)


def test_a_token_once_found_valid_is_not_held_back_by_a_flood_of_new_ones() -> None:
    """The review budget covered every token not in the cache, real agents' too: an agent
    reviewed before was locked out by a flood of forged tokens as soon as its 60 s cache
    entry lapsed (a 429 at every call from second 60 on, for as long as the flood lasted).
    A token the API server has found valid is reviewed again when its cache entry lapses
    (its pod or ServiceAccount may be gone) without taking from the budget: only tokens never
    found valid do. One it then refuses takes from the budget again, like any other."""
    now = [1000.0]
    r, reviews = reviewer({GOOD: review()}, now, reviews_per_s=2)
    assert asyncio.run(r.identify(GOOD)) == Identity("agents", "router")
    limited = 0
    for second in range(70):  # ten forged tokens a second: five times the rate
        forged = [agent_jwt(sub=f"forged-{second}-{i}") for i in range(10)]
        reviews.answers = {GOOD: review(), **dict.fromkeys(forged, review(authenticated=False))}
        limited += sum(isinstance(x, AuthRateLimited) for x in outcomes(r, forged))
        assert outcomes(r, [GOOD]) == [Identity("agents", "router")], f"second {second}"
        now[0] += 1
    assert limited >= 500  # the flood was held to the rate all along
    assert reviews.asked.count(GOOD) == 2  # reviewed again once its 60 s had passed
    # Its ServiceAccount is deleted: the next review (no budget needed) refuses it, and it
    # is a token like any other again.
    reviews.answers = {GOOD: review(authenticated=False)}
    now[0] += 60
    assert outcomes(r, [GOOD]) == [None]
    now[0] += 6  # past the refusal's 5 s; the flood left no room
    forged = [agent_jwt(sub=f"last-{i}") for i in range(20)]
    reviews.answers = {GOOD: review(), **dict.fromkeys(forged, review(authenticated=False))}
    outcomes(r, forged)
    assert isinstance(outcomes(r, [GOOD])[0], AuthRateLimited)


def test_without_a_cache_an_agent_is_not_limited_by_its_own_calls() -> None:
    """With ``--agent-auth-cache-seconds 0`` every call is reviewed: one agent calling more
    often than the review rate got 429s for its own token. A token found valid takes nothing
    from the budget, so such an agent is reviewed at every call and never refused."""
    now = [1000.0]
    r, reviews = reviewer({GOOD: review()}, now, ttl_s=0.0)
    results = []
    for i in range(1000):  # 200 calls a second for 5 s, one token
        now[0] = 1000.0 + i / 200
        results += outcomes(r, [GOOD])
    assert results == [Identity("agents", "router")] * 1000
    assert len(reviews.asked) == 1000


def test_a_fleet_of_new_pods_starting_at_once_is_let_in_by_the_default_burst() -> None:
    """300 agent pods started at once, each with a token never seen: past a burst of 100,
    96 of them still had a 429 after the OpenAI SDK's two retries (a second apart). The
    default burst is 500 reviews, then 100 a second; past it a never-seen token gets 429."""
    now = [1000.0]
    pods = [agent_jwt(sub=f"pod-{i}") for i in range(300)]
    fleet = [agent_jwt(sub=f"fleet-{i}") for i in range(600)]
    r, reviews = reviewer(dict.fromkeys(pods + fleet, review()), now)
    results = []
    for i, token in enumerate(pods):
        now[0] = 1000.0 + i / 3000  # all within 0.1 s
        results += outcomes(r, [token])
    assert results == [Identity("agents", "router")] * 300
    now[0] += 60  # the burst is back; 600 new pods at one instant
    results = outcomes(r, fleet)
    assert results[:500] == [Identity("agents", "router")] * 500
    assert all(isinstance(x, AuthRateLimited) for x in results[500:])
    now[0] += 1  # the SDK's retry a second later: 100 more
    assert outcomes(r, fleet[500:]) == [Identity("agents", "router")] * 100
    assert len(reviews.asked) == 900


def test_the_tokens_found_valid_are_remembered_in_bounded_memory() -> None:
    """At most ``max_entries`` digests (32 bytes and an expiry each), oldest first out: a
    token pushed out takes from the budget again at its next review, nothing worse."""
    now = [1000.0]
    tokens = [agent_jwt(sub=f"agent-{i}") for i in range(25)]
    r, _ = reviewer(dict.fromkeys(tokens, review()), now, max_entries=10)
    assert outcomes(r, tokens) == [Identity("agents", "router")] * 25
    assert len(r._valid) == 10
    assert all(hashlib.sha256(t.encode()).digest() in r._valid for t in tokens[15:])
