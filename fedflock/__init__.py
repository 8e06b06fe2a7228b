"""The ``fedflock`` command line and the end-to-end demo (see :mod:`fedflock.cli`)."""
