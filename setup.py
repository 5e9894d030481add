"""Build script: metadata lives in pyproject.toml; this file exists for native extensions (csrc/)."""

from setuptools import setup

setup()
