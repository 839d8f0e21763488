"""A peer OS process: reads its job(s) as JSON on stdin, runs them, exits.

``python -m wattmesh.peer.worker`` is what ``wattmesh run`` starts, once per peer, or
once per K peers with ``--peers-per-process K`` (packed mode). Packed peers share
nothing but the event loop: each has its own key, connection, core and sequence file.
Private parameters arrive on stdin, never on the command line or on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from wattmesh.peer.market import PeerJob, run_peer

__all__ = ["main"]


async def _run_all(jobs: list[PeerJob]) -> int:
    results = await asyncio.gather(*(run_peer(job) for job in jobs), return_exceptions=True)
    status = 0
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            logging.getLogger(__name__).error("%s: %s: %s", job.spec.id, type(result).__name__, result)
            status = 1
        elif "reason" in result:
            status = 1
    return status


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    jobs = [PeerJob.from_dict(d) for d in json.load(sys.stdin)]
    return asyncio.run(_run_all(jobs))


if __name__ == "__main__":
    sys.exit(main())
