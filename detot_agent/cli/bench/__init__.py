"""`detot bench ...`: engine, retrieval and scale-out benchmarks (a table and a JSON file each)."""
