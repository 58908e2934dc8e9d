"""The gateway's settings: values that would break every task are refused at start.

A zero or negative SLM budget, LLM timeout, breaker threshold or cooldown, or a resync under a
second used to be accepted and break every task only once requests came (404 or 500 for every
call, a watch failing in a loop). Each is now an error naming the flag and the range allowed,
whether it came as a flag or through its ``SLM_GATEWAY_*`` environment variable. A variable
that is not a number (or on/off) at all is refused the same way, in one line naming it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slm_gateway.config import build_parser, config_from_args

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
    # nan passed every "<= 0" check, and the capture sizes then crashed the start in int()
    ("--capture-shard-mb", "nan", "a finite number above 0"),
    ("--capture-shard-mb", "0", "above 0"),
    ("--capture-shard-seconds", "-1", "above 0"),
    ("--capture-queue-mb", "inf", "a finite number above 0"),
    ("--capture-queue-mb", "0", "above 0"),
    ("--capture-spool-mb", "nan", "a finite number above 0"),
    ("--capture-spool-mb", "-1", "above 0"),
    ("--secret-refresh-seconds", "nan", "a finite number at least 0"),
    ("--graceful-timeout-s", "nan", "a finite number at least 0"),
    ("--graceful-timeout-s", "-1", "at least 0"),
    ("--body-timeout-s", "0", "above 0"),
    ("--body-timeout-s", "nan", "a finite number above 0"),
    ("--removed-task-metrics-s", "inf", "a finite number at least 0"),
    # every call a 413 (the chart's own minimum is 1024)
    ("--max-body-bytes", "-5", "at least 1024"),
    ("--max-body-bytes", "0", "at least 1024"),
    ("--max-body-bytes", "1023", "at least 1024"),
    # every shadow comparison skipped: a shadow task could never be promoted
    ("--max-shadow-inflight", "0", "at least 1"),
    ("--max-shadow-inflight", "-1", "at least 1"),
    # every token not yet cached refused as rate limited
    ("--agent-auth-reviews-per-second", "0", "above 0"),
    ("--agent-auth-reviews-per-second", "nan", "a finite number above 0"),
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
            "--max-body-bytes",
            "1024",
            "--max-shadow-inflight",
            "1",
        ]
    )
    assert (low.slm_timeout_s, low.llm_timeout_s) == (0.001, 0.5)
    assert (low.breaker_failures, low.breaker_cooldown_s, low.resync_s) == (1, 0.0, 1)
    assert (low.max_body_bytes, low.max_shadow_inflight) == (1024, 1)
    default = config_from_args(["--namespace", "ns"])
    assert (default.slm_timeout_s, default.breaker_failures, default.resync_s) == (2.0, 5, 300)


# Every numeric flag read from the environment, as (variable, flag). A value that is not a
# number used to end the real entry point in a ValueError traceback, exit 1, at parser build.
ENV_NUMBERS = [
    ("SLM_GATEWAY_RESYNC_SECONDS", "--resync-seconds", "an integer"),
    ("SLM_GATEWAY_SECRET_REFRESH_SECONDS", "--secret-refresh-seconds", "a number"),
    ("SLM_GATEWAY_CAPTURE_SHARD_MB", "--capture-shard-mb", "a number"),
    ("SLM_GATEWAY_CAPTURE_SHARD_SECONDS", "--capture-shard-seconds", "a number"),
    ("SLM_GATEWAY_CAPTURE_QUEUE", "--capture-queue", "an integer"),
    ("SLM_GATEWAY_CAPTURE_QUEUE_MB", "--capture-queue-mb", "a number"),
    ("SLM_GATEWAY_CAPTURE_SPOOL_MB", "--capture-spool-mb", "a number"),
    ("SLM_GATEWAY_CAPTURE_WORKERS", "--capture-workers", "an integer"),
    ("SLM_GATEWAY_CAPTURE_LINGER_MS", "--capture-linger-ms", "a number"),
    ("SLM_GATEWAY_SLM_TIMEOUT_MS", "--slm-timeout-ms", "a number"),
    ("SLM_GATEWAY_LLM_TIMEOUT_S", "--llm-timeout-s", "a number"),
    ("SLM_GATEWAY_BREAKER_FAILURES", "--breaker-failures", "an integer"),
    ("SLM_GATEWAY_BREAKER_COOLDOWN_S", "--breaker-cooldown-s", "a number"),
    ("SLM_GATEWAY_MAX_SHADOW_INFLIGHT", "--max-shadow-inflight", "an integer"),
    ("SLM_GATEWAY_UPSTREAM_POOL_SIZE", "--upstream-pool-size", "an integer"),
    ("SLM_GATEWAY_PORT", "--port", "an integer"),
    ("SLM_GATEWAY_MAX_BODY_BYTES", "--max-body-bytes", "an integer"),
    ("SLM_GATEWAY_GRACEFUL_TIMEOUT_S", "--graceful-timeout-s", "a number"),
    ("SLM_GATEWAY_BODY_TIMEOUT_S", "--body-timeout-s", "a number"),
    ("SLM_GATEWAY_REMOVED_TASK_METRICS_S", "--removed-task-metrics-s", "a number"),
    ("SLM_GATEWAY_AGENT_AUTH_CACHE_SECONDS", "--agent-auth-cache-seconds", "a number"),
    ("SLM_GATEWAY_AGENT_AUTH_REVIEWS_PER_SECOND", "--agent-auth-reviews-per-second", "a number"),
]
OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"


def run_gateway(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, as a Deployment or a person runs it, with only ``env`` set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLM_GATEWAY_")}
    clean["PYTHONPATH"] = str(OPERATOR_DIR)
    return subprocess.run(
        [sys.executable, "-m", "slm_gateway", *argv],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(("var", "flag", "kind"), ENV_NUMBERS)
def test_a_non_numeric_environment_value_is_refused_in_one_line_naming_it(
    var: str, flag: str, kind: str
) -> None:
    done = run_gateway({var: "abc"}, "--namespace", "ns")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"slm-gateway: error: {var} must be {kind} (got a 3-character value, not shown; "
        f"it sets {flag}'s default)"
    )


def test_an_on_off_variable_takes_the_usual_words_and_refuses_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``true`` used to mean off without a word (only ``1`` was on); ``maybe`` did too."""
    monkeypatch.delenv("SLM_GATEWAY_NAMESPACE", raising=False)
    for word in ("1", "true", "Yes", "on"):
        monkeypatch.setenv("SLM_GATEWAY_ALL_NAMESPACES", word)
        assert config_from_args([]).all_namespaces
    for word in ("0", "false", "off", ""):
        monkeypatch.setenv("SLM_GATEWAY_ALL_NAMESPACES", word)
        assert not config_from_args(["--namespace", "ns"]).all_namespaces
    done = run_gateway({"SLM_GATEWAY_ALL_NAMESPACES": "maybe"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "slm-gateway: error: SLM_GATEWAY_ALL_NAMESPACES must be one of 1, true, yes, on, 0, "
        "false, no, off (got a 5-character value, not shown; it sets --all-namespaces's default)"
    )


def test_a_flag_overrides_a_bad_variable_and_all_bad_ones_are_named_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLM_GATEWAY_PORT", "eighty")
    assert config_from_args(["--namespace", "ns", "--port", "9000"]).port == 9000
    monkeypatch.setenv("SLM_GATEWAY_CAPTURE_WORKERS", "1.5")
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--namespace", "ns"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "SLM_GATEWAY_PORT must be an integer (got a 6-character value, not shown" in err
    assert "SLM_GATEWAY_CAPTURE_WORKERS must be an integer (got '1.5'" in err


def test_a_key_pasted_into_a_numeric_variable_is_not_printed() -> None:
    key = "sk-proj-" + "Zq8" * 12
    done = run_gateway(
        {"SLM_GATEWAY_LLM_TIMEOUT_S": key, "SLM_GATEWAY_LLM_API_KEY": key}, "--namespace", "ns"
    )
    assert done.returncode == 2
    assert key[:4] not in done.stderr + done.stdout
    assert "SLM_GATEWAY_LLM_TIMEOUT_S must be a number (got a 44-character value" in done.stderr


SHORT_KEY = "sk-ant-TESTSECRET12345"  # 22 characters: short values used to be shown


@pytest.mark.parametrize("var", ["SLM_GATEWAY_LLM_TIMEOUT_S", "SLM_GATEWAY_PORT"])
def test_a_short_key_in_a_numeric_variable_is_not_printed_even_in_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], var: str
) -> None:
    """Values of up to 24 characters used to be quoted as typed: a short key was echoed."""
    monkeypatch.setenv(var, SHORT_KEY)
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--namespace", "ns"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "TESTSECRET" not in err
    assert f"{var} must be " in err
    assert f"got a {len(SHORT_KEY)}-character value, not shown" in err
    with pytest.raises(SystemExit):
        config_from_args(["--help"])  # %(default)s in a flag's help showed the value too
    assert "TESTSECRET" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["1.5", "30s", "2,5", "64MB"])
