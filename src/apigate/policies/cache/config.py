"""Where the `cache` policy keeps its entries: the settings of its storage, kept apart from the
rest of the policy's config (``CacheConfig`` builds on them).

``store: memory`` (the default) keeps entries in each worker's memory. ``store: redis`` keeps them
in the gateway's Redis (``state.url``), shared by every worker of every node, with a small hot
layer in each worker (entries kept there ``local_ttl`` at most, ``local_max_bytes`` in all) so
that a hot key does not cost a Redis round trip per request.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, ValidationInfo, field_validator

from apigate.config.units import ByteSize, Duration
from apigate.policies.base import PolicyConfig

# A Redis value this large holds the server (and every gateway's pipeline behind it) while it is
# copied; larger bodies belong in a CDN, not in a shared cache entry.
MAX_REDIS_ENTRY: Final = 32 << 20
MAX_LOCAL_TTL: Final = 60.0


class StorageConfig(PolicyConfig):
    store: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: each worker its own; redis: shared through state.url, hot copies per worker",
    )
    local_ttl: Duration = Field(
        default=1.0,
        ge=0,
        le=MAX_LOCAL_TTL,
        description="store: redis: how long a worker keeps what it read from Redis (0: not at all)",
    )
    local_max_bytes: ByteSize = Field(
        default=16 << 20, ge=1, description="store: redis: memory of each worker's hot layer"
    )

    # max_entry_size is CacheConfig's, validated after the fields here: ``store`` is known by then.
    @field_validator("max_entry_size", check_fields=False)
    @classmethod
    def _check_redis_entry_size(cls, size: int, info: ValidationInfo) -> int:
        if info.data.get("store") == "redis" and size > MAX_REDIS_ENTRY:
            raise ValueError(
                f"is at most {MAX_REDIS_ENTRY >> 20}MiB with store: redis "
                "(a larger value holds Redis for every gateway while it is copied)"
            )
        return size

    def requires_shared_state(self) -> str | None:
        """The field that needs Redis in ``state.url`` (``apigate check`` refuses memory:// then)."""
        return "store" if self.store == "redis" else None
