"""On a terminal, long work shows a progress bar (bytes, rate, ETA); in a pipe, nothing but
the result. The terminal is a real pseudo-terminal made by util-linux's `script`."""
import os
import shutil
import subprocess
import sys

import pytest

from tests import images


@pytest.mark.skipif(not shutil.which("script"), reason="util-linux script is not installed")
def test_progress_bar_on_a_terminal(alike, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    img = tmp_path / "big.raw"
    images.random_image(img, 192)
    cmd = f"{sys.executable} -m alike_ray.cli backup --store {store} image:{img} --name big"
    env = dict(os.environ, RAY_ADDRESS=alike.address, COLUMNS="120")
    p = subprocess.run(["script", "-qefc", cmd, "/dev/null"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    screen = p.stdout
    assert "backup" in screen and "B/s" in screen, screen  # a bar with its rate was drawn
    assert "big@" in screen  # then the result line
    # in a pipe: no bar
    p = alike("backup", "--store", store, f"image:{img}", "--name", "big")
    assert p.returncode == 0 and "B/s" not in p.stderr + p.stdout