def test_a_mistyped_number_is_still_shown_as_typed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    monkeypatch.setenv("SLM_GATEWAY_CAPTURE_WORKERS", value)
    with pytest.raises(SystemExit):
        config_from_args(["--namespace", "ns"])
    assert f"SLM_GATEWAY_CAPTURE_WORKERS must be an integer (got {value!r};" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("level", ["trace", "verbose", "sk-TESTSECRET1234567890abcdef"])
def test_an_unknown_log_level_is_refused_in_one_line_listing_the_levels(level: str) -> None:
    """``trace`` (uvicorn logs every request's headers at it) and typos used to crash the
    start with a ``ValueError: Unknown level`` traceback; from the variable too."""
    for done in (
        run_gateway({}, "--namespace", "ns", "--log-level", level),
        run_gateway({"SLM_GATEWAY_LOG_LEVEL": level}, "--namespace", "ns"),
    ):
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert "TESTSECRET" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            "slm-gateway: error: --log-level must be one of critical, error, warning, info, "
            "debug (SLM_GATEWAY_LOG_LEVEL sets its default)"
        )


@pytest.mark.parametrize("mode", ["token", "sk-TESTSECRET1234567890abcdef"])
def test_an_unknown_agent_auth_mode_is_refused_without_showing_it(mode: str) -> None:
    for done in (
        run_gateway({}, "--namespace", "ns", "--agent-auth", mode),
        run_gateway({"SLM_GATEWAY_AGENT_AUTH": mode}, "--namespace", "ns"),
    ):
        assert done.returncode == 2, done.stderr
        assert "TESTSECRET" not in done.stderr and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            "slm-gateway: error: --agent-auth must be one of none, serviceaccount "
            "(SLM_GATEWAY_AGENT_AUTH sets its default)"
        )


