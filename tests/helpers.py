"""What the tests share: running the CLI, an agent on a socket, a raw client.

Everything here runs on Python 2.7 and 3.6+ (no f-strings).
"""

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NEGOTIATOR = os.path.join(ROOT, 'negotiator.py')

#: Generous bound that only catches hangs.
HANG = 30.0


def b(text):
    """Text as UTF-8 bytes, to compare with what a process wrote."""
    return text.encode('utf-8')


def assert_no_traceback(text):
    """Fail if a log or a console holds a Python traceback, showing each
    with the three lines before it rather than the whole text."""
    lines = text.splitlines()
    found = []
    for n, line in enumerate(lines):
        if 'Traceback' in line:
            end = n + 1
            while end < len(lines) and lines[end][:1] in (' ', '\t'):
                end += 1
            found.append('\n'.join(lines[max(n - 3, 0):end + 1]))
    assert not found, '\n...\n'.join(found)


def cli(args, **kwargs):
    """run_cli(), also checking that no traceback reached stderr."""
    status, out, err = run_cli(args, **kwargs)
    assert b'Traceback' not in err, err.decode('utf-8', 'replace')
    return status, out, err


def process_state(pid):
    """A /proc state letter ('R', 'S', 'Z', ...), or None when gone."""
    try:
        with open('/proc/{0}/stat'.format(pid)) as handle:
            return handle.read().rsplit(')', 1)[1].split()[0]
    except (IOError, OSError):
        return None


def running(pid):
    """Alive and not a zombie (a zombie has been killed, only not reaped)."""
    return process_state(pid) not in (None, 'Z')


def run_cli(args, stdin=b'', timeout=HANG, env=None, prefix=(),
            stdout=subprocess.PIPE):
    """Run ``python negotiator.py ARGS`` (after the command ``prefix``);
    returns (status, stdout, stderr) (stdout None when given a stdout)."""
    process = subprocess.Popen(
        list(prefix) + [sys.executable, NEGOTIATOR] + list(args),
        stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE,
        env=env, close_fds=True)
    deadline = time.time() + timeout
    out, err = communicate(process, stdin, deadline)
    return process.returncode, out, err


def communicate(process, stdin, deadline):
    """Popen.communicate with a deadline on every Python (kills on hang)."""
    import threading
    result = {}

    def talk():
        result['out'] = process.communicate(stdin)
    thread = threading.Thread(target=talk)
    thread.daemon = True
    thread.start()
    thread.join(max(0.1, deadline - time.time()))
    if thread.is_alive():
        process.kill()
        thread.join(5)
        raise AssertionError('command hung: {0!r}'.format(process.args
                             if hasattr(process, 'args') else process.pid))
    return result['out']


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def make_command(directory, name, script, mode=0o755):
    """Write an executable command file; returns its path."""
    path = os.path.join(directory, name)
    with open(path, 'w') as handle:
        handle.write(script)
    os.chmod(path, mode)
    return path


class Workdir(object):
    """A short temporary directory (UNIX socket paths must stay short)."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix='neg', dir='/tmp')
        self.commands = os.path.join(self.path, 'commands')
        os.mkdir(self.commands)

    def join(self, *names):
        return os.path.join(self.path, *names)

    def cleanup(self):
        shutil.rmtree(self.path, ignore_errors=True)


class GuestProcess(object):
    """``negotiator.py guest ARGS`` running in the background, logging to a file.

    :param args: the guest mode's arguments (--commands-dir is added).
    :param wrapper: a command line that runs the agent's as its last
        arguments (e.g. in a mount namespace of its own).
    """

    def __init__(self, workdir, args, log_name='agent', program=(NEGOTIATOR,),
                 wrapper=(), **popen):
        self.workdir = workdir
        self.log_path = workdir.join(log_name + '.log')
        self.log_file = open(self.log_path, 'wb')
        self.process = subprocess.Popen(
            list(wrapper) + [sys.executable] + list(program) + [
                'guest', '--commands-dir', workdir.commands] + list(args),
            stdin=open(os.devnull), stdout=self.log_file,
            stderr=subprocess.STDOUT, close_fds=True, **popen)

    def log(self):
        with open(self.log_path, 'rb') as handle:
            return handle.read().decode('utf-8', 'replace')

    def wait_log(self, text):
        wait_for(lambda: text in self.log())

    def cpu_seconds(self):
        """User plus system CPU time the agent has used so far."""
        with open('/proc/{0}/stat'.format(self.process.pid)) as handle:
            fields = handle.read().rsplit(')', 1)[1].split()
        ticks = os.sysconf('SC_CLK_TCK')
        return (int(fields[11]) + int(fields[12])) / float(ticks)

    def stop(self):
        """SIGTERM; the agent must exit 0 and must not have logged a traceback."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            wait_for(lambda: self.process.poll() is not None)
        self.log_file.close()
        text = self.log()
        assert_no_traceback(text)
        assert self.process.returncode == 0, (self.process.returncode, text)
        return text


