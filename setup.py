from setuptools import setup

# Triton kernels live in the top-level kernels/ folder and ship inside the package as fastadapters.kernels.
setup(
    packages=["fastadapters", "fastadapters.ops", "fastadapters.tuners", "fastadapters.kernels"],
    package_dir={"fastadapters": "fastadapters", "fastadapters.kernels": "kernels"},
)