def test_agent_auth_settings_reach_the_config() -> None:
    cfg = config_from_args(["--namespace", "ns"])
    assert (cfg.agent_auth, cfg.agent_auth_audience, cfg.agent_auth_cache_s) == (
        "none",
        "slm-fleet-gateway",
        60.0,
    )
    assert cfg.agent_auth_reviews_per_s == 100.0
    cfg = config_from_args(
        [
            "--namespace",
            "ns",
            "--agent-auth",
            "serviceaccount",
            "--agent-auth-audience",
            " agents.example.com ",
            "--agent-auth-cache-seconds",
            "15",
            "--agent-auth-reviews-per-second",
            "2.5",
        ]
    )
    assert (cfg.agent_auth, cfg.agent_auth_audience, cfg.agent_auth_cache_s) == (
        "serviceaccount",
        "agents.example.com",
        15.0,
    )
    assert cfg.agent_auth_reviews_per_s == 2.5


def test_a_log_level_is_taken_in_any_case() -> None:
    assert config_from_args(["--namespace", "ns", "--log-level", "DEBUG"]).log_level == "debug"


def test_every_numeric_and_on_off_flag_is_checked_here() -> None:
    """A numeric flag added later gets its variable checked by this file's tests too."""
    numeric = {
        env_name(a.option_strings[0])
        for a in build_parser()._actions
        if a.type in (int, float) or isinstance(a, argparse._StoreTrueAction)
    }
    assert numeric == {var for var, _, _ in ENV_NUMBERS} | {"SLM_GATEWAY_ALL_NAMESPACES"}


@pytest.mark.parametrize("price", ["llm=-1:-1", "llm=nan", "slm=0.1:inf", "slm=-0.0001"])
def test_a_negative_or_non_finite_price_is_refused(
    capsys: pytest.CaptureFixture[str], price: str
) -> None:
    """A task's own llmPrice refuses these; --price took them, and the cost counters then
    went backwards or became NaN for good."""
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--namespace", "ns", "--price", price])
    assert exc.value.code == 2
    assert f"--price {price!r}: prices must be finite and not negative" in capsys.readouterr().err


def test_a_free_price_is_still_taken() -> None:
    cfg = config_from_args(["--namespace", "ns", "--price", "slm=0:0", "--price", "llm=0.5"])
    assert (cfg.prices["slm"].prompt, cfg.prices["slm"].completion) == (0.0, 0.0)
    assert (cfg.prices["llm"].prompt, cfg.prices["llm"].completion) == (0.5, 0.5)


