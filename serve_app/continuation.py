"""A stream resumed on another replica: what the failover relay sends, signed.

When the engine replica serving a stream of a model with failover on dies, the
relay on the head (``cluster.failover_relay``) sends the request again to another
replica with ``hpcserve.continuation``: the text the client already has, the
response's ``id`` and ``created``, and how many tokens it counted.  The replica
appends the text to the prompt, generates only what follows, and frames its
chunks as the same response (same ``id``, no second role chunk), so the client
sees one stream.

Continuation is prompt text the model treats as its own output, and usage does
not count it as prompt: a client must not be able to send it.  The relay signs
the body with a key derived from the cluster's Ray auth token, which every node
already holds (the head reads ``RAY_AUTH_TOKEN_PATH``, batch jobs get
``RAY_AUTH_TOKEN``); a replica accepts the field only with a valid signature.
Without a Ray token (``head.auth: none``) nothing can sign, and a cut stream
ends with an error event as on ``ingress: direct``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from functools import lru_cache
from pathlib import Path

SIGNATURE_HEADER = "x-hpcserve-continuation-signature"
# The relay's requests ask for the completion tokens so far with each text chunk, as
# an SSE comment line (``:N``) opening the chunk's event, which the relay takes out:
# its count for a resend.  In the same event, so a read never splits the two.
RELAYED_HEADER = "x-hpcserve-relayed"
COUNT = re.compile(rb"(?m)^:(\d+)\n")
# RequestContext.state keys: a verified continuation (its stream was admitted when it
# began), and a relayed stream whose engine was lost (the resuming replica accounts it)
RESUMED, HANDED_OVER = "continuation.resumed", "continuation.handed_over"
_CONTEXT = b"hpcserve failover relay continuation v1"


@lru_cache(maxsize=1)
def relay_key() -> bytes | None:
    """This node's signing key, or None without a Ray auth token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = ""
    if not token:
        return None
    return hmac.new(token.encode(), _CONTEXT, hashlib.sha256).digest()


def sign(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def verified(body: bytes, signature: str | None) -> bool:
    """Whether ``body`` was signed by this cluster's relay."""
    key = relay_key()
    if key is None or not signature:
        return False
    return hmac.compare_digest(sign(key, body), signature)


def with_count(chunk: bytes, tokens: int) -> bytes:
    return b":%d\n" % tokens + chunk


def without_counts(events: bytes) -> tuple[bytes, int | None]:
    """``events`` without the count comments, and the last count in them."""
    parts = COUNT.split(events)
    if len(parts) == 1:
        return events, None
    return b"".join(parts[::2]), int(parts[-2])
