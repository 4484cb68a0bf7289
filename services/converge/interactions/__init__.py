"""The interactions service: every touchpoint recorded, live customer features,
the change stream.

Where a request goes: `servicer.py` (protobuf in and out, through
`convert.py`) -> `service.py` (validation against the type registry, identity
resolution, ingest, features, purges, erasure) -> `store.py` (all SQL, schema
`interactions`, rows out as dataclasses). `app.py` wires them together and
defines SPEC. `change_feed.py` shares one reader of the change stream among
its followers; `features.py` is the one feature definition shared by live
serving and point-in-time training; `types.py` the interaction type registry;
`identity_link.py` the client of the identity service (resolution and the
merges it follows).
"""