@contextlib.contextmanager
def agent_running(args=(), **kwargs):
    """An Agent in a Workdir of its own, stopped (exit 0, no traceback)
    and its workdir removed afterwards."""
    workdir = Workdir()
    try:
        agent = Agent(workdir, args, **kwargs)
        try:
            yield agent
        finally:
            agent.stop()
    finally:
        workdir.cleanup()


class Agent(GuestProcess):
    """``negotiator.py guest --listen SOCKET`` running in the background."""

    def __init__(self, workdir, extra_args=(), verbose=True, socket=None,
                 **kwargs):
        self.socket = socket or workdir.join('agent.sock')
        args = ['--listen', self.socket] + list(extra_args)
        if verbose:
            args.append('-v')
        GuestProcess.__init__(self, workdir, args, **kwargs)
        wait_for(lambda: self.process.poll() is not None or
                 connectable(self.socket))
        if self.process.poll() is not None:
            raise AssertionError('agent did not start:\n' + self.log())

    def host(self, *args, **kwargs):
        """Run ``negotiator.py host SOCKET ARGS``."""
        options = list(kwargs.pop('options', ['-n']))
        return run_cli(['host'] + options + [self.socket] + list(args),
                       **kwargs)

    def client(self):
        return RawClient(self.socket)


def connectable(path):
    """Whether something accepts connections on the UNIX socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except socket.error:
        return False
    finally:
        probe.close()


def fill_backlog(path):
    """A listening socket at ``path`` whose queue of clients is full: the
    listener and the queued clients (never accepted), to close."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    held = [server]
    for _ in range(8):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        held.append(client)
        try:
            client.connect(path)
        except socket.error:
            break   # the queue is full (EAGAIN)
    else:
        raise AssertionError('the queue of {0} never filled'.format(path))
    return held


def wait_for(condition, timeout=HANG, interval=0.01):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError('condition not met within {0} s'.format(
                timeout))
        time.sleep(interval)


class RawClient(object):
    """A client that speaks raw bytes to a socket, for protocol tests.

    It connects to ``path``, or speaks on the connected socket ``sock``.
    """

    def __init__(self, path=None, sock=None):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(HANG)
            sock.connect(path)
        self.sock = sock
        self.sock.settimeout(HANG)
        self.buffer = b''

    def send(self, data):
        self.sock.sendall(data)

    def request(self, message):
        self.send(json.dumps(message).encode('ascii') + b'\n')

    def read_line(self, timeout=HANG):
        """The next line, raw (without its newline); b'' at end of file.
        (Only what arrives is searched for the newline: a reply of tens of
        megabytes is not searched again at every read.)"""
        self.sock.settimeout(timeout)
        chunks = [self.buffer]
        while b'\n' not in chunks[-1]:
            data = self.sock.recv(65536)
            if not data:
                self.buffer = b''
                return b''.join(chunks)
            chunks.append(data)
        line, self.buffer = b''.join(chunks).split(b'\n', 1)
        return line

    def read_bytes(self, size, timeout=HANG):
        """The next ``size`` bytes, raw (the raw output after an event)."""
        self.sock.settimeout(timeout)
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            assert data, 'connection closed'
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_message(self, timeout=HANG):
        line = self.read_line(timeout)
        assert line, 'connection closed'
        return json.loads(line.decode('ascii'))

    def call(self, message):
        self.request(message)
        return self.read_message()

    def nothing_within(self, seconds):
        """True when nothing at all arrives within ``seconds``."""
        if self.buffer:
            return False
        ready, _, _ = select.select([self.sock], [], [], seconds)
        if not ready:
            return True
        self.buffer += self.sock.recv(65536)
        return False

    def close(self):
        self.sock.close()


def scripted_agent(sock, script):
    """Play the agent on ``sock``: for each request received, send
    script(request) (bytes); 0xFF bytes are skipped."""
    import negotiator
    reader = negotiator.LineReader()
    buffered = []
    try:
        while True:
            while not buffered:
                data = sock.recv(65536)
                if not data:
                    return
                buffered.extend(item for item in reader.feed(data)
                                if item not in (negotiator.RESYNC,))
            request = json.loads(buffered.pop(0).decode('ascii'))
            sock.sendall(script(request))
    finally:
        sock.close()


