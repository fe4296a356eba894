"""A plugin (``plugins:``) that stops the limits' clock at ``LIMITS_FROZEN_NOW`` (seconds since the
epoch), so that gateway processes started by a test decide at a time the test chose."""

from __future__ import annotations

import os

from apigate.policies.limits import clock

_NOW = int(float(os.environ["LIMITS_FROZEN_NOW"]) * 1e9)
clock.use(lambda: _NOW)
