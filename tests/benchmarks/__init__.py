"""Benchmarks, run by `make bench` (never by `make test`).

Each module has `async def run(env: BenchEnv) -> dict[str, float]`, returning
figures named as the issues name them. Every figure that is compared with a
baseline is measured side by side in the same run, since machines are noisy.
"""
