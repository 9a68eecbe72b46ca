"""What a run shows of itself: Prometheus metrics (``metrics``), the Parquet run log (``run_log``), sample
grids (``grids``) and the report drawn from the log (``report``)."""
