"""sparsekern benchmarks: GEMM shapes (`sparsekern bench gemm`), host overhead (`bench overhead`), pruning
(`bench prune`, from the pruning area's bench/prune.py).

Modules: shapes (presets, shape/M/dtype parsing), contenders (every way to run y = x @ W^T with a 2:4 W),
timing (the measurement discipline), gemm, overhead, report (tables, CSV, markdown summary, goals), plot (PNG),
environment (versions and commit), cli. Result files follow schema.json; docs/benchmarks.md explains them.
"""

from __future__ import annotations

import json
import os

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.json")


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def validate(doc: dict) -> None:
    """Validate a result document against schema.json (needs jsonschema); raises jsonschema.ValidationError."""
    import jsonschema

    jsonschema.Draft202012Validator(load_schema()).validate(doc)