@pytest.mark.parametrize("port", ["70000", "65536", "-1"])
def test_a_port_outside_0_to_65535_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], port: str
) -> None:
    """argparse only checks for an integer; bind() then ended the start in an OverflowError
    traceback."""
    for argv, env in ((["--port", port], None), ([], port)):
        if env is not None:
            monkeypatch.setenv("SLM_GATEWAY_PORT", env)
        with pytest.raises(SystemExit) as exc:
            config_from_args(["--namespace", "ns", *argv])
        assert exc.value.code == 2
        assert (
            f"--port must be within 0..65535, 0 picks a free one (got {port}; "
            "SLM_GATEWAY_PORT sets its default)"
        ) in capsys.readouterr().err


def test_a_port_out_of_range_ends_the_real_start_without_a_traceback() -> None:
    done = run_gateway({}, "--namespace", "ns", "--port", "70000")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("slm-gateway: error: --port must be within 0..65535")
    )


def test_a_port_in_use_ends_the_start_in_one_line() -> None:
    """Address already in use (or a port below 1024 without the right) was a traceback."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_gateway({}, "--namespace", "ns", "--port", str(port))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"slm-gateway: error: cannot listen on --host's address, port {port}: "
        "Address already in use"
    )


def test_a_local_llm_key_with_a_line_break_is_refused_at_start_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A key file of two lines (or such a variable) made every route of a routes file
    unusable: each call a 404 model_not_found, though the routes file was fine."""
    key_file = tmp_path / "key"
    key_file.write_text("sk-TESTSECRET-one\nsk-two\n")
    monkeypatch.setenv("SLM_GATEWAY_LLM_API_KEY", "sk-TESTSECRET\r\nX-Injected: 1")
    routes = tmp_path / "routes.yaml"
    routes.write_text("tasks: {}\n")
    for argv in (["--llm-api-key-file", str(key_file)], []):
        with pytest.raises(SystemExit) as exc:
            config_from_args(["--routes", str(routes), *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "is unusable: a line break or NUL character inside" in err
        assert "TESTSECRET" not in err
    # Watching a cluster, the local key is never used: nothing to refuse. A trailing line
    # break (a variable set from a Secret made of a file) is no problem either.
    config_from_args(["--namespace", "ns", "--llm-api-key-file", str(key_file)])
    monkeypatch.setenv("SLM_GATEWAY_LLM_API_KEY", "sk-from-a-file\n")
    assert config_from_args(["--routes", str(routes)]).llm_api_key == "sk-from-a-file"


def test_an_unreadable_key_file_is_refused_in_one_line_without_its_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A missing key file ended the start in a FileNotFoundError traceback. The path is not
    shown: the variable may hold a key pasted into the wrong place."""
    missing = str(tmp_path / "sk-TESTSECRET-missing")
    for argv, env in (
        (["--llm-api-key-file", missing], None),
        (["--llm-api-key-file", str(tmp_path)], None),  # a directory
        ([], missing),
    ):
        if env is not None:
            monkeypatch.setenv("SLM_GATEWAY_LLM_API_KEY_FILE", env)
        with pytest.raises(SystemExit) as exc:
            config_from_args(["--namespace", "ns", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--llm-api-key-file cannot be read: " in err
        assert "SLM_GATEWAY_LLM_API_KEY_FILE sets its default" in err
        assert "TESTSECRET" not in err and str(tmp_path) not in err
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    cfg = config_from_args(["--namespace", "ns", "--llm-api-key-file", str(key_file)])
    assert (cfg.llm_api_key, cfg.llm_api_key_file) == ("sk-from-file", str(key_file))


def test_an_empty_host_variable_means_loopback_not_every_interface(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty SLM_GATEWAY_HOST (a manifest's "not set") reached bind() as "", which
    listens on every interface; the default is loopback only."""
    monkeypatch.setenv("SLM_GATEWAY_HOST", "")
    assert config_from_args(["--namespace", "ns"]).host == "127.0.0.1"
    monkeypatch.setenv("SLM_GATEWAY_HOST", "0.0.0.0")
    assert config_from_args(["--namespace", "ns"]).host == "0.0.0.0"
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--namespace", "ns", "--host", ""])
    assert exc.value.code == 2
    assert "--host must not be empty (0.0.0.0 or :: listens on every interface" in (
        capsys.readouterr().err
    )
