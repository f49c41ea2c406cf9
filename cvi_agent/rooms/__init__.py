"""Rooms: where the bot meets the replica. One `Room` protocol (`rooms.base`), one module per
transport: `rooms.daily` (daily-python, real calls) and `rooms.local` (loopback websockets, with
its server in `rooms.local_server`). Import the transport you use: this package re-exports
nothing, so importing it never loads Daily's native library."""
