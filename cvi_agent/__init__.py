"""cvi-agent: custom LLM backend, live room orchestration and callback ingestion for Tavus CVI."""

__version__ = "0.1.0"
