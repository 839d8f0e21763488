"""Sans-IO cores of wattmesh: wire envelope, identities, scenarios, market mechanisms.

Nothing here opens a socket, reads a clock or draws a global random number; time and
randomness are arguments. The asyncio/MQTT shell lives in ``wattmesh.peer``.
"""
