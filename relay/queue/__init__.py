"""The durable queue: spool files, the SQLite index, group commit and recovery."""
