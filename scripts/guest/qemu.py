"""Boot the negotiator test guest in QEMU, for tests and by hand.

    import sys; sys.path.insert(0, 'scripts/guest')
    from qemu import Guest
    with Guest(python='2') as g:          # boots, waits for the agent
        subprocess.call([sys.executable, 'negotiator.py', 'host',
                         g.socket, 'os-info'])
        g.host('echo-args', 'x', input=b'data')   # -> CompletedProcess

The guest image must have been built (scripts/guest/build); Guest(build=True)
builds or refreshes it first.  Each Guest has its own temporary directory
holding the two port sockets (g.socket = negotiator-host-to-guest.0,
g.guest_to_host_socket) and the serial console log (g.console_log); several
guests can run at once.  stop() kills QEMU and removes the directory;
kill() only kills QEMU, and restart() boots it again in the same directory:
the sockets keep their paths, as a libvirt guest's do across its restarts.

Command line: python3 scripts/guest/qemu.py [--python 2|3] [--build]
    boots a guest, prints its socket paths and waits (Ctrl-C stops it);
    python3 scripts/guest/qemu.py --check   boots, runs a few commands, stops.
"""

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import guestimage  # noqa: E402

HOST_TO_GUEST = 'negotiator-host-to-guest.0'
GUEST_TO_HOST = 'negotiator-guest-to-host.0'
NEGOTIATOR = guestimage.DEFAULT_NEGOTIATOR


class GuestError(Exception):
    pass


def choose_accel():
    """'kvm' where a real KVM module is loaded, else 'tcg'.

    NEGOTIATOR_GUEST_ACCEL=kvm|tcg overrides.  A /dev/kvm from kvm_pvm
    (nested PVM) cannot boot a stock kernel, hence the module check.
    """
    forced = os.environ.get('NEGOTIATOR_GUEST_ACCEL')
    if forced:
        return forced
    if os.access('/dev/kvm', os.R_OK | os.W_OK) and any(
            os.path.isdir('/sys/module/' + m) for m in ('kvm_intel', 'kvm_amd')):
        return 'kvm'
    return 'tcg'


_LIVE = weakref.WeakSet()


@atexit.register
def _stop_all():
    for guest in list(_LIVE):
        guest.stop()


