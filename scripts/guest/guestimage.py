"""Build the kernel and initramfs of the negotiator test guest.

Everything lands in CACHE (default: <repo>/.cache/guest):

  debs/           the downloaded Debian packages (kernel, busybox-static)
  vmlinux         uncompressed ELF kernel (boots through its PVH note)
  kernel-release  e.g. 6.1.0-41-amd64
  base.cpio       big, cached: busybox, virtio modules, Python 3 and 2.7,
                  the host's chpasswd with its PAM stack, a user of uid 1000
  base.json       what base.cpio was built from (rebuilt when it changes)
  overlay.cpio    small: /init, negotiator.py, the commands directory
  initrd.img      base.cpio + overlay.cpio (what QEMU's -initrd gets)

Only the standard library is used (Python 3.5+); apt-get, dpkg-deb and
ldd come from the Debian host.
"""

import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_CACHE = os.path.join(REPO, '.cache', 'guest')
DEFAULT_NEGOTIATOR = os.path.join(REPO, 'negotiator.py')
DEFAULT_COMMANDS = os.path.join(HERE, 'commands')
INIT_SCRIPT = os.path.join(HERE, 'init')
GUEST_COMMANDS_DIR = '/usr/lib/negotiator/commands'
GUEST_NEGOTIATOR = '/usr/lib/negotiator/negotiator.py'

#: Modules wanted in the guest; their dependencies are added from .modinfo.
#: The disk's (virtio_blk, ext4 and the crc32c its checksums ask the crypto
#: API for by name, which no modinfo lists) serve the libvirt domain's disk.
WANTED_MODULES = ['virtio_pci', 'virtio_console', 'virtio_blk', 'ext4',
                  'crc32c_generic']
#: Interpreters copied into the guest: (name in /usr/bin, candidates).
PYTHONS = [
    ('python3', [os.environ.get('GUEST_PYTHON3', ''),
                 '/root/.pyenv/versions/3.11.7/bin/python3.11',
                 '/usr/bin/python3']),
    ('python2', [os.environ.get('GUEST_PYTHON2', ''),
                 '/root/.pyenv/versions/2.7.18/bin/python2.7']),
]
#: Directory names left out of a stdlib copy, wherever they occur.
STDLIB_SKIP_DIRS = {'test', 'tests', 'idlelib', 'tkinter', 'lib-tk',
                    'lib2to3', 'ensurepip', 'pydoc_data', 'turtledemo',
                    '__phello__', 'site-packages', 'dist-packages'}
STDLIB_SKIP_FILE = re.compile(
    r'(\.opt-[12]\.pyc|\.pyo|\.exe|\.a)$|^_test|^_tkinter|^_ctypes_test'
    r'|^xxlimited|^_xxtestfuzz')
#: The host's chpasswd, copied with the PAM configuration and modules it
#: loads (Debian's is built with PAM), for guest-set-user-password.
CHPASSWD = '/usr/sbin/chpasswd'
PAM_MODULES = '/lib/x86_64-linux-gnu/security'
#: Host files and tools the build needs (a path, or a name found on PATH),
#: and the Debian package that has each.
APT_PACKAGES = {'qemu-system-x86_64': 'qemu-system-x86', 'strip': 'binutils',
                CHPASSWD: 'passwd', '/etc/login.defs': 'login',
                PAM_MODULES + '/pam_unix.so': 'libpam-modules',
                '/etc/pam.d/common-password': 'libpam-runtime'}
#: The guest's unprivileged user: name, uid (its gid too), home.
GUEST_USER = ('user', 1000, '/home/user')
#: The shadow group, which /etc/shadow belongs to as on Debian (0640).
SHADOW_GID = 42
#: Bump when the layout of base.cpio changes.
BASE_FORMAT = 5


def log(msg):
    sys.stderr.write('guest-build: %s\n' % msg)
    sys.stderr.flush()


def run(args, **kwargs):
    return subprocess.run(args, check=True, **kwargs)


def output(args, **kwargs):
    return subprocess.run(args, check=True, stdout=subprocess.PIPE,
                          universal_newlines=True, **kwargs).stdout


# ----------------------------------------------------------------- cpio newc

