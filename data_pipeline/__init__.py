"""Data for the trainer: ``prepare`` (sources -> tar shards + manifest, with ``sources``, ``images``,
``encodings`` and ``shard_plan``), ``storage`` (local and s3://), ``manifest``, ``shards`` (reading tar
samples), ``stream`` (the per-rank resumable batch stream) and ``gpu_jpeg`` (optional GPU decoding)."""
