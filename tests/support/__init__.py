"""Testing tools shared by the test suite and the benchmarks, outside the installed
product: an aiortc client with packet taps, analysis of what a client received, a real
server process on a free port, an in-process harness with a worker stand-in, the
MuseTalk reference computations and tiny checkpoints, and the browser probe.

``tests/`` and ``bench/`` both import from here; nothing here imports from either.
"""
