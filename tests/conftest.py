# -*- coding: utf-8 -*-
"""Shared pytest setup for the negotiator test suite.

Must stay valid on Python 2.7 and 3.6+ (pytest 4.6 ... latest): no f-strings
or other Python-3-only syntax here.

NEGOTIATOR_TEST_SIX (set by scripts/test) selects the six scenario:
  "0"   six must NOT be importable: it is hidden in this process
        (sys.modules['six'] = None) and in child processes (tests/hide_six,
        whose six.py raises ImportError, is put first on PYTHONPATH).
  "1"   six must be importable; the session stops early if it is not.
  unset whatever happens to be installed is used.
"""
import os
import platform
import sys

import pytest

from helpers import Workdir

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
HIDE_SIX_DIR = os.path.join(TESTS_DIR, 'hide_six')

# `import negotiator` must find the repo's module first.
if REPO_ROOT in sys.path:
    sys.path.remove(REPO_ROOT)
sys.path.insert(0, REPO_ROOT)

# No agent a test starts may run this machine's chpasswd, shutdown or
# hwclock: agents look for those tools in this directory, which does not
# exist, unless a test gives them stand-ins (tests/test_actions.py).
os.environ['NEGOTIATOR_TOOL_PATH'] = os.path.join(TESTS_DIR, 'no-tools')

# hide_six/six.py raises ImportError on import: never collect it.
collect_ignore = ['hide_six']

SIX_MODE = os.environ.get('NEGOTIATOR_TEST_SIX', '')

if SIX_MODE == '0':
    # In-process: `import six` (and `from six.moves import ...`) now raises
    # ImportError, even though pytest itself may already have loaded six
    # (pytest 4.6 on Python 2.7 depends on it).
    sys.modules['six'] = None
    # Child processes: hide_six/six.py shadows any installed six.
    _old = os.environ.get('PYTHONPATH', '')
    _parts = [p for p in _old.split(os.pathsep) if p and p != HIDE_SIX_DIR]
    os.environ['PYTHONPATH'] = os.pathsep.join([HIDE_SIX_DIR] + _parts)


def _six_available():
    try:
        import six  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_configure(config):
    if SIX_MODE not in ('', '0', '1'):
        raise pytest.UsageError(
            'NEGOTIATOR_TEST_SIX must be "0", "1" or unset, not %r' % SIX_MODE)
    if SIX_MODE == '1' and not _six_available():
        raise pytest.UsageError(
            'NEGOTIATOR_TEST_SIX=1 but six is not importable with %s '
            '(PYTHONPATH=%r); install six or use scripts/test'
            % (sys.executable, os.environ.get('PYTHONPATH', '')))


def pytest_report_header(config):
    return 'negotiator tests: python %s, six: %s' % (
        platform.python_version(), 'yes' if _six_available() else 'no')


#: Lines that tests recorded with the ``figures`` fixture: counts and
#: measures of long runs, printed at the end of the session whatever the
#: outcome (pytest -q shows no output of a passing test).
FIGURES = []


@pytest.fixture
def figures(request):
    """``figures(text)`` records a line for the session's end, prefixed
    with the test's name (and prints it, for ``pytest -s``)."""
    def record(text):
        line = '{0}: {1}'.format(request.node.name, text)
        FIGURES.append(line)
        sys.stdout.write(line + '\n')
    return record


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep('-', 'figures')
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope='session')
def python_exe():
    """The interpreter running the tests, for spawning negotiator.py."""
    return sys.executable


@pytest.fixture
def workdir():
    """A temporary directory with a commands directory, removed afterwards."""
    wd = Workdir()
    yield wd
    wd.cleanup()
