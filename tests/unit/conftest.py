"""Fixtures shared by the unit tests.

``standin``: the LLM stand-in process, one per test module that asks for it (a module with its
own stand-in settings defines its own ``standin``, which takes precedence). Modules that want
its behaviour and counters set back before each test add an autouse fixture calling
``standin.control(**llm_standin.SETTINGS, reset_stats=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slm_e2e import llm_standin


@pytest.fixture(scope="module")
def standin() -> Iterator[llm_standin.StandIn]:
    with llm_standin.start() as s:
        yield s
