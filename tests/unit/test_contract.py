"""The trainer result as the operator reads it back from a 4 KiB termination message."""

from __future__ import annotations

import pytest

from slm_contract import TERMINATION_MESSAGE_LIMIT, TrainerResult


@pytest.mark.parametrize(
    "message",
    [
        "Ошибка загрузки модели: " * 400,  # escaped as \uXXXX: 6 bytes a character
        'Traceback:\n  File "x.py", line 1\n\tboom\n' * 300,  # escapes double newlines, quotes
        "模型 🚀 " * 2000,  # emoji become surrogate pairs: 12 bytes for one character
    ],
)
def test_a_long_message_keeps_as_much_as_fits(message: str) -> None:
    text = TrainerResult(stage="evaluate", ok=False, message=message).to_json()
    kept = TrainerResult.from_json(text).message
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert kept.endswith(" [truncated]")
    assert message.startswith(kept.removesuffix(" [truncated]"))
    # The operator shows this message as the reason: cut only what does not fit.
    assert len(text.encode()) > TERMINATION_MESSAGE_LIMIT - 16