def _die_with_parent():
    """In the child: SIGKILL QEMU when the thread that started it ends.

    PR_SET_PDEATHSIG follows the starting *thread*, so this is only used
    with Guest(die_with_parent=True) from a thread that outlives the guest.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Guest(object):
    """One QEMU guest with the two negotiator ports.

    python      '3' or '2': the interpreter that runs the agent.
    negotiator  the negotiator.py to put in the guest (default: the repo's).
    commands    host directory copied to /usr/lib/negotiator/commands
                (default: scripts/guest/commands).
    files       {guest path: bytes or host path} added to the initramfs.
    guest_init  script text run as /guest-init.sh instead of the agent
                (then no agent answers: use wait='console' or wait=None).
    verbose     run the agent with -v (its log goes to the console log).
    wait        'agent' (default): start() returns once guest-ping is
                answered; 'console': once /init starts the program; None.
    cache       the build directory (default: .cache/guest).
    build       run the (cached, incremental) build first.
    extra_args  more QEMU arguments; kernel_args more kernel parameters.
    reboot      let a reboot inside the guest reset the machine, QEMU
                running on with its sockets connected (default: QEMU
                exits, -no-reboot).
    die_with_parent  SIGKILL QEMU when the starting thread dies (prctl);
                QEMU is otherwise killed by stop(), the context manager,
                garbage collection or at interpreter exit.
    """

    def __init__(self, python='3', negotiator=None, commands=None, files=None,
                 guest_init=None, verbose=False, wait='agent', timeout=60,
                 memory=512, cache=guestimage.DEFAULT_CACHE, build=False,
                 extra_args=(), kernel_args=(), accel=None, quiet=False,
                 die_with_parent=False, reboot=False):
        self.python = str(python)
        self.negotiator = negotiator
        self.commands = commands
        self.files = files
        self.guest_init = guest_init
        self.verbose = verbose
        self.wait = wait
        self.timeout = timeout
        self.memory = memory
        self.cache = cache
        self.build = build
        self.extra_args = list(extra_args)
        self.kernel_args = list(kernel_args)
        self.accel = accel or choose_accel()
        self.quiet = quiet
        self.die_with_parent = die_with_parent
        self.reboot = reboot
        self.proc = None
        self.tmpdir = None
        self.boot_seconds = None
        self._qemu_log = None
        self._images_built = None
        #: Where this QEMU run's part of the console log starts (restart()
        #: appends to the log): wait_console() looks from there on.
        self._console_start = 0

    # ---------------------------------------------------------------- paths
    @property
    def socket(self):
        """UNIX socket of negotiator-host-to-guest.0 (what `host` takes)."""
        return os.path.join(self.tmpdir, HOST_TO_GUEST)

    @property
    def guest_to_host_socket(self):
        return os.path.join(self.tmpdir, GUEST_TO_HOST)

    @property
    def console_log(self):
        return os.path.join(self.tmpdir, 'console.log')

    def console(self):
        """The serial console output so far, of every QEMU run (text)."""
        try:
            with open(self.console_log, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except IOError:
            return ''

    # ------------------------------------------------------------ lifecycle
    def _images(self):
        """vmlinux, and this guest's initrd: base.cpio + its own overlay."""
        built = (guestimage.build(self.cache) if self.build
                 else guestimage.paths(self.cache))
        if not (built['kernel'] and built['base']):
            raise GuestError('no guest image in %s: run scripts/guest/build '
                             '(or use Guest(build=True))' % self.cache)
        overlay = os.path.join(self.tmpdir, 'overlay.cpio')
        guestimage.write_overlay(
            overlay, self.negotiator or guestimage.DEFAULT_NEGOTIATOR,
            self.commands or guestimage.DEFAULT_COMMANDS, self.files,
            self.guest_init)
        initrd = os.path.join(self.tmpdir, 'initrd.img')
        guestimage.concatenate(initrd, [built['base'], overlay])
        return built['kernel'], initrd

    def kernel_command_line(self):
        append = ['console=ttyS0', 'quiet', 'panic=-1',
                  'negotiator.python=' + self.python]
        if self.verbose:
            append.append('negotiator.verbose=1')
        return ' '.join(append + self.kernel_args)

    def command_line(self, kernel, initrd):
        args = ['qemu-system-x86_64', '-accel', self.accel,
                '-m', str(self.memory), '-smp', '1',
                '-nodefaults', '-no-user-config', '-display', 'none',
                '-monitor', 'none',
                '-chardev', 'file,id=console,append=on,path=' +
                self.console_log, '-serial', 'chardev:console',
                '-kernel', kernel, '-initrd', initrd,
                '-append', self.kernel_command_line(),
                '-device', 'virtio-serial-pci,id=vser0']
        if not self.reboot:
            args.append('-no-reboot')
        if self.accel == 'kvm':
            args += ['-cpu', 'host']
        for i, name in enumerate((HOST_TO_GUEST, GUEST_TO_HOST)):
            args += ['-chardev', 'socket,id=port%d,server=on,wait=off,path=%s'
                     % (i, os.path.join(self.tmpdir, name)),
                     '-device', 'virtserialport,bus=vser0.0,chardev=port%d,'
                     'name=%s' % (i, name)]
        return args + self.extra_args

    def start(self):
        if self.proc:
            raise GuestError('already started')
        self.tmpdir = tempfile.mkdtemp(prefix='negotiator-guest.')
        try:
            self._images_built = self._images()
            self._boot(self.wait)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, wait=None):
        """Kill QEMU (SIGKILL) if it runs, and start it again with the same
        sockets, console log (appended to) and initrd.  WAIT as the
        constructor's (default: the constructor's)."""
        if not self.tmpdir:
            raise GuestError('never started')
        self.kill()
        try:
            self._boot(self.wait if wait is None else wait)
        except BaseException:
            self.stop()
            raise
        return self

    def _boot(self, wait):
        args = self.command_line(*self._images_built)
        if not self.quiet:
            sys.stderr.write('guest: qemu with %s, python %s, in %s\n' % (
                self.accel.upper(), self.python, self.tmpdir))
        self._console_start = len(self.console())
        t0 = time.time()
        self._qemu_log = open(os.path.join(self.tmpdir, 'qemu.log'), 'ab')
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._qemu_log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if self.die_with_parent else None)
        _LIVE.add(self)
        if wait:
            self.wait_console('negotiator-guest: starting', t0)
        if wait == 'agent':
            self.wait_agent(t0)
        self.boot_seconds = time.time() - t0

    def _check_alive(self):
        if self.proc.poll() is not None:
            with open(os.path.join(self.tmpdir, 'qemu.log'), 'rb') as f:
                qlog = f.read().decode('utf-8', 'replace')
            raise GuestError('QEMU exited with status %s\nqemu: %s\n'
                             'console:\n%s' % (self.proc.returncode,
                                               qlog.strip(), self.console()))

    def wait_console(self, marker, t0=None, count=1):
        """Wait until MARKER appears on the console, COUNT times since this
        QEMU run started (GuestError on timeout)."""
        deadline = (t0 or time.time()) + self.timeout
        while self.console()[self._console_start:].count(marker) < count:
            self._check_alive()
            if time.time() > deadline:
                raise GuestError('no %r on the console within %g s:\n%s' % (
                    marker, self.timeout, self.console()))
            time.sleep(0.05)

    def wait_agent(self, t0=None):
        """Wait until the agent answers guest-ping on the port."""
        deadline = (t0 or time.time()) + self.timeout
        attempt = 0
        while True:
            self._check_alive()
            attempt += 1
            left = deadline - time.time()
            if left <= 0:
                raise GuestError('the agent did not answer within %g s; '
                                 'console:\n%s' % (self.timeout,
                                                   self.console()))
            if self.ping(min(left, 10.0), 'boot-%d' % attempt):
                return
            time.sleep(0.1)

    def ping(self, timeout=2.0, request_id='ping'):
        """True if guest-ping gets its reply within TIMEOUT seconds.

        Replies to earlier (stale) pings are skipped: only ours counts.
        """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        end = time.time() + timeout
        try:
            s.connect(self.socket)
            s.sendall(json.dumps({'execute': 'guest-ping',
                                  'id': request_id}).encode() + b'\n')
            buf = b''
            while time.time() < end:
                s.settimeout(max(end - time.time(), 0.01))
                chunk = s.recv(4096)
                if not chunk:
                    return False
                buf += chunk
                while b'\n' in buf:
                    line, buf = buf.split(b'\n', 1)
                    try:
                        reply = json.loads(line.lstrip(b'\xff').decode())
                    except ValueError:
                        continue
                    if isinstance(reply, dict) and \
                            reply.get('id') == request_id and 'return' in reply:
                        return True
        except (socket.error, socket.timeout):
            return False
        finally:
            s.close()
        return False

    def host(self, *args, **kwargs):
        """Run `negotiator.py host [OPTIONS] SOCKET ARGS...` on the host.

        Options: options=[...] (before the socket), python=interpreter,
        negotiator=path, and subprocess.run keywords (input, timeout, ...).
        Output is captured (bytes) unless stdout/stderr are given.
        """
        python = kwargs.pop('python', sys.executable)
        options = list(kwargs.pop('options', []))
        negotiator = kwargs.pop('negotiator', NEGOTIATOR)
        kwargs.setdefault('stdout', subprocess.PIPE)
        kwargs.setdefault('stderr', subprocess.PIPE)
        if 'input' not in kwargs:
            kwargs.setdefault('stdin', subprocess.DEVNULL)
        return subprocess.run([python, negotiator, 'host'] + options +
                              [self.socket] + list(args), **kwargs)

    def kill(self):
        """Kill QEMU (SIGKILL), as a crash or `virsh destroy` would; the
        temporary directory stays, and its socket files with it, for
        restart().  Safe to call twice."""
        if getattr(self, 'proc', None) is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        if getattr(self, '_qemu_log', None):
            self._qemu_log.close()
            self._qemu_log = None

    def stop(self):
        """Kill QEMU (SIGKILL; nothing in the guest needs a clean shutdown)
        and remove the temporary directory.  Safe to call twice."""
        self.kill()
        if getattr(self, 'tmpdir', None):
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def wait_exit(self, timeout=None):
        """Wait until the guest powers off by itself; its exit status."""
        return self.proc.wait(timeout if timeout is not None else self.timeout)

    def __enter__(self):
        if not self.proc:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def __del__(self):
        try:
            self.stop()
        except Exception:
            pass


