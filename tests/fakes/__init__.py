"""Local fakes of the outside services the backend calls, each speaking its documented protocol so the
real clients run against them (the payment gateways for `domain.payments`). A fake keeps its state in
memory; tests drive it (`pay`, `cancel`, ...) the way a user at the gateway's page would, and serve its
app with `serve` on a free 127.0.0.1 port."""

from tests.fakes.esewa import FakeEsewa
from tests.fakes.khalti import FakeKhalti
from tests.fakes.server import serve
from tests.fakes.stripe import FakeStripe

__all__ = ["FakeEsewa", "FakeKhalti", "FakeStripe", "serve"]
