# Put first on PYTHONPATH by tests/conftest.py during the no-six test run, so
# that child processes (e.g. `python negotiator.py ...`) cannot import six.
raise ImportError('six is hidden for the no-six test run')
