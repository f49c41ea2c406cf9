"""`cvi-agent doctor`: every check of `cvi_agent/doctor`, one line each (OK, WARN or FAIL and
what to set), and an exit status that says whether a configured feature is broken."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from cvi_agent.config import Settings
from cvi_agent.doctor import DOCTOR_TIMEOUT, Check, run_checks
from cvi_agent.personas import Persona, PersonaError


def add_doctor_parser(sub: Any) -> None:
    """Register `doctor` on the top-level subparsers."""
    doctor = sub.add_parser(
        "doctor",
        help="check the configuration: database, Redis, each persona's upstream, Tavus key, "
        "public URL, callback token (exit 1 when something configured is broken)",
    )
    doctor.add_argument(
        "--timeout",
        type=float,
        default=DOCTOR_TIMEOUT,
        help=f"seconds each network check may take (default: {DOCTOR_TIMEOUT:g})",
    )
    doctor.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print one line per check; 1 when any check failed, else 0."""
    from cvi_agent.runtime import load_checked_personas

    settings = Settings()
    checks: list[Check] = []
    personas: dict[str, Persona] = {}
    try:
        personas = load_checked_personas(settings)
        names = ", ".join(sorted(personas)) or "none"
        where = f"{len(personas)} in {settings.personas_dir}/"
        checks.append(Check("personas", "OK", f"{where}: {names}"))
    except PersonaError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid"
        checks.append(
            Check(
                "personas",
                "FAIL",
                first,
                f"fix the persona files in {settings.personas_dir} (CVI_PERSONAS_DIR); "
                "`cvi-agent personas validate` lists every problem",
            )
        )
    checks += asyncio.run(run_checks(settings, personas, args.timeout))
    for check in checks:
        print(check.line(), flush=True)
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    print(f"doctor: {failed} failed, {warned} warning(s), {len(checks) - failed - warned} OK")
    return 1 if failed else 0