# ---------------------------------------------------------------- command line

def _check(python):
    with Guest(python=python) as g:
        print('python %s: agent answered %.2f s after QEMU started'
              % (python, g.boot_seconds))
        for args, data in ((['--ping'], None), (['os-info'], None),
                           (['echo-args', 'exit', '3', 'two words'],
                            b'hello stdin'),
                           (['pyinfo'], None)):
            r = g.host(*args, input=data)
            print('$ negotiator.py host SOCK %s  -> exit %d' % (
                ' '.join(args), r.returncode))
            sys.stdout.write(r.stdout.decode('utf-8', 'replace'))
            sys.stdout.write(r.stderr.decode('utf-8', 'replace'))
        sys.stdout.write('--- console ---\n' + g.console())


def main():
    import argparse
    p = argparse.ArgumentParser(description='boot the negotiator test guest')
    p.add_argument('--python', default='3', choices=['2', '3'])
    p.add_argument('--build', action='store_true', help='build first')
    p.add_argument('--verbose', action='store_true', help='agent -v')
    p.add_argument('--check', action='store_true',
                   help='boot on Python 3 and 2.7, run a few commands, stop')
    a = p.parse_args()
    if a.build:
        guestimage.build()
    if a.check:
        _check('3')
        _check('2')
        return
    with Guest(python=a.python, verbose=a.verbose) as g:
        print('agent up after %.2f s' % g.boot_seconds)
        print('host-to-guest socket: %s' % g.socket)
        print('guest-to-host socket: %s' % g.guest_to_host_socket)
        print('console log:          %s' % g.console_log)
        print('try: %s %s host %s os-info   (Ctrl-C stops the guest)' % (
            sys.executable, NEGOTIATOR, g.socket))
        sys.stdout.flush()
        try:
            g.proc.wait()
        except KeyboardInterrupt:
            pass


if __name__ == '__main__':
    main()
