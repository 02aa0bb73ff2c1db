"""Fuzz harnesses (tests/fuzz/harnesses.py) and their atheris runner (``python -m tests.fuzz``).

Nothing is imported here, so the runner can instrument routeproxy as it imports it.
"""
