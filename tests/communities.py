"""Seeded random communities as scenario TOML text (tests and benchmarks)."""

from __future__ import annotations

import numpy as np


def random_community(
    n: int,
    seed: int,
    *,
    grid: bool = True,
    fee: float = 0.0,
    roles: bool = False,
    degree: int | None = None,
    pair_fees: int = 0,
    name: str = "test",
    admm: str = "",
) -> str:
    """A community of n households; `degree` gives sparse (ring + random) neighbour lists."""
    rng = np.random.default_rng(seed)
    lines = [f'[community]\nname = "{name}"', f"[market]\nmechanism = \"admm\"\nfee = {fee}"]
    if admm:
        lines.append(f"[market.admm]\n{admm}")
    if grid:
        lines.append("[grid]\nbuy_price = 0.30\nsell_price = 0.08")
    ids = [f"h{i:03d}" for i in range(n)]
    neighbours: dict[str, set[str]] = {pid: set() for pid in ids}
    if degree is not None:
        for i, pid in enumerate(ids):
            for step in range(1, degree // 2 + 1):
                other = ids[(i + step) % n]
                if other != pid:
                    neighbours[pid].add(other)
                    neighbours[other].add(pid)
            extra = ids[int(rng.integers(n))]
            if extra != pid and degree % 2:
                neighbours[pid].add(extra)
                neighbours[extra].add(pid)
    demands = rng.normal(0.0, 2.0, n)
    if not grid:  # a community on its own must be able to balance
        demands += 0.5 - demands.mean()  # short by 0.5 kWh a home on average: flex must cover it
    for i, pid in enumerate(ids):
        flex = float(rng.uniform(0.5, 3.0))
        lines.append("[[peers]]")
        lines.append(f'id = "{pid}"\ndemand = {demands[i]:.4f}\nflex = {flex:.4f}')
        lines.append(f"flex_cost = {rng.uniform(0.02, 0.4):.4f}")
        if roles and demands[i] > 1.0:
            lines.append('role = "buyer"')
        elif roles and demands[i] < -1.0:
            lines.append('role = "seller"')
        if degree is not None:
            lines.append("neighbors = [" + ", ".join(f'"{o}"' for o in sorted(neighbours[pid])) + "]")
    for _ in range(pair_fees):
        a = ids[int(rng.integers(n))]
        candidates = sorted(neighbours[a]) if degree is not None else [o for o in ids if o != a]
        b = candidates[int(rng.integers(len(candidates)))]
        lines.append(f'[[fees]]\na = "{a}"\nb = "{b}"\nfee = {rng.uniform(0.0, 0.05):.4f}')
    return "\n".join(lines) + "\n"


def without_peer(text: str, gone: str) -> str:
    """The community ``text`` with peer ``gone`` removed, also from every neighbour list:
    the reference for a market that cleared after excluding it."""
    kept = "\n[[peers]]".join(part for part in text.split("\n[[peers]]") if f'id = "{gone}"' not in part)
    return kept.replace(f'"{gone}", ', "").replace(f', "{gone}"', "").replace(f'"{gone}"', "")
