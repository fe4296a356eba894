"""engine/heads.read_response against llhttp: any head it accepts, llhttp reads the same way."""

from __future__ import annotations

import httptools
from tests.test_heads import llhttp_response

from fuzz.harness import check_head, fuzz, head_readers

READERS = head_readers()


def check(data: bytes) -> None:
    check_head(READERS, data, "read_response", httptools.HttpResponseParser, llhttp_response, 3)


if __name__ == "__main__":
    fuzz(check)
