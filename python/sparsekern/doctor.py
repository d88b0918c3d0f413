"""Placeholder doctor (replaced by the foundation work)."""


def doctor(as_json: bool = False):
    from . import _ext

    return _ext.build_info()
