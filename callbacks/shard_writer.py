"""Moved to :mod:`cvlab.artifacts` (the shard store and its writer, on the ground floor); this name keeps
working for one release."""

from cvlab.artifacts import ShardWriter, with_shard_writer  # noqa: F401
