"""`api.admission.Admission`: the slot count behind 503 `overloaded`."""

from __future__ import annotations

import pytest

from api.admission import Admission
from domain.errors import Overloaded


def test_admits_up_to_the_limit_then_refuses_with_retry_after() -> None:
    gate = Admission("test", limit=2, retry_after_s=3)
    with gate.admit(), gate.admit():
        assert gate.in_flight == 2
        with pytest.raises(Overloaded) as refused, gate.admit():
            pass
        assert refused.value.context["retry_after"] == 3
        assert gate.in_flight == 2
    assert gate.in_flight == 0
    with gate.admit():
        assert gate.in_flight == 1


def test_a_failing_request_gives_its_slot_back() -> None:
    gate = Admission("test", limit=1, retry_after_s=1)
    with pytest.raises(RuntimeError), gate.admit():
        raise RuntimeError("the work failed")
    assert gate.in_flight == 0
