"""Brains answer a turn: `upstream` (any OpenAI-compatible model), `flow` (deterministic), `echo`."""

from __future__ import annotations

from cvi_agent.llm.brains.base import Brain
from cvi_agent.llm.brains.echo import EchoBrain
from cvi_agent.llm.brains.flow import FlowBrain
from cvi_agent.llm.brains.upstream import UpstreamBrain, UpstreamClients
from cvi_agent.personas import Persona


def make_brain(persona: Persona, clients: UpstreamClients) -> Brain:
    """The brain a persona's `brain.kind` names, built once per process at startup.

    Upstream brains share `clients`, so personas pointing at the same upstream share one
    connection pool and one circuit breaker. The persona model allows only `upstream`, `flow`
    and `echo`, so the last branch is the echo brain.
    """
    kind = persona.brain.kind
    if kind == "upstream":
        return UpstreamBrain(persona, clients)
    if kind == "flow":
        return FlowBrain(persona)
    return EchoBrain()


__all__ = ["Brain", "EchoBrain", "FlowBrain", "UpstreamBrain", "UpstreamClients", "make_brain"]
