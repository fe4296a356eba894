"""The counting policies' per-request work on in-process counters (compiled with the engine).

A request from memory costs a key, a clock read and one dict probe per limit: no task, no
awaitable. A request decided on Redis by one limit costs one queued script call and one future,
settled here when its reply is read (``settle``): no task, no coroutine. Anything else (several
limits on Redis, a refusal's reply, a leaky bucket's wait, an outage) goes to callables of the
policy, which stays the one place that makes answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import i64

from apigate.engine.exchange import CompiledRequestHook, Exchange
from apigate.policies.limits.algorithms import Algorithm, MemoryCounters
from apigate.policies.limits.keys import KeyBuilder

NO_TIERS: Final = 0
TIER_GROUP: Final = 1
TIER_TENANT: Final = 2
TIER_PART: Final = 3  # a claim or a header, read as a key part
# A counter's keys under its hash tag (the tag is the rule's tag prefix plus the request's key).
COUNTER_KEYS: Final = ("rl", "rl-seq")
# The digits of 0-999, alone and as the last three digits of a larger number: a remaining count
# is written from these (and its thousands, kept per rule) instead of being formatted per request.
DIGITS: Final[tuple[bytes, ...]] = tuple(b"%d" % n for n in range(1000))
LAST_DIGITS: Final[tuple[bytes, ...]] = tuple(b"%03d" % n for n in range(1000))


class Rule:
    """One limit as a request meets it: its algorithm, its counters here, its fields' fixed parts."""

    def __init__(
        self,
        label: str,
        algorithm: Algorithm,
        counters: MemoryCounters,
        window_s: int,
        tag_prefix: str,
        script: Any,
    ) -> None:
        self.label = label
        self.algorithm = algorithm
        self.counters = counters
        self.tag_prefix = tag_prefix  # + the request's key: the hash tag of its counter on Redis
        self.script = script  # its Lua script, when one round trip decides it (None: the policy's path)
        # The script's arguments after the clock, as the bytes that go to Redis (set by the Limiter,
        # which knows the cost): packed per request without formatting a number.
        self.fixed_args: list[bytes] = []
        self.quoted = b'"' + label.encode() + b'"'
        self.policy_item = self.quoted + b";q=%d;w=%d" % (algorithm.capacity(), window_s)
        self.limit_lines = b"x-ratelimit-limit: %d\r\nx-ratelimit-remaining: " % algorithm.capacity()
        self.limit_lines_after = b"\r\n" + self.limit_lines  # after the IETF fields
        self.window_line = b"x-ratelimit-window: %d\r\n" % window_s
        self.ietf_head = b""  # set by its RuleSet: RateLimit-Policy names every limit of the set
        # The seconds until reset last written (they change about once a second), in the pieces
        # that follow the remaining count: ";t=" and the lines after it when both families are
        # sent, ";t=" alone (IETF only), the x-ratelimit-reset line (x-ratelimit only, and last).
        self.reset_seconds: i64 = -1
        self.reset_both = b""
        self.reset_ietf = b""
        self.reset_x = b""
        # The thousands of the remaining count last written above 999, as digits.
        self.thousands: i64 = -1
        self.thousands_digits = b""

    def reset_in(self, seconds: i64) -> None:
        """Make the reset pieces say ``seconds``, if they say another number."""
        if seconds != self.reset_seconds:
            self.reset_seconds = seconds
            digits = b"%d" % int(seconds)
            self.reset_both = b";t=" + digits + self.limit_lines_after
            self.reset_ietf = b";t=" + digits + b"\r\n"
            self.reset_x = b"\r\nx-ratelimit-reset: " + digits + b"\r\n"


