"""Pieces every agent shares: how users map to partitions, the dead-letter path, metrics."""
