"""The runtime every Converge service shares.

A service brings its servicers, its settings class and its SQL migrations; the
runtime does the rest the same way for all of them: settings, logging, the
embedded or external PostgreSQL, migrations, the gRPC server with health,
reflection and interceptors (errors, metrics, request ids), and shutdown.
"""
