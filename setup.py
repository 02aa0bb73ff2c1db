"""What setup.cfg cannot say: the native data plane's cffi module (routeproxy/native/build.py,
docs/fastpath.md), compiled at install as pypcap is, with the same compiler and libpcap-dev."""
from setuptools import setup

setup(cffi_modules=["routeproxy/native/build.py:ffibuilder"])
