"""What a policy is: a typed config, a name, an order, the phases it uses and their hooks.

A policy subclasses ``Policy[ItsConfig]`` (``ItsConfig``, a ``PolicyConfig``, validates its
config; the class gets it as ``Config``) and states, on the class:

- ``name`` and ``order``;
- ``phases``: the phases whose hooks it defines (of request, body, response, response_body,
  log). ``register`` refuses a class whose ``phases`` and ``on_*`` methods disagree; the engine
  calls only the hooks of declared phases, so an unused phase costs nothing;
- ``needs``: the shared services it uses (``policies/services.py``); the process starts them
  before serving and hands every policy one ``PolicyServices``, ``self.services``; a policy that
  counts on a Redis of its own names it in ``state_urls``.

``self.config`` has the policy's own config type. ``prepare()`` runs once, when the policy is
built for a route: it turns the config into what the hooks read per request (sets, byte
strings, compiled checks), and may narrow ``phases`` and ``needs`` for this instance when its
config leaves a phase or a service unused (hmac-auth without ``validate_body``, jwt without
``check_revoked``). Nothing of this runs per request.

Phases, in the order a request meets them:

- ``on_request(exchange)``: after the route matched, before the upstream is chosen. Returns
  ``None`` to continue, a ``Reply`` to answer early (401, 429, a cached response...), or an
  awaitable of either when it must wait (a Redis decision, a JWKS fetch, a leaky-bucket
  delay). Answer from memory synchronously when you can: only an awaitable costs a task.
  ``async def`` works too, but then every request pays for a coroutine and a task.
- ``on_body(exchange, body)``: the whole request body, exactly as the client sent it (chunked
  framing removed). Declaring this phase makes the engine buffer the body, up to the policy's
  ``body_limit`` (larger bodies get 413, or with ``oversized_body = "stream"`` skip the body
  hooks and stream on unchanged, unless a request hook set ``exchange.body_must_fit``: that
  body is then refused with 413), once every ``on_request`` hook has passed; the others
  stream. Same return values as ``on_request``. A hook may replace ``exchange.body``: the
  upstream then receives the new bytes with a matching Content-Length.
- ``on_response(exchange)``: the upstream's status and headers arrived; edit
  ``exchange.response_headers`` before they are sent. Runs in reverse order. A gateway-made
  answer (an early answer, an error such as a 502 when the upstream cannot be reached) meets
  the same hooks. A class that sets ``replaces_responses`` may return a ``Reply`` instead of
  None: it replaces the response the hook sees, the upstream's (whose body is never sent: a
  response without one, a 304 or a HEAD's, ends and its connection is reused; the rest of a
  body is not read and that connection closes) or the gateway's own error. The hooks not yet
  run skip the replaced response and every hook then sees the replacement, as any gateway-made
  answer; an exchange's response is replaced once at most (a Reply returned later is ignored).
  ``exchange.failure`` is set when the gateway answers for an upstream it could not use
  (``connect_failed``, ``first_byte_timeout``...), and ``exchange.detached_copy(headers, state)``
  sends a copy of a GET to the upstream for no client (a refresh in the background): its
  response meets the hooks with ``state`` as its own.
- ``on_response_body(exchange)``: the response has a body and its head is final (every
  ``on_response`` hook ran); return a ``ResponseBodyFilter`` to see that body, or ``None`` to
  leave it alone: the choice is made per response (its content type, its size, the client's
  Accept-Encoding...). The engine never asks for a response without a body (to HEAD, 1xx, 204,
  304). A hook that returns a filter edits ``exchange.response_headers`` to match what the
  filter makes: it removes Content-Length when the length may change (the client then gets the
  body chunked, or delimited by the close for HTTP/1.0), sets Content-Encoding, adds to Vary.
  Runs in reverse order, as ``on_response`` does, and the body meets the filters in that order:
  the policy with the lowest ``order`` sees the body last (compression, after any transform).
  Gateway-made answers (``Reply``: an early answer, an error) get the same hooks, their body
  fed whole, with their Content-Type and Content-Length among the headers. A route without
  this phase pays nothing for it: its body goes to the client as it arrives. A hook whose filter
  holds the whole body before it writes (a JSON mapping) may set ``exchange.hold_head = True``:
  the head is then written with the filters' first output, or, when they held everything to the
  end, with the whole body and its exact Content-Length, so ``end()`` may still edit the head
  (its type, its ETag), and a filter that fails before anything went is a 502.

  A filter has ``feed(chunk) -> bytes`` (each piece of the body as it arrives, never empty;
  return what goes on now, ``b""`` to hold it) and ``end() -> bytes`` (the body is complete:
  return the rest). It keeps memory bounded: a filter that needs the whole body (a JSON
  mapping) buffers up to a limit of its own and past it gives up, returning what it held and
  then each chunk unchanged. ``end()`` is not called when the response is cut short (the
  upstream or the client went away): a filter that keeps what it saw (a cache) keeps it in
  ``end()``. A hook that raises is a failing policy (500: nothing was sent yet); a filter that
  raises cuts the response (its head went), or, for a gateway-made answer, lets that answer go
  unfiltered with the head it had before the hooks. The client's slowness reaches the upstream
  through the filters: what they return is written as it comes, and a full client socket
  pauses reading from the upstream.
- ``on_log(exchange)``: the exchange is finished (status, timings, bytes are known).

The engine calls what ``hook(phase)`` returns: the bound ``on_<phase>`` method, or the callable
``prepare()`` put in ``engine_hooks`` for that phase, which does the same work.

Compiled per-request paths (``policies/*/hotpath.py``). setup.py compiles the modules it lists
with mypyc, together with the engine; a policy puts a bound method of a hotpath class in
``engine_hooks``, so the engine calls C with no Python frame in between. A request hook may be
the instance itself, of a subclass of the engine's ``CompiledRequestHook`` whose ``run`` is the
hook: the engine then calls ``run`` as a native method, without a Python-level call. Such a module:

- imports only the engine's ``Exchange`` and ``CompiledRequestHook`` (``apigate.engine.exchange``),
  modules compiled with it (``apigate.consumers.keyindex``) and the standard library: no
  pydantic, no config model, nothing of ``policies`` outside its own package. It gets plain
  values (bytes, frozensets, dicts, callables) built by ``prepare()``;
- is fully annotated, and truly: mypyc checks annotations at run time, so a wrong one breaks
  only the compiled build (tests/test_compiled_engine.py runs one);
- uses of ``Exchange`` only what the engine keeps as native attributes of its compiled class (a
  read or write is a C struct access, not a dict lookup): ``headers`` (the request's list of
  lowercase name/value byte pairs; replace it, or edit it in place), ``response_headers``
  (the same, in the response phase), ``consumer``, ``tenant``, ``state`` (``None`` until a
  policy sets a dict), ``response_lines`` (header lines added to whatever response the request
  gets: append ``b"name: value\r\n"`` lines with ``+=``), ``query`` (the query string as
  sent, without ``?``), ``rewritten_path`` (the upstream path in normal form, replacing what
  the route would send) and the method ``vars()`` (that dict, made on first use); the
  request's ``method``, ``path``, ``raw_path``, ``client_ip``, ``rid``, ``params`` and ``route``,
  and the ``response_status``, may be read;
- hands anything unusual (a refusal, a miss, a service not running) back to a callable of the
  policy, so the policy's Python module stays the one place that makes answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Literal, Protocol, TypeVar, get_args

from pydantic import BaseModel, ConfigDict

from apigate.policies.services import NO_SERVICES, PolicyServices, ServiceName

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from apigate.engine.exchange import Exchange
    from apigate.engine.replies import Reply

Phase = Literal["request", "body", "response", "response_body", "log"]
HOOK_METHODS: Final[dict[Phase, str]] = {
    "request": "on_request",
    "body": "on_body",
    "response": "on_response",
    "response_body": "on_response_body",
    "log": "on_log",
}


class ResponseBodyFilter(Protocol):
    """What an ``on_response_body`` hook hands the engine: it sees the response body piece by
    piece and returns what the client gets instead (the module docstring is the contract)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class PolicyConfig(BaseModel):
    """Base for policy config models: unknown keys are errors, values are frozen once compiled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def requires_shared_state(self) -> str | None:
        """The field whose value needs a shared state backend (Redis in ``state.url``), or None;
        ``apigate check`` refuses the config at that field when ``state.url`` is memory://."""
        return None


