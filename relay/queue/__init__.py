"""The durable queue: spool segments, the SQLite index, group commit, notices and recovery."""
