"""`tollway simulate`: a vLLM-compatible simulator of one model server.

Public API: `SimulatorProfile` (what to simulate), `FaultSettings` (what to break),
`create_app(profile)` (the FastAPI app), `SimulatorServer` (in-process, background thread)
and `SimulatorProcess` (a child process). See the modules for the model behind it:
`capacity` (scheduler), `engine` (real-time driver), `metrics` (vLLM series), `textgen`
(tokenizer, text and embeddings), `faults`, `protocol` (wire format), `cli`.
"""

from router_service.simulator.app import create_app
from router_service.simulator.faults import FaultSettings
from router_service.simulator.profile import SimulatorProfile
from router_service.simulator.server import SimulatorProcess, SimulatorServer

__all__ = ["FaultSettings", "SimulatorProcess", "SimulatorProfile", "SimulatorServer", "create_app"]
