"""Scenario parsing basics and the random distributions a scenario draws from: lifetimes and
per-host delays (``Dist``) and arrival processes (``Arrival``). Split from ``scenario.py`` so that
module holds the scenario's structure; every name here is re-exported there."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import attrs

from simulations import units


class ScenarioError(ValueError):
    pass


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ScenarioError(
            f"{where}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})"
        )


def _table(v: object, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ScenarioError(f"{where}: expected a table, got {v!r}")
    return v


# --------------------------------------------------------------------------- distributions


@attrs.frozen
class Dist:
    """A non-negative random duration: forever, fixed, exponential, weibull, lognormal, uniform."""

    kind: str
    a: float = 0.0  # fixed: value; exponential: mean; weibull: k; lognormal: mu; uniform: low
    b: float = 0.0  # weibull: scale; lognormal: sigma; uniform: high

    def sample(self, rng: random.Random) -> float:
        k = self.kind
        if k == "forever":
            return math.inf
        if k == "fixed":
            return self.a
        if k == "exponential":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        if k == "weibull":
            return rng.weibullvariate(self.b, self.a)
        if k == "lognormal":
            return rng.lognormvariate(self.a, self.b)
        if k == "uniform":
            return rng.uniform(self.a, self.b)
        raise AssertionError(k)

    @property
    def mean(self) -> float:
        k = self.kind
        if k == "forever":
            return math.inf
        if k in ("fixed", "exponential"):
            return self.a
        if k == "weibull":
            return self.b * math.gamma(1 + 1 / self.a)
        if k == "lognormal":
            return math.exp(self.a + self.b**2 / 2)
        return (self.a + self.b) / 2

    @staticmethod
    def parse(v: object, where: str) -> Dist:
        if isinstance(v, int | float | str) and not isinstance(v, bool):
            if v in ("forever", "inf"):
                return Dist("forever")
            return Dist("fixed", units.duration(v, where))
        d = _table(v, where)
        kind = d.get("dist")
        D = units.duration
        if kind == "forever":
            _check_keys(d, {"dist"}, where)
            return Dist("forever")
        if kind == "fixed":
            _check_keys(d, {"dist", "value"}, where)
            return Dist("fixed", D(d["value"], where))
        if kind == "exponential":
            _check_keys(d, {"dist", "mean"}, where)
            return Dist("exponential", D(d["mean"], where))
        if kind == "weibull":
            _check_keys(d, {"dist", "k", "scale", "mean"}, where)
            k = float(d["k"])
            if k <= 0:
                raise ScenarioError(f"{where}: weibull k must be > 0")
            if ("scale" in d) == ("mean" in d):
                raise ScenarioError(f"{where}: weibull needs exactly one of scale, mean")
            scale = D(d["scale"], where) if "scale" in d else D(d["mean"], where) / math.gamma(1 + 1 / k)
            return Dist("weibull", k, scale)
        if kind == "lognormal":
            _check_keys(d, {"dist", "mu", "median", "sigma"}, where)
            if ("mu" in d) == ("median" in d):
                raise ScenarioError(f"{where}: lognormal needs exactly one of mu, median")
            mu = float(d["mu"]) if "mu" in d else math.log(D(d["median"], where))
            return Dist("lognormal", mu, float(d["sigma"]))
        if kind == "uniform":
            _check_keys(d, {"dist", "low", "high"}, where)
            lo, hi = D(d["low"], where), D(d["high"], where)
            if hi < lo:
                raise ScenarioError(f"{where}: uniform high < low")
            return Dist("uniform", lo, hi)
        raise ScenarioError(
            f"{where}: dist must be forever, fixed, exponential, weibull, lognormal or uniform, got {kind!r}"
        )


# --------------------------------------------------------------------------- arrivals


@attrs.frozen
class Arrival:
    """When the nodes of a group first come online: flash crowd, Poisson, or scheduled times."""

    process: str
    at: float = 0.0
    spread: float = 0.0
    rate: float = 0.0
    times: tuple[float, ...] = ()
    every: float = 0.0

    def times_for(self, count: int, rng: random.Random) -> list[float]:
        if self.process == "flash":
            if self.spread > 0:
                return sorted(self.at + rng.uniform(0, self.spread) for _ in range(count))
            return [self.at] * count
        if self.process == "poisson":
            t, out = self.at, []
            for _ in range(count):
                t += rng.expovariate(self.rate)
                out.append(t)
            return out
        if self.times:
            return [self.times[i % len(self.times)] for i in range(count)]
        return [self.at + i * self.every for i in range(count)]

    @staticmethod
    def parse(v: object, where: str) -> Arrival:
        d = _table(v, where)
        p = d.get("process")
        D = units.duration
        if p == "flash":
            _check_keys(d, {"process", "at", "spread"}, where)
            return Arrival("flash", at=D(d.get("at", 0), where), spread=D(d.get("spread", 0), where))
        if p == "poisson":
            _check_keys(d, {"process", "start", "rate", "mean_gap"}, where)
            if ("rate" in d) == ("mean_gap" in d):
                raise ScenarioError(f"{where}: poisson needs exactly one of rate (per s), mean_gap")
            rate = float(d["rate"]) if "rate" in d else 1.0 / D(d["mean_gap"], where)
            if rate <= 0:
                raise ScenarioError(f"{where}: poisson rate must be > 0")
            return Arrival("poisson", at=D(d.get("start", 0), where), rate=rate)
        if p == "scheduled":
            _check_keys(d, {"process", "times", "at", "every"}, where)
            if "times" in d:
                times = tuple(sorted(D(t, where) for t in d["times"]))
                if not times:
                    raise ScenarioError(f"{where}: times is empty")
                return Arrival("scheduled", times=times)
            return Arrival("scheduled", at=D(d.get("at", 0), where), every=D(d.get("every", 0), where))
        raise ScenarioError(f"{where}: process must be flash, poisson or scheduled, got {p!r}")


# --------------------------------------------------------------------------- groups, events
