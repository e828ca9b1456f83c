"""The compiled per-chunk work (framing walker, relay pump); everything else is in pyproject.toml.

It is optional: without a C compiler the install goes on and slotproxy uses the
same code in Python (wire.Walker, relay.PyPump), which costs more CPU per message.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("slotproxy._walker", ["slotproxy/_walker.c"], optional=True)])
