"""Build script: metadata lives in pyproject.toml; this file is for native extensions."""

from setuptools import setup

setup()
