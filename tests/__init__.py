"""The test suite: ``test_*.py`` by concern; helpers in ``support/``; subprocess entry scripts in ``scripts/``."""
