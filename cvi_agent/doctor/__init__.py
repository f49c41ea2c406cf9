"""`cvi-agent doctor`'s checks, which `cvi-agent serve` also runs briefly at start-up and
`GET /readyz` partly reuses: is what the configuration asks for actually there (the database,
Redis, each persona's upstream, Tavus, a public URL, the callback token)?"""

from cvi_agent.doctor.checks import (
    DOCTOR_TIMEOUT,
    STARTUP_TIMEOUT,
    Check,
    cause_of,
    check_database,
    check_redis,
    ping_redis,
    run_checks,
    shown_url,
    startup_checks,
)

__all__ = [
    "DOCTOR_TIMEOUT",
    "STARTUP_TIMEOUT",
    "Check",
    "cause_of",
    "check_database",
    "check_redis",
    "ping_redis",
    "run_checks",
    "shown_url",
    "startup_checks",
]
