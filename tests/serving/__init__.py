"""Tests of ``uniportrait serve``: the REST API, load, the web UI, a real browser, the command.

A package, so that its conftest does not shadow ``tests/conftest.py`` (``from conftest import``).
"""
