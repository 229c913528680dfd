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
from simulators.faults import Faults
from simulators.fleet import ProvisioningError, SimulatedFleet, load_credentials, provision, save_credentials
from simulators.scenario import ScenarioStep, load_scenario, parse_scenario, run_scenario

__all__ = [
    "CabinetCredentials",
    "CabinetError",
    "CabinetFull",
    "CabinetNotConnected",
    "CabinetRefused",
    "CabinetUnreachable",
    "Faults",
    "ProvisioningError",
    "ScenarioStep",
    "SimulatedCabinet",
    "SimulatedFleet",
    "load_credentials",
    "load_scenario",
    "parse_scenario",
    "provision",
    "run_scenario",
    "save_credentials",
    "send_return",
]