class RuleSet:
    """The limits that apply together (the policy's, or one plan's)."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        policy = b", ".join(rule.policy_item for rule in rules)
        for rule in rules:
            rule.ietf_head = b"ratelimit-policy: " + policy + b"\r\nratelimit: " + rule.quoted + b";r="


class Limiter(CompiledRequestHook):
    def __init__(
        self,
        keys: KeyBuilder,
        fallback: KeyBuilder,
        rules: RuleSet,
        cost: int,
        families: frozenset[str],
        clock: Callable[[], int],
        backend: Callable[[], Any],
        remote: Callable[[Exchange, RuleSet, str], Any],
        refuse: Callable[[Exchange, int], Any],
        wait: Callable[[int], Any],
        unanswered: Callable[[Exchange, Any], Any],
        answered_again: Callable[[], None],
    ) -> None:
        """``backend()``: the shared state backend the limits count on, or None to count here."""
        self.keys = keys
        self.fallback = fallback
        self.rules = rules
        self.cost: i64 = cost
        self.ietf = "ietf" in families
        self.x_ratelimit = "x-ratelimit" in families
        self.window = "window" in families
        self.token_bucket = "token-bucket" in families
        self.report = bool(families)
        self.clock = clock
        self.backend = backend
        self.asked = False  # the backend is asked on first use: the state backend runs by then
        self.state: Any = None
        self.remote = remote
        self.refuse = refuse
        self.wait = wait
        self.unanswered = unanswered
        self.answered_again = answered_again
        self.outage = False  # the state backend has not answered since its failure was logged
        self.fix_args(rules)
        self.tier_kind = NO_TIERS
        self.tier_part: KeyBuilder | None = None
        self.plans: dict[str, RuleSet] = {}
        self.default_plan: RuleSet | None = None

    def use_tiers(
        self, kind: int, part: KeyBuilder | None, plans: dict[str, RuleSet], default: RuleSet | None
    ) -> None:
        self.tier_kind = kind
        self.tier_part = part
        self.plans = plans
        self.default_plan = default
        for rules in plans.values():
            self.fix_args(rules)

    def fix_args(self, rules: RuleSet) -> None:
        """Give each rule its script's arguments after the clock: limit, window, burst, max delay, cost."""
        for rule in rules.rules:
            a = rule.algorithm
            numbers = [a.limit, a.window_ms, a.burst, a.max_delay_ms, self.cost]
            rule.fixed_args = [b"%d" % int(number) for number in numbers]

    # -- the request phase -----------------------------------------------------------------------
    def run(self, exchange: Exchange) -> Any:
        rules = self.rules if self.tier_kind == NO_TIERS else self.plan_of(exchange)
        if not rules.rules:
            return None
        key = self.key_of(exchange)
        if not self.asked:
            self.state = self.backend()
            self.asked = True
        state = self.state
        if state is not None:
            if len(rules.rules) == 1:
                rule = rules.rules[0]
                if rule.script is not None:
                    args: list[Any] = [self.clock() // 1_000_000]
                    args.extend(rule.fixed_args)
                    return state.decide(
                        rule.script, rule.tag_prefix + key, COUNTER_KEYS, args, Settle(self, exchange, rule)
                    )
            return self.remote(exchange, rules, key)
        now: i64 = self.clock() // 1_000_000
        cost = self.cost
        tightest: Rule | None = None
        remaining: i64 = 0
        reset_ms: i64 = 0
        delay_ms: i64 = 0
        for rule in rules.rules:
            if not rule.counters.take(key, now, cost):
                refused = rule.algorithm
                if self.report:
                    self.add_lines(exchange, rule, refused.remaining, refused.reset_ms)
                return self.refuse(exchange, refused.retry_ms)
            algorithm = rule.algorithm
            if tightest is None or algorithm.remaining < remaining:
                tightest = rule
                remaining = algorithm.remaining
                reset_ms = algorithm.reset_ms
            if algorithm.delay_ms > delay_ms:
                delay_ms = algorithm.delay_ms
        if self.report and tightest is not None:
            self.add_lines(exchange, tightest, remaining, reset_ms)
        if delay_ms > 0:
            return self.wait(delay_ms)
        return None

    def settle(self, exchange: Exchange, rule: Rule, reply: Any) -> Any:
        """The answer to a request from its limit's reply on Redis, or from its failure."""
        if type(reply) is not list:  # a StateUnavailable: the policy's on_redis_error decides
            return self.unanswered(exchange, reply)
        if self.outage:
            self.answered_again()
        if self.report:
            self.add_lines(exchange, rule, reply[1], reply[2])
        if not reply[0]:
            return self.refuse(exchange, reply[3])
        return None

    def key_of(self, exchange: Exchange) -> str:
        """Whose counter: the key, or the fallback key when a part is missing, or at last the IP."""
        key = self.keys.build(exchange)
        if key is None:
            key = self.fallback.build(exchange)
            if key is None:
                key = exchange.client_ip
        return key

    def plan_of(self, exchange: Exchange) -> RuleSet:
        plans = self.plans
        kind = self.tier_kind
        if kind == TIER_GROUP:
            consumer: Any = exchange.consumer
            if consumer is not None:
                for group in consumer.groups:
                    found = plans.get(group)
                    if found is not None:
                        return found
        else:
            name: str | None = None
            if kind == TIER_TENANT:
                name = exchange.tenant
            elif self.tier_part is not None:
                name = self.tier_part.build(exchange)
            if name is not None:
                found = plans.get(name)
                if found is not None:
                    return found
        default = self.default_plan
        return default if default is not None else self.rules

    def add_lines(self, exchange: Exchange, rule: Rule, remaining: i64, reset_ms: i64) -> None:
        """Add the rate-limit fields for ``remaining`` of ``rule`` to the response, as header lines.

        Built as one bytes with the lines already there; the engine adds it to the head as one piece.
        """
        # One format, which mypyc compiles to a single sized copy of the pieces (a join of a tuple
        # costs the buffer protocol per piece, a chain of ``+`` a copy per step), each piece a few
        # instructions: the remaining count goes in as its thousands and its last three digits,
        # what follows it as the rule's pieces for the reset seconds.
        if 0 <= remaining < 1000:
            high = b""
            low = DIGITS[remaining]
        elif remaining > 0:
            thousands = remaining // 1000
            if thousands != rule.thousands:
                rule.thousands = thousands
                rule.thousands_digits = b"%d" % int(thousands)
            high = rule.thousands_digits
            low = LAST_DIGITS[remaining % 1000]
        else:  # not from the algorithms (their counts are never negative): written as given
            high = b"%d" % int(remaining)
            low = b""
        rule.reset_in(-(-reset_ms // 1000))
        added = exchange.response_lines
        if self.ietf and self.x_ratelimit:  # the default
            lines = b"%s%s%s%s%s%s%s%s" % (
                added,
                rule.ietf_head,
                high,
                low,
                rule.reset_both,
                high,
                low,
                rule.reset_x,
            )
        elif self.ietf:
            lines = b"%s%s%s%s%s" % (added, rule.ietf_head, high, low, rule.reset_ietf)
        elif self.x_ratelimit:
            lines = b"%s%s%s%s%s" % (added, rule.limit_lines, high, low, rule.reset_x)
        else:
            lines = added
        if self.window:
            lines += rule.window_line
        if self.token_bucket:
            lines += b"x-tokenbucket-remaining: %s%s\r\n" % (high, low)
        exchange.response_lines = lines


class Settle:
    """What a Redis reply is waited for with: it makes the reply the request's answer."""

    def __init__(self, limiter: Limiter, exchange: Exchange, rule: Rule) -> None:
        self.limiter = limiter
        self.exchange = exchange
        self.rule = rule

    def __call__(self, reply: Any) -> Any:
        return self.limiter.settle(self.exchange, self.rule, reply)
