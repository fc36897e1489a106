"""Integrations are imported lazily, and a missing framework names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_integrations_package_imports_no_framework():
    out = _run(
        "import sys, sgdlens.integrations;"
        "heavy = {'lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'tensorboard'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        (
            "sgdlens.integrations.lightning",
            ["lightning", "lightning.pytorch", "pytorch_lightning"],
            "lightning",
        ),
        ("sgdlens.integrations.transformers", ["transformers"], "transformers"),
    ],
)
def test_a_missing_framework_raises_import_error_naming_the_extra(module, blocked, extra):
    block = "".join(f"sys.modules[{name!r}] = None;" for name in blocked)
    out = _run(
        f"import sys; {block}\ntry:\n    import {module}\nexcept ImportError as e:\n    print(e)\n"
    )
    assert out.returncode == 0, out.stderr
    assert f'pip install "sgdlens[{extra}]"' in out.stdout
