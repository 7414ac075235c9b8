"""The `detot` command line (`app.py`, `eval.py`), the demo, the benchmarks and plotting.

May import anything in the package; nothing imports it.
"""
