"""Build hook: compiles the cffi extension that binds <linux/kvm.h>.

All metadata lives in pyproject.toml; setuptools needs this file only for
cffi's ``cffi_modules`` keyword.
"""

from setuptools import setup

setup(cffi_modules=["pyvmm/kvm/_build.py:ffibuilder"])
