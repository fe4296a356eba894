"""engine/heads.read_request against llhttp: any head it accepts, llhttp reads the same way."""

from __future__ import annotations

import httptools
from tests.test_heads import llhttp_request

from fuzz.harness import check_head, fuzz, head_readers

READERS = head_readers()


def check(data: bytes) -> None:
    check_head(READERS, data, "read_request", httptools.HttpRequestParser, llhttp_request, 5)


if __name__ == "__main__":
    fuzz(check)
