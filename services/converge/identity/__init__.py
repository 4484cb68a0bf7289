"""The identity service: one customer across every channel.

Where a request goes: `servicer.py` (checks and converts through `convert.py`)
-> `service.py` (the rules: normalisation, resolve, merge, consent, erasure;
the other services asked to erase and export through `peers.py`) -> `store.py`
(all SQL, schema `identity`, migrations in `migrations/`). `app.py` wires them.
"""
