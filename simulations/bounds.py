"""Lower bounds on distribution time, to judge simulated times against.

F is the bytes every fetching node wants, N the number of fetching nodes, u_s the summed upload of the
nodes that hold the model at the start (seeds), u_i the upload of fetching node i (0 if it may not
serve) and d_min the smallest download among fetching nodes.

- Kumar & Ross (fluid; no piece granularity, latency or protocol):
  T_min = max(F / u_s, F / d_min, N * F / (u_s + sum u_i)).
- Client-server (fetching nodes never serve): T_cs = max(F / d_min, N * F / u_s).
- Mundinger, Weber & Weiss (M equal pieces, every upload equal to u, one seed):
  T* = (1 + floor(log2 N) / M) * F / u.

The bounds are for the static population (every node present from t=0 to the end): with arrivals
and churn they describe the flash crowd of the same population, not the run.
"""

from __future__ import annotations

import math
from typing import Any

from simulations.scenario import Scenario


def kumar_ross(F: float, N: int, u_s: float, uploads: list[float], d_min: float) -> float:
    if N == 0:
        return 0.0
    terms = [F / u_s, N * F / (u_s + sum(uploads))]
    if d_min < math.inf:
        terms.append(F / d_min)
    return max(terms)


def client_server(F: float, N: int, u_s: float, d_min: float) -> float:
    if N == 0:
        return 0.0
    return max(N * F / u_s, F / d_min if d_min < math.inf else 0.0)


def mundinger(F: float, N: int, M: int, u: float) -> float:
    if N == 0 or M == 0:
        return 0.0
    return (1 + math.floor(math.log2(max(N, 1))) / M) * F / u


def for_scenario(sc: Scenario) -> dict[str, Any]:
    """Every bound for the scenario's full population, with the inputs."""
    F = float(sc.file_bytes)
    seeds = [g for g in sc.groups if g.role == "seed"]
    fetch = [g for g in sc.groups if g.role == "fetch" and g.count]
    u_s = sum(g.upload * g.count for g in seeds)
    N = sum(g.count for g in fetch)
    uploads = [g.upload for g in fetch if g.serve for _ in range(g.count)]
    d_min = min((g.download for g in fetch), default=math.inf)
    t_kr = kumar_ross(F, N, u_s, uploads, d_min)
    t_cs = client_server(F, N, u_s, d_min)
    out: dict[str, Any] = {
        "F_bytes": F,
        "N": N,
        "M_pieces": sc.manifest.num_pieces,
        "u_s": u_s,
        "sum_u_i": sum(uploads),
        "d_min": d_min if d_min < math.inf else None,
        "T_min": t_kr,
        "T_client_server": t_cs,
        "T_min_terms": {
            "F/u_s": F / u_s,
            "F/d_min": F / d_min if d_min < math.inf else None,
            "N*F/(u_s+sum u_i)": N * F / (u_s + sum(uploads)) if N else None,
        },
    }
    ups = {g.upload for g in fetch} | {g.upload for g in seeds}
    if len(ups) == 1 and sum(g.count for g in seeds) == 1 and N and all(g.serve for g in fetch):
        out["T_mundinger"] = mundinger(F, N, sc.manifest.num_pieces, ups.pop())
    return out
