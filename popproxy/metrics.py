"""Prometheus metrics: an observer of session events, on an injected registry."""

from __future__ import annotations

from dataclasses import dataclass

from .confparse import HostPort, Section, parse_address

__all__ = ["MetricsConfig", "parse_metrics"]


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    address: HostPort | None = None  # None: no HTTP endpoint


def parse_metrics(raw: object) -> MetricsConfig:
    s = Section(raw, "metrics")
    address = s.get("address")
    cfg = MetricsConfig(parse_address(address, s.key("address")) if address is not None else None)
    s.finish()
    return cfg


class Metrics:
    """Placeholder until the metrics observer lands."""

    def __init__(self, registry: object) -> None:
        self.registry = registry

    def observe(self, info: object, event: object) -> None:
        return None


async def serve_metrics(config: MetricsConfig, metrics: Metrics, proxy: object,
                        *, task_status: object = None) -> None:
    raise NotImplementedError
