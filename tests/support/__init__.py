"""Helpers shared by the tests (imported as ``tests.support.<module>``; pytest's ``pythonpath`` puts the
repository root on ``sys.path``): paths, ports, datasets, moto, jobs, faults, network namespaces, k8s
validation. Fixtures live in ``tests/conftest.py``."""
