"""The interactions service: every touchpoint recorded, live customer features,
the change stream.

Where a request goes: `servicer.py` (protobuf in and out) -> `service.py`
(validation against the type registry, identity resolution, ingest, features)
-> `store.py` (all SQL, schema `interactions`). `features.py` is the one feature
definition shared by live serving and point-in-time training; `types.py` the
interaction type registry; `identity_link.py` the client of the identity
service (resolution and the merges it follows).
"""
