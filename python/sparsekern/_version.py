try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    __version__ = _dist_version("sparsekern")
except Exception:  # source tree without installed metadata
    __version__ = "0.1.0+source"
