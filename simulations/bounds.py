"""Lower bounds on distribution time, to judge simulated times against.

F is the bytes every fetching node wants, N the number of fetching nodes, u_s the summed upload of the
nodes that hold the model at the start (seeds), u_i the upload of fetching node i (0 if it may not
serve) and d_min the smallest download among fetching nodes.

- Kumar & Ross (fluid; no piece granularity, latency or protocol):
  T_min = max(F / u_s, F / d_min, N * F / (u_s + sum u_i)).
- Client-server (fetching nodes never serve): T_cs = max(F / d_min, N * F / u_s).
- Mundinger, Weber & Weiss (M equal pieces, every upload equal to u, one seed):
  T* = (1 + floor(log2 N) / M) * F / u.
- Piece start-up (``startup_bound``; M equal pieces of P = F / M, every fetching node uploading u,
  seeds of any upload): a node uploads nothing before it holds a whole piece, and swarm moves each
  piece whole from one sender. A seed completes at most one delivery per P / min(u_seed, d), a
  fetching node one per P / min(u, d) from the moment it holds its first piece, so the k-th node to
  hold a piece holds it no sooner than t_k, the k-th delivery of the greedy schedule in which
  every holder sends whole pieces one after the other to nodes holding none. Every fetching
  node's F bytes are uploaded by someone, so the smallest T with
  u_s T + u sum_k (T - t_k)^+ >= N F is a lower bound, and so is max(that, F / u_s, F / d_min):
  Kumar & Ross without the upload that cannot be used during the start-up. Unlike Mundinger's
  formula it holds when the seed uploads faster than the fetching nodes.

The bounds are for the static population (every node present from t=0 to the end): with arrivals
and churn they describe the flash crowd of the same population, not the run.
"""

from __future__ import annotations

import heapq
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


def startup_bound(
    F: float, N: int, M: int, seed_uploads: list[float], u: float, d_min: float, fraction: float = 1.0
) -> float:
    """The piece start-up bound (module docstring): Kumar & Ross without the upload of nodes that
    do not hold a whole piece yet, for N fetching nodes uploading ``u`` each. With ``fraction``
    < 1: no schedule completes that share of the nodes sooner (``fraction * N * F`` bytes must be
    uploaded; 0.5: a bound on the median, the same way)."""
    if N == 0 or M == 0 or not seed_uploads:
        return 0.0
    P = F / M
    d = d_min if d_min < math.inf else math.inf
    # (time of a delivery's end, seconds between deliveries of its sender)
    heap = [(P / min(us, d), P / min(us, d)) for us in seed_uploads]
    heapq.heapify(heap)
    per_fetch = P / min(u, d)
    firsts = []
    while len(firsts) < N:
        t, gap = heapq.heappop(heap)
        firsts.append(t)
        heapq.heappush(heap, (t + gap, gap))  # the sender's next delivery
        heapq.heappush(heap, (t + per_fetch, per_fetch))  # the new holder's first
    u_s = sum(seed_uploads)

    def uploaded(T: float) -> float:
        return u_s * T + u * sum(T - t for t in firsts if t < T)

    lo, hi = 0.0, N * F / u_s + firsts[-1]
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if uploaded(mid) >= fraction * N * F else (mid, hi)
    return max(hi, F / u_s, F / d_min if d_min < math.inf else 0.0)


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
    fetch_ups = {g.upload for g in fetch}
    if N and len(fetch_ups) == 1 and all(g.serve for g in fetch) and seeds:
        seed_ups = [g.upload for g in seeds for _ in range(g.count)]
        out["T_startup"] = startup_bound(F, N, sc.manifest.num_pieces, seed_ups, next(iter(fetch_ups)), d_min)
    ups = {g.upload for g in fetch} | {g.upload for g in seeds}
    if len(ups) == 1 and sum(g.count for g in seeds) == 1 and N and all(g.serve for g in fetch):
        out["T_mundinger"] = mundinger(F, N, sc.manifest.num_pieces, ups.pop())
    return out


# ---------------------------------------------------------------- bounds for a run with churn
# The static bounds above describe the population present from t = 0 to the end. With sessions and
# departures a run is judged against the schedule it drew (the event log's arrive/depart rows):


def online_time_bound(intervals: list[tuple[float, float]], need: float) -> float:
    """Earliest time at which a node online during ``intervals`` (sorted (start, end) pairs, end
    ``inf`` for the last if it stayed) has been online for ``need`` seconds; ``inf`` if never. With
    ``need = F / d`` no schedule completes the node sooner: it receives nothing while offline."""
    acc = 0.0
    for start, end in intervals:
        if acc + (end - start) >= need:
            return start + (need - acc)
        acc += end - start
    return math.inf


def varying_capacity_bound(
    F: float, N: int, seed_upload: list[tuple[float, float]], fetch_upload: float, d_min: float
) -> float:
    """Kumar & Ross with a seed capacity that changes over time: the smallest T with
    int_0^T u_s(t) dt >= F (every byte leaves a seed once), int_0^T (u_s(t) + sum u_i) dt >= N F
    (every fetching node's bytes are uploaded by someone) and T >= F / d_min, where ``seed_upload``
    is a step function [(from_t, u_s), ...] (sorted, the last step lasting forever) and
    ``fetch_upload`` the summed upload of the fetching nodes (all present from t = 0)."""
    if N == 0:
        return 0.0

    def first_reaching(target: float, extra: float) -> float:
        acc = 0.0
        for k, (t0, u) in enumerate(seed_upload):
            t1 = seed_upload[k + 1][0] if k + 1 < len(seed_upload) else math.inf
            rate = u + extra
            if rate > 0 and acc + rate * (t1 - t0) >= target:
                return t0 + (target - acc) / rate
            acc += rate * (t1 - t0) if t1 < math.inf else 0.0
        return math.inf

    return max(first_reaching(F, 0.0), first_reaching(N * F, fetch_upload), F / d_min)
