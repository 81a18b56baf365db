"""Packaging for negotiator: one module, one console script."""

import re

from setuptools import setup


def read_module():
    with open('negotiator.py') as handle:
        return handle.read()


SOURCE = read_module()
VERSION = re.search(r"^__version__ = '([^']+)'", SOURCE, re.M).group(1)
DOC = re.search(r'^"""(.*?)"""', SOURCE, re.M | re.S).group(1)

setup(
    name='negotiator',
    version=VERSION,
    description=DOC.strip().splitlines()[0],
    long_description=DOC.strip(),
    license='MIT',
    py_modules=['negotiator'],
    install_requires=['six'],
    entry_points={'console_scripts': ['negotiator = negotiator:main_exit']},
    python_requires='>=2.6, !=3.0.*, !=3.1.*, !=3.2.*, !=3.3.*, !=3.4.*, !=3.5.*',
    classifiers=[
        'Environment :: Console',
        'License :: OSI Approved :: MIT License',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: Python :: 2',
        'Programming Language :: Python :: 2.6',
        'Programming Language :: Python :: 2.7',
        'Programming Language :: Python :: 3',
        'Topic :: System :: Systems Administration',
    ],
)
