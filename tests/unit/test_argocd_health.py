"""The Argo CD health check, run by a real Lua interpreter on statuses the operator wrote.

The samples under ``tests/data/argocd`` come from real operator runs on the local control
plane (``scripts/capture_status_samples.py``; each file's ``source`` says how). The script
runs under Lua 5.1 (the language of gopher-lua, which Argo CD embeds) and Lua 5.4, both from
``lupa``, in a sandbox like Argo CD's: only base functions, ``table`` and ``os.time/date``,
no ``string`` or ``math`` library and no string methods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lupa", reason="the health check is tested with lupa (pip install lupa)")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "argocd" / "agenttask-health.lua"
SAMPLES = REPO / "tests" / "data" / "argocd"

#: sample -> (Argo CD health status, text the message must contain)
EXPECTED = {
    "unobserved": ("Progressing", "observe generation 1"),
    "preparing-data": ("Progressing", "PreparingData"),
    "training": ("Progressing", "0/2 candidates finished"),
    "exporting": ("Progressing", "Exporting"),
    "gate-not-met": ("Degraded", "GateNotMet"),
    "job-failed": ("Degraded", "CUDA out of memory"),
    "invalid-spec": ("Degraded", "another PVC"),
    "serving-ready": ("Healthy", "serves the task's calls"),
    "retraining-while-serving": ("Healthy", "retraining revision"),
    "stale-generation": ("Progressing", "observe generation 2"),
    "fallback-slo-breached": ("Degraded", "SLOBreached"),
    "fallback-recovering": ("Progressing", "Recovering"),
}

# Argo CD (util/lua/lua.go) opens only the base, package and table libraries plus a safe
# os with time and date; everything else is nil. String methods go with the string library.
SANDBOX = """
return function(script, obj)
  local env = {
    ipairs = ipairs, pairs = pairs, next = next, type = type, tostring = tostring,
    tonumber = tonumber, error = error, pcall = pcall, select = select, assert = assert,
    table = table, os = { time = os.time, date = os.date }, obj = obj,
  }
  local chunk, err
  if setfenv then
    chunk, err = loadstring(script, "health.lua")
    if chunk then setfenv(chunk, env) end
  else
    chunk, err = load(script, "health.lua", "t", env)
  end
  if not chunk then error(err) end
  local meta = getmetatable("")
  local index = meta.__index
  meta.__index = {}
  local ok, result = pcall(chunk)
  meta.__index = index
  if not ok then error(result) end
  return result
end
"""

VERSIONS = ("lua51", "lua54")


def runtime(version: str) -> Any:
    try:
        module = __import__(f"lupa.{version}", fromlist=["LuaRuntime"])
    except ImportError:
        pytest.skip(f"lupa has no {version} runtime here")
    return module.LuaRuntime(unpack_returned_tuples=True, register_eval=False)


def health(version: str, obj: dict[str, Any]) -> dict[str, Any]:
    lua = runtime(version)
    run = lua.execute(SANDBOX)
    result = run(SCRIPT.read_text(), lua.table_from(obj, recursive=True))
    return dict(result)


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    return data


def test_every_sample_has_an_expectation() -> None:
    assert {p.stem for p in SAMPLES.glob("*.json")} == set(EXPECTED)
    for name in EXPECTED:
        assert sample(name)["source"], f"{name}.json does not say where it came from"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_health_of_real_statuses(version: str, name: str) -> None:
    want_status, want_text = EXPECTED[name]
    got = health(version, sample(name)["object"])
    assert got["status"] == want_status, got
    assert want_text in got["message"], got


@pytest.mark.parametrize("version", VERSIONS)
def test_a_child_the_api_server_refused_is_degraded(version: str) -> None:
    """The training sample as the operator writes it when a quota refuses its Job: Ready
    False with reason ApplyFailed (operator/slm_operator/plan.py with_apply_failures)."""
    obj = sample("training")["object"]
    message = 'jobs.batch "weather-data-1" is forbidden: exceeded quota: jobs'
    for cond in obj["status"]["conditions"]:
        if cond["type"] == "Ready":
            cond.update(status="False", reason="ApplyFailed", message=message)
    got = health(version, obj)
    assert got["status"] == "Degraded", got
    assert "exceeded quota" in got["message"], got


@pytest.mark.parametrize("version", VERSIONS)
def test_a_task_scaled_to_zero_while_idle_is_healthy(version: str) -> None:
    """The serving sample as the operator writes it once an idle task (serving.minReplicas 0)
    has no replica (test_plan.py's test_a_task_scaled_to_zero_while_idle_is_healthy_not_an_
    outage): Ready and FallbackActive True with reason ScaledToZero. Healthy, where a replica
    that went missing (NoReadyReplicas) is Degraded."""
    obj = sample("serving-ready")["object"]
    why = "scaled to zero while idle (serving.minReplicas 0); calls go to the LLM"
    for cond in obj["status"]["conditions"]:
        if cond["type"] in ("Ready", "FallbackActive"):
            cond.update(status="True", reason="ScaledToZero", message=why)
        if cond["type"] == "Serving":
            cond.update(status="False", reason="ScaledToZero", message=why)
    got = health(version, obj)
    assert got["status"] == "Healthy", got
    assert "scaled to zero" in got["message"], got
    for cond in obj["status"]["conditions"]:
        if cond["type"] in ("Ready", "FallbackActive"):
            cond.update(status="False" if cond["type"] == "Ready" else "True")
            cond.update(reason="NoReadyReplicas", message="no Triton replica is ready")
    assert health(version, obj)["status"] == "Degraded"


@pytest.mark.parametrize("version", VERSIONS)
def test_sandbox_really_has_no_string_library(version: str) -> None:
    lua = runtime(version)
    run = lua.execute(SANDBOX)
    with pytest.raises(Exception, match="upper"):  # lupa.lua5x.LuaError
        run('return {status = ("x"):upper()}', lua.table_from({}))
    with pytest.raises(Exception, match="string"):
        run("return {status = string.upper('x')}", lua.table_from({}))


def test_argocd_cm_embeds_the_script_verbatim() -> None:
    cm = yaml.safe_load((REPO / "argocd" / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    embedded = cm["data"]["resource.customizations.health.slmfleet.dev_AgentTask"]
    assert embedded.strip() == SCRIPT.read_text().strip()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_promoted_model_whose_rollout_is_stuck_is_degraded(version: str) -> None:
    """The serving sample as the operator writes it when a promoted revision's Triton pods
    never get ready (plan.py's RolloutStuck): the LLM answers the calls the model should, so
    Argo CD shows it Degraded, not Healthy."""
    obj = sample("serving-ready")["object"]
    message = "small (revision 6185452057) made no progress: pod weather-slm-new CrashLoopBackOff"
    for cond in obj["status"]["conditions"]:
        if cond["type"] == "Ready":
            cond.update(status="False", reason="RolloutStuck", message=message)
    got = health(version, obj)
    assert got["status"] == "Degraded", got
    assert "CrashLoopBackOff" in got["message"], got
