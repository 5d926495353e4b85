"""The local cloud: a simulated spot market (market), instances as local process sandboxes run by a
per-instance hypervisor (host), booted by spawning the Agent (launcher), notice through a file.

Its store is the local directory store of `spotrun.clouds.store`.
"""

PROVIDER = "provider:LocalProvider"
NOTICE = "notice:LocalNotice"
