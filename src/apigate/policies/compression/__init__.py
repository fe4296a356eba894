"""The `compression` policy: response bodies compressed for the clients that accept it.

gzip (zlib) always; brotli (``br``) and zstd when their packages are installed (the
``compression`` extra). The body streams through the codec's compressor as it arrives (the
engine's response_body phase), so a large response costs the compressor's window, not its size.

Compressed only when it is safe and useful: the client accepts the coding (Accept-Encoding, with
weights), the upstream did not encode the body already, the content type is listed, the size is
not known to be below ``min_size``, and nothing forbids it (``Cache-Control: no-transform``, a
partial response: 206 or Content-Range). HEAD, 204 and 304 have no body: the engine does not ask.
Server-sent events (``text/event-stream``) are never compressed, since a compressor holds bytes
back and each event must arrive as it is sent. A response whose encoding depends on the client's
Accept-Encoding says so in Vary.
"""

from __future__ import annotations

import importlib
import re
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import AfterValidator, Field, field_validator

from apigate.config.units import ByteSize
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.compression.hotpath import Compression, Encoder, MediaTypes
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

Coding = Literal["zstd", "br", "gzip"]
# The gateway's order of preference among codings a client accepts equally: zstd compresses about
# as well as brotli at a fraction of its time, and every client takes gzip.
PREFERENCE: Final[tuple[Coding, ...]] = ("zstd", "br", "gzip")
# The package each optional coding needs (gzip is zlib, in the standard library).
PACKAGES: Final[dict[str, str]] = {"br": "brotli", "zstd": "zstandard"}
DEFAULT_TYPES: Final = (
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "+json",
    "+xml",
    "image/svg+xml",
)
# The codecs' windows: 512 KiB, more than an API body needs (brotli's default is 4 MiB, zstd's
# grows to 8 MiB at high levels). A response being compressed then holds about 0.25 MB with gzip,
# 1.7 MB with zstd at level 3 and 6 MB with brotli at level 4 (1.6 MB at 3), whatever its size.
BROTLI_WINDOW_BITS: Final = 19
ZSTD_WINDOW_LOG: Final = 19
# A media range as this policy takes it: type/subtype, type/*, */*, or a +suffix (RFC 6838 §4.2.8).
_TOKEN = r"[a-z0-9!#$&^_.+-]+"
_MEDIA_RANGE = re.compile(rf"^(\*/\*|{_TOKEN}/(\*|{_TOKEN})|\+{_TOKEN})$", re.IGNORECASE)


def codec_module(coding: str) -> ModuleType | None:
    """The package of an optional coding, or None when it is not installed."""
    try:
        return importlib.import_module(PACKAGES[coding])
    except ImportError:
        return None


def installed_codings() -> tuple[Coding, ...]:
    """The codings this installation can produce, in the gateway's order of preference."""
    return tuple(c for c in PREFERENCE if c == "gzip" or codec_module(c) is not None)


def _installed(coding: Coding) -> Coding:
    if coding != "gzip" and codec_module(coding) is None:
        raise ValueError(
            f"{coding} needs the {PACKAGES[coding]} package, which is not installed "
            "(pip install 'apigate[compression]')"
        )
    return coding


def _media_range(value: str) -> str:
    if not _MEDIA_RANGE.match(value.strip()):
        raise ValueError(
            f"{value!r} is not a content type to match: write type/subtype, type/*, */* or a +suffix"
        )
    return value.strip()


class CompressionConfig(PolicyConfig):
    encodings: list[Annotated[Coding, AfterValidator(_installed)]] = Field(
        default_factory=lambda: list(installed_codings()),
        min_length=1,
        description="codings offered, most preferred first; default: each installed (zstd, br, gzip)",
    )
    min_size: ByteSize = Field(
        default=1024, ge=0, description="smaller bodies (by Content-Length) go uncompressed"
    )
    content_types: list[Annotated[str, AfterValidator(_media_range)]] = Field(
        default_factory=lambda: list(DEFAULT_TYPES),
        min_length=1,
        description="type/subtype, type/*, */* or +suffix; parameters are ignored",
    )
    gzip_level: int = Field(default=6, ge=1, le=9)
    brotli_level: int = Field(default=4, ge=0, le=11)
    zstd_level: int = Field(default=3, ge=1, le=19)

    @field_validator("encodings")
    @classmethod
    def _once_each(cls, codings: list[Coding]) -> list[Coding]:
        for coding in codings:
            if codings.count(coding) > 1:
                raise ValueError(f"{coding} is listed more than once")
        return codings


def encoder_factory(coding: Coding, config: CompressionConfig) -> Callable[[], Encoder]:
    """What makes a new streaming compressor for one response in ``coding``."""
    if coding == "gzip":
        level = config.gzip_level

        def gzip_encoder() -> Encoder:
            compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
            return Encoder(compressor.compress, compressor.flush)

        return gzip_encoder
    module: Any = codec_module(coding)
    if coding == "br":
        quality = config.brotli_level

        def brotli_encoder() -> Encoder:
            compressor = module.Compressor(quality=quality, lgwin=BROTLI_WINDOW_BITS)
            return Encoder(compressor.process, compressor.finish)

        return brotli_encoder
    params = module.ZstdCompressionParameters.from_level(config.zstd_level, window_log=ZSTD_WINDOW_LOG)

    def zstd_encoder() -> Encoder:
        # One compressor per response: a ZstdCompressor serves one stream at a time.
        stream = module.ZstdCompressor(compression_params=params).compressobj()
        return Encoder(stream.compress, stream.flush)

    return zstd_encoder


@register
class CompressionPolicy(Policy[CompressionConfig]):
    name = "compression"
    # The response body meets its filters in reverse order: the lowest order compresses what every
    # other policy's filter (a transform, a cache) made of it.
    order = 10
    phases = frozenset({"response_body"})

    def prepare(self) -> None:
        config = self.config
        encoders = {coding.encode(): encoder_factory(coding, config) for coding in config.encodings}
        self.compression = Compression(
            tuple(encoders), encoders, MediaTypes(list(config.content_types)), config.min_size
        )
        # The engine calls the compiled decision directly: no Python frame per response.
        self.engine_hooks = {"response_body": self.compression.choose}

    def on_response_body(self, exchange: Exchange) -> Encoder | None:
        encoder: Encoder | None = self.compression.choose(exchange)
        return encoder
