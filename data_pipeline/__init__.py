"""Data for the trainer: ``prepare`` (sources -> tar shards + manifest), ``storage`` (local and s3://),
``manifest``, ``shards`` (reading tar samples) and ``stream`` (the per-rank resumable batch stream)."""
