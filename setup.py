"""Packages are found, not listed: every folder with an ``__init__.py`` under the four source roots ships.

``hf_prune/``, ``integrations/``, ``model_patches/`` and ``evals/`` all install inside the ``hf_prune``
namespace (DESIGN.md §1); nothing installs as a top-level ``integrations`` or ``evals``.
"""

from setuptools import find_packages, setup

SOURCE_ROOTS = {
    "hf_prune": "hf_prune",
    "hf_prune.integrations": "integrations",
    "hf_prune.model_patches": "model_patches",
    "hf_prune.evals": "evals",
}

packages = []
for package, folder in SOURCE_ROOTS.items():
    packages += [
        package,
        *(f"{package}.{sub}" for sub in find_packages(folder) if not sub.startswith("hf_prune")),
    ]

setup(package_dir=SOURCE_ROOTS, packages=packages)
