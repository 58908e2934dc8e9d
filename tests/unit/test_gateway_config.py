"""The gateway's settings: values that would break every task are refused at start.

A zero or negative SLM budget, LLM timeout, breaker threshold or cooldown, or a resync under a
second used to be accepted and break every task only once requests came (404 or 500 for every
call, a watch failing in a loop). Each is now an error naming the flag and the range allowed,
whether it came as a flag or through its ``SLM_GATEWAY_*`` environment variable.
"""

from __future__ import annotations

import pytest

from slm_gateway.config import config_from_args

BAD = [
    ("--slm-timeout-ms", "0", "above 0"),
    ("--slm-timeout-ms", "-200", "above 0"),
    ("--slm-timeout-ms", "nan", "a finite number above 0"),
    ("--llm-timeout-s", "0", "above 0"),
    ("--llm-timeout-s", "-1", "above 0"),
    ("--llm-timeout-s", "inf", "a finite number above 0"),
    ("--breaker-failures", "0", "at least 1"),
    ("--breaker-failures", "-3", "at least 1"),
    ("--breaker-cooldown-s", "-0.5", "at least 0"),
    ("--resync-seconds", "0", "at least 1"),
    ("--resync-seconds", "-5", "at least 1"),
]


def env_name(flag: str) -> str:
    return "SLM_GATEWAY_" + flag.removeprefix("--").replace("-", "_").upper()


@pytest.mark.parametrize(("flag", "value", "bound"), BAD)
def test_a_value_that_breaks_every_task_is_refused_with_the_flag_and_range(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, bound: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--namespace", "ns", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} must be {bound}" in err
    assert env_name(flag) in err


@pytest.mark.parametrize(("flag", "value", "bound"), BAD)
def test_the_same_value_from_the_environment_is_refused_too(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
    bound: str,
) -> None:
    monkeypatch.setenv(env_name(flag), value)
    with pytest.raises(SystemExit):
        config_from_args(["--namespace", "ns"])
    assert f"{flag} must be {bound}" in capsys.readouterr().err


def test_the_lowest_values_allowed_and_the_defaults_pass() -> None:
    low = config_from_args(
        [
            "--namespace",
            "ns",
            "--slm-timeout-ms",
            "1",
            "--llm-timeout-s",
            "0.5",
            "--breaker-failures",
            "1",
            "--breaker-cooldown-s",
            "0",
            "--resync-seconds",
            "1",
        ]
    )
    assert (low.slm_timeout_s, low.llm_timeout_s) == (0.001, 0.5)
    assert (low.breaker_failures, low.breaker_cooldown_s, low.resync_s) == (1, 0.0, 1)
    default = config_from_args(["--namespace", "ns"])
    assert (default.slm_timeout_s, default.breaker_failures, default.resync_s) == (2.0, 5, 300)
