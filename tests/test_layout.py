"""The repository's top-level kernels/ folder never shadows Hugging Face's `kernels` package (transformers >= 5.25
imports it), and fastadapters.kernels still imports from a source tree, an editable install and a wheel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}]  # the repo root first, as `python -m ...` from the root and pytest's pythonpath do
    import kernels
    assert kernels.__file__ == {fake!r}, ("top-level `kernels` resolved to", kernels)
    from kernels import CUDAProperties  # what transformers 5.25 imports from it
    import fastadapters.kernels.lora_ref
    assert fastadapters.kernels.lora_ref.__file__ == {lora_ref!r}, fastadapters.kernels.lora_ref.__file__
    print("OK")
""")


def test_no_top_level_kernels_package_in_the_repo():
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes `import kernels` ours"


def test_hf_kernels_package_wins_over_the_repo_folder(tmp_path):
    fake = tmp_path / "site" / "kernels" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("class CUDAProperties: pass\n")
    code = CHECK.format(repo=str(REPO), fake=str(fake), lora_ref=str(REPO / "kernels" / "lora_ref.py"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


def test_kernels_folder_imports_as_fastadapters_kernels_without_an_install(tmp_path):
    # a plain source tree: only the repo root on sys.path, no editable finder (python -I drops site-packages' .pth)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import fastadapters.kernels.bottleneck_ref as m; "
            "print(m.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(REPO / "kernels" / "bottleneck_ref.py")
