"""Loopback stand-ins for services we cannot reach offline; used by tests, bench and simulate.

Each speaks the documented wire format of the real service at its edge, nothing more.
"""