class Cpio(object):
    """Writes a cpio archive in the kernel's 'newc' format.

    Entries are added by absolute guest path; missing parent directories
    are added first, and a later entry of the same path is dropped, so the
    first add wins.  Everything belongs to root unless given an OWNER (uid,
    gid); copied files keep their mtime, others get 0.
    """

    def __init__(self, path):
        self.path = path
        self.tmp = '%s.%d.tmp' % (path, os.getpid())
        self.f = open(self.tmp, 'wb')
        self.seen = set()
        self.ino = 1

    def _header(self, name, mode, size, nlink=1, rdev=(0, 0), mtime=0,
                owner=(0, 0)):
        name = name.lstrip('/').encode() or b'.'
        fields = (self.ino, mode) + owner + (nlink, int(mtime), size, 0, 0,
                  rdev[0], rdev[1], len(name) + 1, 0)
        self.ino += 1
        head = b'070701' + b''.join(b'%08X' % v for v in fields)
        head += name + b'\0'
        self.f.write(head + b'\0' * (-len(head) % 4))

    def _data(self, data):
        self.f.write(data)
        self.f.write(b'\0' * (-len(data) % 4))

    def _claim(self, path):
        path = '/' + path.strip('/')
        if path in self.seen:
            return None
        parent = os.path.dirname(path)
        if parent != '/' and parent not in self.seen:
            self.dir(parent)
        self.seen.add(path)
        return path

    def dir(self, path, mode=0o755, owner=(0, 0)):
        path = self._claim(path)
        if path:
            self._header(path, stat.S_IFDIR | mode, 0, nlink=2, owner=owner)

    def file(self, path, data, mode=0o644, mtime=0, owner=(0, 0)):
        path = self._claim(path)
        if path:
            self._header(path, stat.S_IFREG | mode, len(data), mtime=mtime,
                         owner=owner)
            self._data(data)

    def copy(self, path, source, mode=None):
        with open(source, 'rb') as f:
            data = f.read()
        st = os.stat(source)
        if mode is None:
            mode = stat.S_IMODE(st.st_mode)
        # Real mtimes: .pyc files are only used when their source's
        # mtime matches the one recorded in them.
        self.file(path, data, mode, st.st_mtime)

    def symlink(self, path, target):
        path = self._claim(path)
        if path:
            data = target.encode()
            self._header(path, stat.S_IFLNK | 0o777, len(data))
            self._data(data)

    def chardev(self, path, major, minor, mode=0o600):
        path = self._claim(path)
        if path:
            self._header(path, stat.S_IFCHR | mode, 0, rdev=(major, minor))

    def close(self):
        self._header('TRAILER!!!', 0, 0, nlink=1)
        self.f.write(b'\0' * (-self.f.tell() % 512))
        self.f.close()
        os.rename(self.tmp, self.path)


# ---------------------------------------------------------------- host tools

def ensure_tools():
    """apt-get install what is missing (QEMU, binutils for strip, chpasswd
    and its PAM stack)."""
    missing = sorted(set(pkg for tool, pkg in APT_PACKAGES.items()
                         if not (os.path.exists(tool) if tool.startswith('/')
                                 else shutil.which(tool))))
    if missing:
        log('installing %s' % ' '.join(missing))
        apt_get(['install', '-y', '--no-install-recommends'] + missing)


def apt_get(args, cwd=None):
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    try:
        run(['apt-get', '-q'] + args, cwd=cwd, env=env)
    except subprocess.CalledProcessError:
        log('apt-get %s failed: apt-get update and retry' % args[0])
        run(['apt-get', '-q', 'update'], env=env)
        run(['apt-get', '-q'] + args, cwd=cwd, env=env)


