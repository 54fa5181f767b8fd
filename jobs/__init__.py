"""Entry points: ``python -m jobs.<name>`` and the ``srpo`` console script."""
