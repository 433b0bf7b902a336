from setuptools import setup

# Triton kernels live in the top-level kernels/ folder (no __init__.py: nothing here is importable as the top-level
# name `kernels`, which is Hugging Face's package) and ship inside the package as the namespace subpackage
# fastadapters.kernels, with the offline tuner's per-device config tables (kernels/configs/*.json).
setup(
    packages=["fastadapters", "fastadapters.ops", "fastadapters.tuners", "fastadapters.kernels"],
    package_dir={"fastadapters": "fastadapters", "fastadapters.kernels": "kernels"},
    package_data={"fastadapters.kernels": ["configs/*.json", "configs/README.md"]},
)