def kernel_package():
    """linux-image-6.1.0-N-amd64, the package linux-image-amd64 pulls in."""
    for attempt in (1, 2):
        try:
            text = output(['apt-cache', 'depends', '--no-recommends',
                           '--no-suggests', 'linux-image-amd64'],
                          stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            text = ''
        m = re.search(r'Depends: (linux-image-[0-9][^\s]*-amd64)\s', text)
        if m:
            return m.group(1)
        if attempt == 1:
            run(['apt-get', '-q', 'update'])
    raise SystemExit('guest-build: apt offers no linux-image-amd64')


def download(debs, package):
    """The .deb of PACKAGE's candidate version in DEBS (downloaded once)."""
    version = output(['apt-cache', 'policy', package])
    m = re.search(r'Candidate: (\S+)', version)
    if not m or m.group(1) == '(none)':
        apt_get(['update'])
        version = output(['apt-cache', 'policy', package])
        m = re.search(r'Candidate: (\S+)', version)
    quoted = m.group(1).replace(':', '%3a')
    for name in os.listdir(debs):
        if name.startswith(package + '_') and name.endswith('.deb') and \
                name.split('_')[1] in (quoted, m.group(1).split(':')[-1]):
            return os.path.join(debs, name)
    log('downloading %s %s' % (package, m.group(1)))
    before = set(os.listdir(debs))
    apt_get(['download', '%s=%s' % (package, m.group(1))], cwd=debs)
    new = [n for n in set(os.listdir(debs)) - before if n.endswith('.deb')]
    return os.path.join(debs, new[0])


def extract_vmlinux(bzimage, dest):
    """Decompress the xz payload of a bzImage into an ELF vmlinux."""
    with open(bzimage, 'rb') as f:
        data = f.read()
    start = 0
    while True:
        pos = data.find(b'\xfd7zXZ\x00', start)
        if pos < 0:
            raise SystemExit('guest-build: no xz payload in %s' % bzimage)
        try:
            d = lzma.LZMADecompressor(lzma.FORMAT_XZ)
            # Trailing bytes after the xz stream end up in unused_data.
            out = d.decompress(data[pos:])
        except lzma.LZMAError:
            start = pos + 1
            continue
        if out[:4] == b'\x7fELF':
            break
        start = pos + 1
    with open(dest + '.tmp', 'wb') as f:
        f.write(out)
    os.rename(dest + '.tmp', dest)


def modinfo_depends(data):
    m = re.search(rb'(?:^|\0)depends=([^\0]*)\0', data)
    return [d for d in m.group(1).decode().split(',') if d] if m else []


def module_files(tree, wanted):
    """[(name, bytes)] of WANTED and their dependencies, load order."""
    index = {}
    for root, _, files in os.walk(tree):
        for name in files:
            base = re.sub(r'\.ko(\.xz)?$', '', name)
            if base != name:
                index[base.replace('-', '_')] = os.path.join(root, name)
    order, done = [], set()

    def visit(name):
        name = name.replace('-', '_')
        if name in done:
            return
        done.add(name)
        if name not in index:
            raise SystemExit('guest-build: module %s not in the kernel '
                             'package (built in?)' % name)
        with open(index[name], 'rb') as f:
            data = f.read()
        if index[name].endswith('.xz'):
            data = lzma.decompress(data)
        for dep in modinfo_depends(data):
            visit(dep)
        order.append((name, data))
    for name in wanted:
        visit(name)
    return order


# ------------------------------------------------------------------ pythons

def python_layout(python):
    """Facts about an interpreter, asked from the interpreter itself."""
    code = ('import sys, os, sysconfig, json; '
            'print(json.dumps([os.path.realpath(sys.executable), '
            'sysconfig.get_paths()["stdlib"], '
            '"%d.%d" % sys.version_info[:2]]))')
    exe, stdlib, version = json.loads(output([python, '-c', code]))
    return exe, os.path.realpath(stdlib), version


def ldd(path):
    """Shared libraries (resolved paths) that PATH needs, and the loader."""
    try:
        text = output(['ldd', path], stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        return []
    libs = []
    for line in text.splitlines():
        m = re.match(r'\s*(\S+) => (\S+) \(', line) or \
            re.match(r'\s*(/\S+) \(', line)
        if not m:
            if 'not found' in line:
                log('%s: %s' % (path, line.strip()))
            continue
        libs.append(m.groups()[-1])
    return libs


def maybe_strip(data, tmpdir):
    """DATA (an ELF file) without debugging symbols, where strip exists."""
    if not shutil.which('strip') or data[:4] != b'\x7fELF':
        return data
    path = os.path.join(tmpdir, 'strip.tmp')
    with open(path, 'wb') as f:
        f.write(data)
    if subprocess.call(['strip', '--strip-debug', path]) == 0:
        with open(path, 'rb') as f:
            data = f.read()
    return data


def add_python(cpio, alias, python, tmpdir, libs):
    exe, stdlib, version = python_layout(python)
    log('python %s: %s, stdlib %s' % (alias, exe, stdlib))
    elfs = [exe]
    cpio.copy(exe, exe)
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and
                         not d.startswith('config-') and d != 'config')
        if root == stdlib:
            cpio.dir(os.path.join(stdlib, 'site-packages'))
        for name in sorted(files):
            if STDLIB_SKIP_FILE.search(name):
                continue
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            if name.endswith('.so'):
                elfs.append(path)
                with open(path, 'rb') as f:
                    cpio.file(path, maybe_strip(f.read(), tmpdir), 0o755)
            else:
                cpio.copy(path, path)
    for elf in elfs:
        for lib in ldd(elf):
            libs.add(lib)
    for link in (alias, 'python' + version):
        cpio.symlink('/usr/bin/' + link, exe)


def pam_files(service):
    """The PAM configuration of SERVICE (its file and those it @includes)
    and the modules it names: the host paths libpam reads."""
    files, modules, todo = [], set(), [service]
    while todo:
        path = os.path.join('/etc/pam.d', todo.pop())
        if path in files:
            continue
        files.append(path)
        with open(path) as f:
            for line in f:
                words = line.split('#')[0].split()
                if words[:1] == ['@include']:
                    todo.append(words[1])
                modules.update(os.path.join(PAM_MODULES, word)
                               for word in words if word.endswith('.so'))
    return files + sorted(modules)


def chpasswd_files():
    """Host paths of what chpasswd needs, besides libraries."""
    return [CHPASSWD, '/etc/login.defs'] + pam_files('chpasswd')


def add_users(cpio):
    """root, GUEST_USER (its home its own) and nobody; /etc/shadow, which
    chpasswd rewrites, as Debian has it (0640, group shadow), every
    password locked."""
    name, uid, home = GUEST_USER
    cpio.file('/etc/passwd', (
        'root:x:0:0:root:/root:/bin/sh\n'
        '{0}:x:{1}:{1}:{0}:{2}:/bin/sh\n'
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n').format(
            name, uid, home).encode())
    cpio.file('/etc/group', 'root:x:0:\nshadow:x:{0}:\n{1}:x:{2}:\n'
              'nogroup:x:65534:\n'.format(SHADOW_GID, name, uid).encode())
    cpio.file('/etc/shadow', ''.join(
        '{0}:*:20000:0:99999:7:::\n'.format(user)
        for user in ('root', name, 'nobody')).encode(), 0o640,
        owner=(0, SHADOW_GID))
    cpio.dir(home, owner=(uid, uid))


def add_libs(cpio, libs, tmpdir):
    for lib in sorted(libs):
        real = os.path.realpath(lib)
        with open(real, 'rb') as f:
            cpio.file(lib, maybe_strip(f.read(), tmpdir), 0o755)


# --------------------------------------------------------------------- build

def base_inputs(cache):
    """What base.cpio depends on: rebuilt when this changes."""
    pythons = []
    for alias, candidates in PYTHONS:
        for c in candidates:
            if c and os.path.exists(c):
                st = os.stat(os.path.realpath(c))
                pythons.append([alias, c, st.st_mtime, st.st_size])
                break
        else:
            log('no interpreter for %s in the guest: %s' % (
                alias, ', '.join(c for c in candidates if c)))
    with open(__file__, 'rb') as f:
        me = hashlib.sha256(f.read()).hexdigest()[:16]
    chpasswd = [[path, os.stat(path).st_mtime, os.stat(path).st_size]
                for path in chpasswd_files()]
    return {'format': BASE_FORMAT, 'builder': me, 'pythons': pythons,
            'modules': WANTED_MODULES, 'chpasswd': chpasswd}


def build_base(cache, force=False):
    """vmlinux and base.cpio in CACHE; returns the kernel release."""
    debs = os.path.join(cache, 'debs')
    os.makedirs(debs, exist_ok=True)
    kpkg = kernel_package()
    release = kpkg[len('linux-image-'):]
    inputs = base_inputs(cache)
    inputs['kernel'] = kpkg
    stamp = os.path.join(cache, 'base.json')
    vmlinux = os.path.join(cache, 'vmlinux')
    base = os.path.join(cache, 'base.cpio')
    try:
        with open(stamp) as f:
            old = json.load(f)
    except (IOError, ValueError):
        old = None
    if not force and old == inputs and os.path.exists(vmlinux) and \
            os.path.exists(base):
        return release
    t0 = time.time()
    kdeb = download(debs, kpkg)
    bdeb = download(debs, 'busybox-static')
    tmpdir = tempfile.mkdtemp(prefix='guest-build.', dir=cache)
    try:
        root = os.path.join(tmpdir, 'root')
        os.mkdir(root)
        # Only the kernel image and the module tree are needed from the deb.
        log('unpacking %s' % os.path.basename(kdeb))
        run(['dpkg-deb', '-x', kdeb, root])
        run(['dpkg-deb', '-x', bdeb, root])
        log('extracting vmlinux')
        extract_vmlinux(os.path.join(root, 'boot', 'vmlinuz-' + release),
                        vmlinux)
        cpio = Cpio(base)
        for d in ('bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'proc', 'sys',
                  'dev', 'tmp', 'run', 'root', 'var/tmp', 'lib64',
                  'lib/x86_64-linux-gnu'):
            cpio.dir('/' + d, 0o1777 if d.endswith('tmp') else 0o755)
        cpio.chardev('/dev/console', 5, 1)
        cpio.chardev('/dev/null', 1, 3, 0o666)
        cpio.copy('/bin/busybox', os.path.join(root, 'bin', 'busybox'),
                  0o755)
        applets = output([os.path.join(root, 'bin', 'busybox'),
                          '--list-full']).split()
        for applet in applets:
            cpio.symlink('/' + applet, '/bin/busybox')
        modules = module_files(
            os.path.join(root, 'lib', 'modules', release), WANTED_MODULES)
        for name, data in modules:
            cpio.file('/lib/negotiator-modules/%s.ko' % name, data)
        cpio.file('/lib/negotiator-modules/order',
                  ''.join(n + '\n' for n, _ in modules).encode())
        log('modules: %s' % ' '.join(n for n, _ in modules))
        libs = set()
        for alias, path, _, _ in inputs['pythons']:
            add_python(cpio, alias, path, tmpdir, libs)
        for path, _, _ in inputs['chpasswd']:
            cpio.copy(path, path)
            libs.update(ldd(path))
        add_libs(cpio, libs, tmpdir)
        for name in ('os-release', 'debian_version'):
            if os.path.exists('/etc/' + name):
                cpio.copy('/etc/' + name, '/etc/' + name, 0o644)
        add_users(cpio)
        cpio.file('/etc/hostname', b'negotiator-guest\n')
        cpio.file('/etc/hosts', b'127.0.0.1 localhost negotiator-guest\n')
        cpio.close()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    with open(release_file(cache), 'w') as f:
        f.write(release + '\n')
    with open(stamp, 'w') as f:
        json.dump(inputs, f)
    log('base.cpio %.1f MB, vmlinux %.1f MB, in %.1f s' % (
        os.path.getsize(base) / 1e6, os.path.getsize(vmlinux) / 1e6,
        time.time() - t0))
    return release


def release_file(cache):
    return os.path.join(cache, 'kernel-release')


def write_overlay(path, negotiator=DEFAULT_NEGOTIATOR,
                  commands=DEFAULT_COMMANDS, files=None, guest_init=None):
    """The small archive: /init, negotiator.py, the commands, extra FILES.

    FILES maps guest paths to bytes (mode 0755 if it starts with '#!') or
    to a host path.  GUEST_INIT (text or bytes) becomes /guest-init.sh,
    which /init runs instead of the agent.
    """
    cpio = Cpio(path)
    cpio.copy('/init', INIT_SCRIPT, 0o755)
    cpio.copy(GUEST_NEGOTIATOR, negotiator, 0o644)
    cpio.dir(GUEST_COMMANDS_DIR)
    if commands:
        for name in sorted(os.listdir(commands)):
            src = os.path.join(commands, name)
            if os.path.isfile(src):
                cpio.copy(os.path.join(GUEST_COMMANDS_DIR, name), src)
    if guest_init is not None:
        if not isinstance(guest_init, bytes):
            guest_init = guest_init.encode()
        cpio.file('/guest-init.sh', guest_init, 0o755)
    for gpath, content in sorted((files or {}).items()):
        if isinstance(content, bytes):
            cpio.file(gpath, content,
                      0o755 if content.startswith(b'#!') else 0o644)
        else:
            cpio.copy(gpath, content)
    cpio.close()


def concatenate(dest, parts):
    tmp = '%s.%d.tmp' % (dest, os.getpid())
    with open(tmp, 'wb') as out:
        for part in parts:
            with open(part, 'rb') as f:
                shutil.copyfileobj(f, out, 1 << 20)
    os.rename(tmp, dest)


def build(cache=DEFAULT_CACHE, negotiator=DEFAULT_NEGOTIATOR,
          commands=DEFAULT_COMMANDS, force=False, install=True):
    """Everything; returns {'kernel': vmlinux, 'initrd': initrd.img, ...}."""
    os.makedirs(cache, exist_ok=True)
    if install:
        ensure_tools()
    release = build_base(cache, force)
    overlay = os.path.join(cache, 'overlay.cpio')
    write_overlay(overlay, negotiator, commands)
    initrd = os.path.join(cache, 'initrd.img')
    base = os.path.join(cache, 'base.cpio')
    concatenate(initrd, [base, overlay])
    return {'kernel': os.path.join(cache, 'vmlinux'), 'initrd': initrd,
            'base': base, 'overlay': overlay, 'release': release}


def paths(cache=DEFAULT_CACHE):
    """The built files, without building (None where missing)."""
    names = {'kernel': 'vmlinux', 'initrd': 'initrd.img', 'base': 'base.cpio',
             'overlay': 'overlay.cpio'}
    result = {}
    for key, name in names.items():
        p = os.path.join(cache, name)
        result[key] = p if os.path.exists(p) else None
    return result
