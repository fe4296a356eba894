"""Webhook signature verification presets: a pure library, no I/O.

``build_verifier(config)`` turns one ``SchemeConfig`` (a pydantic union on ``scheme:``) into a
``Verifier`` whose key material is computed once; ``verifier.verify(request)`` takes the raw
request (``WebhookRequest``) and returns a ``Verdict``. It never raises: every failure is a
verdict with a stable ``Reason`` code and a message naming the header or field at fault.

Schemes: ``stripe``, ``github``, ``standard`` (Standard Webhooks / Svix, HMAC and Ed25519),
``shopify``, ``slack``, ``twilio``, ``inpost`` (InPost Group API and the Pactown gateway's
``X-InPost-Signature``), ``inpost_shipx``, ``allegro`` (the Pactown gateway's ``X-Allegro-Signature``), and
the generic ``hmac``, ``token`` and ``basic``. Each takes ``allowed_cidrs`` (checked first) and
``id_header`` / ``id_json_path`` / ``type_header`` / ``type_json_path`` overrides of where the
event id and type come from.

A verdict with ``answer`` set (InPost's GET URL check, Slack's url_verification) is authentic
but no event: the caller replies with the answer and stores nothing.
"""

from apigate.webhooks.verify.model import Reason, Verdict, Verifier, WebhookRequest
from apigate.webhooks.verify.schemes import SchemeConfig, build_verifier, shorthand_scheme

__all__ = [
    "Reason",
    "SchemeConfig",
    "Verdict",
    "Verifier",
    "WebhookRequest",
    "build_verifier",
    "shorthand_scheme",
]
