"""Load tests and benchmarks for Collab.

- `loadtests/locustfile.py`: Locust users for `/ws/chat`, `/ws/live` and the REST API, against
  any deployment (`locust -f loadtests/locustfile.py --host http://...`).
- `loadtests.fanout`: the fan-out and connection benchmark against peer servers
  (`python -m loadtests.fanout --help`).
- `loadtests.rawws`: the small asyncio WebSocket client the benchmark uses for its thousands of
  connections.
- `loadtests.peers`: the peer servers the benchmark compares Collab with.

How to run each of them: `loadtests/README.md`; measured figures: `docs/BENCHMARKS.md`.
"""

__all__: list[str] = []
