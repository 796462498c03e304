"""The package layout: the repository's top-level folders are the subpackages of ``confide``.

``node/`` installs as ``confide.node``, ``protos/`` as ``confide.protos``, and the generated
code in ``protos/confide/v1/`` as ``confide.v1`` (the name of its protobuf package), so a wheel
holds one top-level package and the repository keeps its folders (docs/ARCHITECTURE.md says
why). Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

#: repository folder -> subpackage of ``confide``
FOLDERS = ("protos", "node", "coordinator", "privacy", "agents", "sdk", "cluster", "cli", "bench")

package_dir = {"confide": "confide", "confide.v1": "protos/confide/v1"}
packages = ["confide", "confide.v1"]
for folder in FOLDERS:
    package_dir[f"confide.{folder}"] = folder
    packages.append(f"confide.{folder}")
    packages += [f"confide.{folder}.{sub}"
                 for sub in find_packages(folder, exclude=["confide", "confide.*"])]

setup(packages=packages, package_dir=package_dir,
      package_data={"confide.v1": ["*.proto", "*.pyi"],
                    # the dashboard's page, script and vendored chart library (no CDN)
                    "confide.coordinator.dashboard": ["static/*.*", "static/vendor/*"]})
