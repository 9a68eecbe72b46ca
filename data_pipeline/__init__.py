"""Data for the trainer: ``prepare`` (sources -> tar shards + manifest, with ``sources``, ``images``,
``encodings`` and ``shard_plan``), ``storage`` (local and s3://), ``manifest``, ``shards`` (reading tar
samples), ``config`` (the ``data`` section), ``first_use`` (preparing a missing dataset), ``stream``
(the per-rank resumable batch stream), ``gpu_jpeg`` (optional GPU decoding) and ``compat`` (older
formats still read)."""
