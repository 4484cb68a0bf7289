"""Connectors: import files exported by other systems into Converge.

A declarative mapping file (YAML, `mapping.py`; shipped examples in
`mappings/`) says how the rows of a CSV, whitespace-separated or JSON-lines
file become customers and interactions. `reader.py` reads the file into
records, `transform.py` applies a mapping to them (plain Python, no network),
and `importer.py` streams the result to the identity service
(`BulkResolve`, for profile upserts) and the interactions service
(`IngestInteractions`). The `converge import` command (`converge.cli`) drives it.

Re-runs are safe: every row carries an idempotency key rendered from the row
itself, so the same file gives the same keys and the services store each row
once.
"""

# Where `converge import` finds the services unless told otherwise (the ports
# of `make demo`).
DEFAULT_IDENTITY = "127.0.0.1:50051"
DEFAULT_INTERACTIONS = "127.0.0.1:50052"
