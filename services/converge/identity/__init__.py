"""The identity service: one customer across every channel.

Where a request goes: `servicer.py` (protobuf in and out) -> `service.py` (the
rules: normalisation, resolve, merge, consent, erasure) -> `store.py` (all SQL,
schema `identity`, migrations in `migrations/`).
"""
