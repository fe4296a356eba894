"""Upstream health: active checks."""

from apigate.health.active import ActiveChecker, CheckSettings, ProbeTarget, TargetHealth

__all__ = ["ActiveChecker", "CheckSettings", "ProbeTarget", "TargetHealth"]