ConfigT = TypeVar("ConfigT", bound=PolicyConfig)


class Policy(Generic[ConfigT]):
    """A policy as the gateway compiles it into routes (the module docstring is the contract)."""

    name: ClassVar[str]
    order: ClassVar[int]
    """Request hooks run in ascending order (auth ~1000, limits ~2000, transforms ~5000)."""
    Config: ClassVar[type[PolicyConfig]]
    """The model the config is validated with: the ``ConfigT`` of ``Policy[ConfigT]``."""
    phases: frozenset[Phase] = frozenset()
    """The phases whose ``on_*`` hooks the class defines; ``prepare()`` may drop some for an instance."""
    needs: frozenset[ServiceName] = frozenset()
    """Shared services the policy uses, e.g. {"consumers"}; ``prepare()`` may drop some for an instance."""
    state_urls: frozenset[str] = frozenset()
    """State backends of its own (Redis URLs) besides ``state.url``; the process opens them with the
    shared services, and the policy reaches them with ``self.services.state_at(url)``."""
    challenge: bytes | None = None
    """An authentication policy's WWW-Authenticate value for a missing credential (others: None)."""
    replaces_responses: ClassVar[bool] = False
    """``on_response`` may return a Reply that replaces the response it sees (see the phases above);
    only routes with such a policy pay for the engine looking at what response hooks return."""
    answers_preflights: ClassVar[bool] = False
    """Its request hook answers CORS preflights (``OPTIONS`` with ``Origin`` and
    ``Access-Control-Request-Method``). On a route that lists ``methods`` without ``OPTIONS``, the
    route then matches ``OPTIONS`` too, and ``only_preflights(allowed)`` is called before the route
    serves: the policy answers any other ``OPTIONS`` with 405 and ``Allow: <allowed>`` itself."""
    terminal: ClassVar[bool] = False
    """The policy always answers itself (a token endpoint, a webhook intake): its route needs no upstream."""
    shorthand: ClassVar[str | None] = None
    """The route key this policy also answers to (``rate_limit: 100/min``, ``auth: stripe_signature``,
    see ``ROUTE_SHORTHANDS``); ``expand_shorthand`` turns the key's value into the policy's config."""
    shorthand_forms: ClassVar[str] = ""
    """What the shorthand's values look like, for the error when no policy takes a value (``100/min``)."""
    body_limit: int = 1 << 20
    """Largest request body ``on_body`` accepts (a class sets it, or ``prepare()`` for an
    instance); the route's ``max_body_size`` may lower it."""
    oversized_body: Literal["refuse", "stream"] = "refuse"
    """What a body over ``body_limit`` gets: 413 (``refuse``), or (``stream``) it skips the body hooks
    and goes upstream unchanged, as it arrives; it streams only when every body policy of the
    route says ``stream``."""
    engine_hooks: Mapping[Phase, Callable[..., Any]] = MappingProxyType({})
    """Set by ``prepare()``: what the engine calls for a phase instead of ``on_<phase>``, doing the same
    work with a frame less (a hotpath.py method, usually)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" not in vars(cls):  # a class may still name it itself (``Config = ItsConfig``)
            for base in getattr(cls, "__orig_bases__", ()):
                for argument in get_args(base):
                    if isinstance(argument, type) and issubclass(argument, PolicyConfig):
                        cls.Config = argument

    def __init__(self, config: ConfigT, services: PolicyServices = NO_SERVICES, route: str = "") -> None:
        self.config = config
        self.services = services
        self.route = route
        """The name of the route this instance serves ("" when built alone): each route gets its own."""
        self.prepare()

    def prepare(self) -> None:
        """Build from ``self.config`` what the hooks read per request (runs once, when compiled)."""

    def only_preflights(self, allowed: bytes) -> None:
        """Answer ``OPTIONS`` requests other than preflights with 405 and ``Allow: allowed`` (a
        policy that sets ``answers_preflights``; see there)."""
        raise NotImplementedError(f"{self.name} answers preflights: it must refuse other OPTIONS")

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        """This policy's raw config for the route's ``shorthand: value``; None when ``value`` is not
        for this policy. A ValueError means it is, but cannot be honoured (a secret is unset, say):
        the shorthand is then reported inactive, and the log gives the error's message, which
        says what to set."""
        return None

    def hook(self, phase: Phase) -> Callable[..., Any]:
        """What the engine calls for ``phase`` (asked once, when the route is compiled)."""
        direct = self.engine_hooks.get(phase)
        hook: Callable[..., Any] = direct if direct is not None else getattr(self, HOOK_METHODS[phase])
        return hook

    # The hooks: a class defines those of the phases it declares, and only those.
    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        return None

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | Awaitable[Reply | None] | None:
        return None

    def on_response(self, exchange: Exchange) -> Reply | None:
        return None

    def on_response_body(self, exchange: Exchange) -> ResponseBodyFilter | None:
        return None

    def on_log(self, exchange: Exchange) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """What /routes shows of this policy; secrets stay masked."""
        return self.config.model_dump(mode="json")


def phase_mismatch(cls: type[Policy[Any]]) -> str | None:
    """How ``cls``'s declared ``phases`` and its ``on_*`` hooks disagree; None when they agree."""
    for phase, method in HOOK_METHODS.items():
        defined = getattr(cls, method) is not getattr(Policy, method)
        if phase in cls.phases and not defined:
            return f"declares the {phase!r} phase but defines no {method}"
        if defined and phase not in cls.phases:
            return f"defines {method} but does not declare the {phase!r} phase in `phases`"
    return None
