"""Conformance kits that third parties run against their own stores and codecs (``docs/testing.md``).

* :class:`shardstore.testing.store.StoreTests`: the store conformance suite, in zarr-python's
  ``StoreTests`` shape. Subclass it in a test module, supply a ``store`` fixture and raw
  accessors that bypass the store, and pytest runs every check against your backend.
* :mod:`shardstore.testing.codecs`: codec checks (config round trip, lossless round trip,
  golden decode) and :class:`~shardstore.testing.codecs.FixtureWriter`, the append-only writer
  of golden fixtures.

Both need pytest (``pip install shardstore[testing]``); nothing else in shardstore imports them.
"""
