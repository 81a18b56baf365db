"""negotiator's command line with one kind of loop callback made to raise.

    python faulty_negotiator.py FAULT guest|host [OPTIONS...]

For tests/test_hostile.py: the callback raises ZeroDivisionError('injected')
only for the conversations FAULT names (a request id, a command or its
standard input that say "boom"), so that the test can check that this
conversation alone ends while the loop and the others go on.  FAULT
"stuck-builtin" makes the uptime built-in block instead.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import negotiator  # noqa: E402


def hit_once(state=[]):
    state.append(1)
    return len(state) == 1


#: FAULT -> (class, method, whether this call raises).
FAULTS = {
    # The channel's reader, through the request it hands over.
    'request': (negotiator.Server, 'rpc_ping',
                lambda self, arguments, request_id: request_id == 'boom'),
    # A command's output pipe's reader.
    'output': (negotiator.Server, '_send_output',
               lambda self, pieces: 'boom' in self._command),
    # A command's stdin pipe's writer.
    'stdin': (negotiator.Process, '_feed_stdin',
              lambda self, hung_up: self._stdin_data.startswith(b'boom')),
    # A timer: a command's timeout.
    'timeout': (negotiator.Process, '_on_timeout', lambda self: True),
    # SIGCHLD (or the end of the output): a command's exit.
    'exit': (negotiator.Server, '_finish_execute',
             lambda self, request_id, result: request_id == 'boom'),
    # The channel's writer: output that waited for the peer is written.
    'drained': (negotiator.Server, 'on_drained', lambda self: True),
    # The listening socket's reader, once.
    'accept': (negotiator.ListenService, '_accept',
               lambda self, hung_up: hit_once()),
    # The host daemon's first connection to a guest, once.
    'connect': (negotiator.DaemonServer, '__init__',
                lambda self, *args: hit_once()),
}


def inject(cls, name, hit):
    original = getattr(cls, name)

    def faulty(self, *args):
        if hit(self, *args):
            raise ZeroDivisionError('injected')
        return original(self, *args)
    setattr(cls, name, faulty)


def stuck(args):
    """A built-in that blocks, as a statvfs() on a dead server would."""
    time.sleep(3600)


if __name__ == '__main__':
    if sys.argv[1] == 'stuck-builtin':
        negotiator.BUILTINS['uptime'] = stuck
    else:
        inject(*FAULTS[sys.argv[1]])
    sys.exit(negotiator.main(sys.argv[2:]))
