"""Simulated cabinets speaking the rentbox protocol over MQTT, for tests, demos and load.

Imports nothing from the server side except :mod:`rentbox`.
"""

from simulators.cabinet import (
    CabinetCredentials,
    CabinetError,
    CabinetFull,
    CabinetNotConnected,
    CabinetRefused,
    CabinetUnreachable,
    SimulatedCabinet,
    send_return,
)
from simulators.fleet import ProvisioningError, SimulatedFleet, load_credentials, provision, save_credentials

__all__ = [
    "CabinetCredentials",
    "CabinetError",
    "CabinetFull",
    "CabinetNotConnected",
    "CabinetRefused",
    "CabinetUnreachable",
    "ProvisioningError",
    "SimulatedCabinet",
    "SimulatedFleet",
    "load_credentials",
    "provision",
    "save_credentials",
    "send_return",
]
