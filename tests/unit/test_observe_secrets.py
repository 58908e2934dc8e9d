"""A trainer's termination message reaches an AgentTask's conditions and Events: never with
the credentials of a URI it names, even from a trainer image that does not redact them."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from slm_contract import TrainerResult
from slm_operator import conditions as c
from slm_operator import observe, plan

SECRET = "sk-TESTSECRET1234567890abcdef"
URI = f"https://alice:{SECRET}@dav.example.com/calls/?sig={SECRET}x"


def _pod(exit_code: int, message: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "labels": {"job-name": "t-prepare-r1"}, "annotations": {}},
        "status": {
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": exit_code, "message": message}},
                }
            ]
        },
    }


def _job(condition: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "t-prepare-r1", "labels": {}, "uid": "u1"},
        "status": {"conditions": [{"type": condition, "status": "True", "reason": "X"}]},
    }


# What an older trainer wrote: its result quoting the URI in full, or (no result written,
# terminationMessagePolicy FallbackToLogsOnError) its log tail, whose start line lists it.
OLD_RESULT = TrainerResult(
    stage="prepare", ok=False, message=f"cannot read the call log at {URI}: access denied"
).to_json()
LOG_TAIL = json.dumps({"event": "start", "stage": "curate", "args": {"input": URI}}) + "\nboom"


@pytest.mark.parametrize(
    ("condition", "exit_code", "message"),
    [
        ("Failed", 3, OLD_RESULT),  # a Failed Job: failure_message quotes the result
        ("Complete", 0, OLD_RESULT),  # a result that says ok=false: "reported failure"
        ("Failed", 1, LOG_TAIL),  # no result: the log tail
    ],
)
def test_a_condition_and_its_event_never_show_a_uris_credentials(
    condition: str, exit_code: int, message: str
) -> None:
    view = observe.job_view(_job(condition), [_pod(exit_code, message)])
    status, reason, msg = plan._job_outcome(view, dt.datetime.now(dt.UTC))
    assert status == c.FALSE
    cur = [{"type": "DataPrepared", "status": status, "reason": reason, "message": msg}]
    prev = [{"type": "DataPrepared", "status": "Unknown", "reason": "JobRunning", "message": ""}]
    events = c.transitions(prev, cur)
    assert events, "the failure is an Event"
    assert "TESTSECRET" not in msg and "TESTSECRET" not in repr(events)
    assert "https://dav.example.com/calls/" in msg
