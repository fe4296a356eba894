"""The algorithms of ``algorithms.py`` as state-backend Scripts: Lua on Redis, the same step in Python.

One decision is one script call: atomic on the Redis server, one round trip (shared with the
other decisions of the same loop turn, which the Redis backend pipelines). The Lua mirrors the
Python step line by line, in integer milliseconds; Lua numbers are doubles, so division goes
through ``idiv``, which corrects the rounding of ``a / b`` for large ``a``, and numbers are
written back with ``%d`` (Redis would format them with ``%.14g``). Windows set their expiry once,
with their first request (it is the same instant for every later one). Expiry is relative (PEXPIRE):
``now`` is the gateway's clock, which need not be the Redis server's; a bucket is kept a window
longer than it takes to fill or drain, so a server clock that runs ahead never drops live state.

Call: ``KEYS = [state key, sequence key]`` (the sequence key only for the sliding log; give the
two one hash tag so they share a slot on Redis Cluster), ``ARGV = [now_ms, limit, window_ms,
burst, max_delay_ms, cost]``. Answer: ``[admitted, remaining, reset_ms, retry_ms, delay_ms]``.
Each script also has a batch form, which the Redis backend uses for the decisions of one loop
turn on one server: the same two keys and six numbers per call, one after another, and a list of
their answers. It reads each counter's hash once and writes it once, at its end, so a busy
counter's decisions in one turn cost Redis one read and one write between them; tests check that
a batch leaves the answers and counters that its calls one by one would.
"""

from __future__ import annotations

from typing import Any, Final

from apigate.policies.limits.algorithms import ALGORITHMS
from apigate.state.base import LocalData, Script

_HELPERS: Final = """
local function idiv(a, b)
    local q = math.floor(a / b)
    local r = a - q * b
    if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
    return q
end
local function cdiv(a, b) return -idiv(-a, b) end
local function int(x) return string.format('%d', x) end
local function until_empty(counted, previous, start, window, now)
    if counted > 0 then return start + 2 * window - now end
    if previous > 0 then return start + window - now end
    return 0
end
"""
# How an algorithm reads and writes its hash (the sliding log, a sorted set, calls Redis itself).
# One call alone: straight to Redis.
_CALL_IO: Final = """
local function hmget(key, a, b, c)
    if c then return redis.call('HMGET', key, a, b, c) end
    return redis.call('HMGET', key, a, b)
end
local function hset(key, a, x, b, y, c, z)
    if c then return redis.call('HSET', key, a, int(x), b, int(y), c, int(z)) end
    redis.call('HSET', key, a, int(x), b, int(y))
end
local function pexpire(key, ms) redis.call('PEXPIRE', key, int(ms)) end
"""
# A batch reads each hash once and writes it once, at its end: its decisions on one counter (a
# busy client's) run in turn on the fields in hand. Nothing else runs on the server meanwhile, so
# the hash ends as the calls one by one would leave it. Each algorithm asks for the same fields.
_BATCH_IO: Final = """
local fields_of, written, expiry = {}, {}, {}
local function hmget(key, a, b, c)
    local fields = fields_of[key]
    if fields == nil then
        local values
        if c then values = redis.call('HMGET', key, a, b, c) else values = redis.call('HMGET', key, a, b) end
        fields = {[a] = values[1], [b] = values[2]}
        if c then fields[c] = values[3] end
        fields_of[key] = fields
    end
    return {fields[a], fields[b], c and fields[c]}
end
local function hset(key, a, x, b, y, c, z)
    local fields = fields_of[key]
    fields[a], fields[b] = x, y
    if c then fields[c] = z end
    written[key] = true
end
local function pexpire(key, ms) expiry[key] = ms end
local function write_back()
    for key in pairs(written) do
        local args = {}
        for name, value in pairs(fields_of[key]) do
            if value then
                args[#args + 1] = name
                args[#args + 1] = int(value)
            end
        end
        redis.call('HSET', key, unpack(args))
    end
    for key, ms in pairs(expiry) do redis.call('PEXPIRE', key, int(ms)) end
end
"""
# Each algorithm is one function of a call's keys and numbers: called once by the script's own
# form, and once per call by its batch form.
_SIGNATURE: Final = "local function decide(key, seq_key, now, limit, window, burst, max_delay, cost)\n"
_SINGLE: Final = """
return decide(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
              tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
"""
_BATCH: Final = """
local answers = {}
for n = 0, #KEYS / 2 - 1 do
    local k, a = 2 * n, 6 * n
    local ok, answer = pcall(decide, KEYS[k + 1], KEYS[k + 2], tonumber(ARGV[a + 1]),
                             tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
                             tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]))
    if ok then answers[n + 1] = answer else answers[n + 1] = redis.error_reply(tostring(answer)) end
end
write_back()
return answers
"""

_FIXED_WINDOW: Final = """
local index = idiv(now, window)
local e = (index + 1) * window
local s = hmget(key, 'i', 'c')
local count = 0
if tonumber(s[1]) == index then count = tonumber(s[2]) end
if count + cost > limit then
    return {0, math.max(limit - count, 0), e - now, e - now, 0}
end
hset(key, 'i', index, 'c', count + cost)
if tonumber(s[1]) ~= index then  -- the window's expiry was set by its first request
    pexpire(key, e - now)
end
return {1, limit - count - cost, e - now, 0, 0}
"""

