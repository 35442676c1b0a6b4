"""The outside stores the pipeline writes and reads, each behind a small Protocol."""
