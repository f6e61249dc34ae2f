"""kegnet.errors: the interrupts that optional steps' broad catches must let through."""

import pytest

from kegnet.errors import Cancelled, interrupting, reraise_interrupts


class TimeLimit(Exception):  # noqa: N818 - stands for Celery's SoftTimeLimitExceeded
    pass


def swallowing(exc: Exception) -> str:
    """An optional step that keeps the job on any failure, as the int8 and .pt2 steps do."""
    try:
        raise exc
    except Exception as e:  # noqa: BLE001 - what is under test
        reraise_interrupts(e)
        return "kept going"


def test_only_named_interrupts_and_cancels_go_through_and_only_inside_the_block() -> None:
    assert swallowing(TimeLimit()) == "kept going"
    with interrupting((TimeLimit,)):
        with pytest.raises(TimeLimit):
            swallowing(TimeLimit())
        assert swallowing(ValueError("a quantizer failure")) == "kept going"
    assert swallowing(TimeLimit()) == "kept going"  # reset after the block
    with pytest.raises(Cancelled):
        swallowing(Cancelled())