_SLIDING_WINDOW: Final = """
local index = idiv(now, window)
local start = index * window
local s = hmget(key, 'i', 'c', 'p')
local i = tonumber(s[1])
local current, previous = 0, 0
if i == index then
    current, previous = tonumber(s[2]), tonumber(s[3])
elseif i == index - 1 then
    previous = tonumber(s[2])
end
local left = window - (now - start)
local weighted = previous * left + current * window
if weighted + cost * window > limit * window then
    local elapsed = now - start
    local room = limit - current - cost
    local retry
    if room >= 0 and previous > 0 then
        retry = math.max(window - idiv(room * window, previous) - elapsed, 1)
    else
        local to_next = window - elapsed
        room = limit - cost
        if current <= 0 or room >= current then
            retry = to_next
        elseif room < 0 then
            retry = to_next + window
        else
            retry = to_next + window - idiv(room * window, current)
        end
    end
    local reset = until_empty(current, previous, start, window, now)
    return {0, math.max(idiv(limit * window - weighted, window), 0), reset, retry, 0}
end
hset(key, 'i', index, 'c', current + cost, 'p', previous)
if i ~= index then  -- the window's expiry was set by its first request
    pexpire(key, start + 2 * window - now)
end
local reset = until_empty(current + cost, previous, start, window, now)
return {1, idiv(limit * window - weighted - cost * window, window), reset, 0, 0}
"""

_SLIDING_LOG: Final = """
redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - window))
local count = redis.call('ZCARD', key)
if count + cost > limit then
    local must = count + cost - limit
    local retry = window
    if must <= count then
        local oldest = redis.call('ZRANGE', key, must - 1, must - 1, 'WITHSCORES')
        retry = tonumber(oldest[2]) + window - now
    end
    local reset = 0
    if count > 0 then
        local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
        reset = tonumber(newest[2]) + window - now
    end
    return {0, math.max(limit - count, 0), reset, retry, 0}
end
local seq = redis.call('INCRBY', seq_key, cost)
for n = 1, cost do
    redis.call('ZADD', key, int(now), int(seq - cost + n))
end
redis.call('PEXPIRE', key, int(window))
redis.call('PEXPIRE', seq_key, int(window))
return {1, limit - count - cost, window, 0, 0}
"""

_TOKEN_BUCKET: Final = """
local full = burst * window
local s = hmget(key, 't', 'l')
local tokens, last = full, now
if s[1] then
    tokens, last = tonumber(s[1]), tonumber(s[2])
    local elapsed = now - last
    if elapsed > 0 then
        tokens = math.min(full, tokens + math.min(elapsed, idiv(full, limit) + 1) * limit)
        last = now
    end
end
local need = cost * window
local admitted, retry = 0, 0
if need > tokens then
    if need <= full then retry = cdiv(need - tokens, limit) else retry = window * burst end
else
    tokens = tokens - need
    admitted = 1
end
local reset = cdiv(full - tokens, limit)
hset(key, 't', tokens, 'l', last)
pexpire(key, reset + window)
return {admitted, idiv(tokens, window), reset, retry, 0}
"""

_LEAKY_BUCKET: Final = """
local s = hmget(key, 'v', 'l')
local level, last = 0, now
if s[1] then
    level, last = tonumber(s[1]), tonumber(s[2])
    local elapsed = now - last
    if elapsed > 0 then
        level = math.max(0, level - elapsed * limit)
        last = now
    end
end
local wait = cdiv(level, limit)
local capacity = 1 + idiv(max_delay * limit, window)
local admitted, remaining, retry, delay = 0, 0, 0, 0
if wait > max_delay then
    retry = cdiv(level - max_delay * limit, limit)
else
    level = level + cost * window
    admitted, delay = 1, wait
    remaining = math.max(capacity - cdiv(level, window), 0)
end
local reset = cdiv(level, limit)
hset(key, 'v', level, 'l', last)
pexpire(key, reset + window)
return {admitted, remaining, reset, retry, delay}
"""

_LUA: Final = {
    "fixed_window": _FIXED_WINDOW,
    "sliding_window": _SLIDING_WINDOW,
    "sliding_log": _SLIDING_LOG,
    "token_bucket": _TOKEN_BUCKET,
    "leaky_bucket": _LEAKY_BUCKET,
}


def _step_locally(name: str) -> Any:
    algorithm_class = ALGORITHMS[name]

    def run(data: LocalData, keys: list[str], args: list[Any]) -> list[int]:
        now, limit, window, burst, max_delay, cost = (int(a) for a in args)
        algorithm = algorithm_class(limit, window, burst, max_delay)
        state = data.get(keys[0])
        if state is not None and state.expires <= now:
            state = None
        kept = algorithm.step(state.copy() if state is not None else None, now, cost)
        data.set(keys[0], kept)
        data.expire(keys[0], max(kept.expires - now, 1) / 1000)
        return decision(algorithm)

    return run


def decision(algorithm: Any) -> list[int]:
    """A decision as both halves of a script answer it."""
    return [
        int(algorithm.admitted),
        algorithm.remaining,
        algorithm.reset_ms,
        algorithm.retry_ms,
        algorithm.delay_ms,
    ]


def _script(name: str, body: str) -> Script:
    function = _SIGNATURE + "if burst <= 0 then burst = limit end\n" + body + "end\n"
    return Script(
        lua=_HELPERS + _CALL_IO + function + _SINGLE,
        python=_step_locally(name),
        batch_lua=_HELPERS + _BATCH_IO + function + _BATCH,
    )


SCRIPTS: Final[dict[str, Script]] = {name: _script(name, lua) for name, lua in _LUA.items()}
