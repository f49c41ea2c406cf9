"""An offline stand-in for Tavus: a simulated user and replica talk to the real server.

It lets a developer (or the console's button) watch a whole conversation (speculative requests,
a replica speaking in a room, tool calls, interruptions, callbacks) without a Tavus account.

- `script`: the YAML script a simulation plays (`simulation.yaml` is the default one).
- `engine`: `Simulation`, which plays a script against a running server.
- `report`: what a simulation measured, and its table for a terminal.
- `routes`: `POST /api/simulations`, the console's "start a simulated conversation".

`cvi-agent simulate` lives with the other commands, in `cvi_agent.cli.simulate`.
"""
