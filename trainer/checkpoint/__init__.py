"""Checkpoints: atomic, asynchronous, resumable at any world size, in a local folder or under s3://.

- ``format``: what a checkpoint folder holds, reading it back verified, the errors;
- ``writer``: the background writer (snapshot, serialise once, upload, commit, retries);
- ``retention``: which checkpoints are kept (the last ``keep_last``, LATEST, the best by FID);
- ``checkpointer``: the component the loop talks to (``due``, ``save``, ``wait``, ``load_latest``);
- ``resume``: the checkpoint every rank resumes from, read once per node, checked against the run;
- ``generator``: a trained generator from a checkpoint, ready for inference (sample, eval, export);
- ``compat``: the older formats a checkpoint may have been written in.
"""
