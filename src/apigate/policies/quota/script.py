"""One quota decision on Redis: read the period's count, refuse if the cost does not fit, else add it.

``KEYS = [the key's counter for this period]`` (its name holds the period's id, so a new period
starts a new counter); ``ARGV = [limit, cost, ttl_ms, left_ms]``: the counter expires ``ttl_ms``
from now (the period's end and a grace, relative like the other limits' expiry: ``now`` is the
gateway's clock, which need not be the Redis server's); ``left_ms`` is what remains of the period.
Answer, as the other limits' scripts: ``[admitted, remaining, reset_ms, retry_ms, delay_ms]``.
Counts are integers up to 10^12 plus a cost, exact in Lua's doubles and in INCRBY.
"""

from __future__ import annotations

from typing import Any, Final

from apigate.state.base import LocalData, Script

_LUA: Final = """
local limit, cost, left = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count + cost > limit then
    return {0, math.max(limit - count, 0), left, left, 0}
end
count = redis.call('INCRBY', KEYS[1], cost)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, limit - count, left, 0, 0}
"""


def _decide_locally(data: LocalData, keys: list[str], args: list[Any]) -> list[int]:
    limit, cost, ttl_ms, left = (int(a) for a in args)
    count = int(data.get(keys[0]) or 0)
    if count + cost > limit:
        return [0, max(limit - count, 0), left, left, 0]
    count += cost
    data.set(keys[0], count)
    data.expire(keys[0], ttl_ms / 1000)
    return [1, limit - count, left, 0, 0]


QUOTA_SCRIPT: Final = Script(lua=_LUA, python=_decide_locally)