def write(path, data):
    """Write a file (bytes), making its directory; returns its path."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    with open(path, 'wb') as handle:
        handle.write(data)
    return path


#: The disks of make_block_devices(): name -> (sysfs directory,
#: major:minor, the PCI device whose driver is the disk's controller).
PCI = 'devices/pci0000:00/'
DISKS = {
    'sdb': (PCI + '0000:00:01.1/ata2/host1/target1:0:1/1:0:1:0/block/sdb',
            '8:16', PCI + '0000:00:01.1'),
    'sda': (PCI + '0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sda',
            '8:0', PCI + '0000:00:1f.2'),
    'sdc': (PCI + '0000:00:05.0/virtio2/host3/target3:0:0/3:0:0:4/block/sdc',
            '8:32', PCI + '0000:00:05.0'),
    'vda': (PCI + '0000:00:1c.0/0000:01:00.0/virtio3/block/vda', '252:0',
            PCI + '0000:00:1c.0/0000:01:00.0'),
    'dm-0': ('devices/virtual/block/dm-0', '253:0', None),
    'loop0': ('devices/virtual/block/loop0', '7:0', None),
}
#: The PCI devices' drivers (a PCI bridge's is none of qemu-ga's).
DRIVERS = {PCI + '0000:00:01.1': 'ata_piix', PCI + '0000:00:1f.2': 'ahci',
           PCI + '0000:00:05.0': 'virtio-pci', PCI + '0000:00:1c.0':
           'pcieport', PCI + '0000:00:1c.0/0000:01:00.0': 'virtio-pci'}


def relative_link(root, target, name):
    """A symbolic link ``root/name`` to ``root/target``, relative, as
    sysfs makes them."""
    path = os.path.join(root, name)
    os.symlink(os.path.relpath(os.path.join(root, target),
                               os.path.dirname(path)), path)


def block_device(sys, name, number, directory):
    """A block device's uevent and /sys/dev/block link."""
    major, minor = number.split(':')
    write(os.path.join(sys, directory, 'uevent'), 'MAJOR={0}\nMINOR={1}\n'
          'DEVNAME={2}\n'.format(major, minor, name).encode('ascii'))
    relative_link(sys, directory, os.path.join('dev/block', number))


def make_block_devices(root):
    """A fake /sys with the disks of an IDE (ata_piix: buses ata1, ata2), a
    SATA (ahci: ports ata1, ata3, ata4), a virtio-scsi controller, and a
    virtio-blk disk behind a PCI bridge, partitioned (vda1), an LVM volume
    (dm-0) on vda1, and an empty loop device; and udev's database of them
    (serial numbers, the volume's name).  (qemu-ga cannot be shown such
    a tree: its libudev refuses a /sys that is not sysfs, by its
    statfs() type.)

    :returns: the paths of the /sys and of the database.
    """
    sys = os.path.join(root, 'sys')
    for directory in ('dev/block', 'block', 'drivers'):
        os.makedirs(os.path.join(sys, directory))
    for name, (directory, number, controller) in DISKS.items():
        block_device(sys, name, number, directory)
        relative_link(sys, directory, os.path.join('block', name))
        write(os.path.join(sys, directory, 'size'),
              b'0\n' if name == 'loop0' else b'2048\n')
        os.mkdir(os.path.join(sys, directory, 'slaves'))
    for controller, driver in DRIVERS.items():
        relative_link(sys, 'drivers/' + driver, controller + '/driver')
    for host in ('ata1', 'host9'):
        os.mkdir(os.path.join(sys, PCI, '0000:00:01.1', host))
    for host in ('ata4', 'ata1'):
        os.mkdir(os.path.join(sys, PCI, '0000:00:1f.2', host))
    vda = DISKS['vda'][0]
    block_device(sys, 'vda1', '252:1', vda + '/vda1')
    relative_link(sys, vda + '/vda1', DISKS['dm-0'][0] + '/slaves/vda1')
    udev = os.path.join(root, 'udev')
    write(os.path.join(udev, 'b252:0'), b'S:disk/by-id/virtio-SER0\n'
          b'E:ID_SERIAL=SER0\nE:ID_TYPE=disk\n')
    write(os.path.join(udev, 'b252:1'), b'E:ID_SERIAL=SER0\n')
    write(os.path.join(udev, 'b253:0'), b'E:DM_NAME=vg-root\n')
    return sys, udev


@contextlib.contextmanager
def serving_here(refused=()):
    """An agent's Server in this process, on one end of a socketpair (what
    the test patches in negotiator applies to it, and to its children):
    yields ask(message) -> reply, with ask.send and ask.wait."""
    import negotiator  # (not at the top: conftest sets up its import)
    loop = negotiator.Loop()
    children = negotiator.Children()
    loop.on_signal(signal.SIGCHLD, children.check)
    ours, theirs = socket.socketpair()
    negotiator.set_nonblocking(ours.fileno())
    server = negotiator.Server(loop, ours.fileno(), 'test',
                               negotiator.CommandSet('/nonexistent', {}),
                               children, refused=refused)
    received = []

    def turn():
        loop.call_later(0.01, lambda: None)
        loop.run_once()
        try:
            received.append(theirs.recv(65536))
        except socket.error as e:
            assert e.errno == errno.EAGAIN

    def send(message):
        """Send a request (a dict), or bytes as they are."""
        if isinstance(message, dict):
            message = json.dumps(message).encode('ascii') + b'\n'
        theirs.sendall(message)

    def wait(seconds):
        """Serve for a while, all replies kept for ask()."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            turn()

    def ask(message):
        """The next reply, after sending ``message``."""
        send(message)
        deadline = time.time() + HANG
        while b'\n' not in b''.join(received):
            assert time.time() < deadline, 'no reply'
            turn()
        line, rest = b''.join(received).split(b'\n', 1)
        received[:] = [rest]
        return json.loads(line.decode('ascii'))
    ask.send, ask.wait = send, wait
    theirs.setblocking(False)
    try:
        yield ask
    finally:
        server.close()
        children.close()
        loop.close()
        ours.close()
        theirs.close()
