"""`cvi-agent bench`: what cvi-agent adds to a live call, measured on the machine it runs on.

Four processes, so the numbers stay honest on a small machine: the fake OpenAI-compatible
upstream (`python -m cvi_agent.devtools.fakes.upstream`), a null TCP relay in front of it (the
cost of any extra hop), the server under test (`cvi-agent serve`, optionally with `--workers
N`), and this process, which generates Tavus-like load with a lean HTTP/1.1 client (httptools)
so the load generator costs little.

Scenarios:
- *overhead* (`overhead.py`): C concurrent streaming clients, phases alternating between the
  upstream directly, the null relay and cvi-agent; added time to first token and inter-chunk
  latency, relayed chunks per second, server CPU per relayed chunk, errors, peak RSS of every
  process.
- *speculative* (`speculative.py`): conversations sent as progressive partial transcripts
  (each superseding the last, the superseded stream closed like Tavus does), then the final
  request; half of them straight to the upstream, half through cvi-agent. Final time to first
  token, upstream tokens generated against tokens spoken, and client disconnect → upstream
  closed.

Every figure is reported beside its direct-to-upstream twin, as medians and tails, never as one
absolute number; the table ends with the peak RSS of each process.

Modules: `params` (settings and the request's content), `processes` (the child processes and
their CPU and memory), `load` (the load generator), `metrics` (the server's Prometheus
figures), `overhead` and `speculative` (the scenarios), `run` (starting the processes and
running the scenarios), `stats` and `report` (figures and the table), `options` and `cli`
(the command line).
"""
