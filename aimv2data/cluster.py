"""Connecting to a Ray cluster for `fetch --distributor ray`, `shard --distributor ray` and
`caption generate --distributor ray`.

`--ray-address` is passed to `ray.init(address=...)`; without it, ray.init finds the cluster the way it
always does (RAY_ADDRESS, else a cluster started on this machine by `ray start`, else it starts a local
one). An address that does not answer fails in seconds with one line, not after Ray's own long wait.
"""
from __future__ import annotations

import socket

from aimv2data.environment import keep_signal_handlers


class ClusterError(RuntimeError):
    """Ray is missing or the cluster does not answer; the message says what to do."""


def connect_ray(address: str | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise ClusterError("--distributor ray needs the `ray` package: pip install 'ray[default]'") from None
    if ray.is_initialized():
        return
    if address and address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except (OSError, ValueError):
            raise ClusterError(f"--ray-address {address}: no Ray cluster answers there; start one (`ray start "
                               "--head`) or pass the head node's GCS address host:port") from None
    try:
        with keep_signal_handlers():   # ray.init's own SIGTERM handler would replace our exit 143
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClusterError(f"--ray-address {address or '(ray.init default)'}: cannot connect to Ray ({first[:200]})") \
            from None
