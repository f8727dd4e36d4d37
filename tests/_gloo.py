"""The multi-rank harness of the distributed tests: ranks as fresh interpreters over a gloo
process group on 127.0.0.1, and a process group of the test process alone.

Parent side (through conftest.py's ``gloo_spawn`` and ``world_of_one`` fixtures):
:func:`spawn` runs ``world`` ranks of ``python tests/_gloo.py TEST_FILE RANK WORLD PORT OUT``
with a hard timeout (a hang fails instead of blocking CI) and returns each rank's results.
Process start-up (the torch import) costs seconds, so a test file runs every case of one world
size in one spawn.

Rank side (this file as a script): TRITON_INTERPRET=1 is set before anything imports triton
(the kernels run interpreted on the ranks' CPU tensors), ``TEST_FILE`` is imported by path, the
gloo group is initialised, and ``TEST_FILE``'s ``run_rank(rank, world) -> dict`` runs; its
result is written to ``OUT/rank{RANK}.pt``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(test_file: str, world: int, out_dir: Path, timeout_s: float) -> list[dict]:
    """Run ``world`` ranks of ``test_file``'s ``run_rank``; kill them all past ``timeout_s``
    (the whole spawn: start-up, every case, teardown). Fails the test with each failed rank's
    output tail."""
    import pytest
    import torch

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    port = _free_port()
    logs = [open(out_dir / f"rank{r}.log", "w+b") for r in range(world)]  # noqa: SIM115
    procs = [
        subprocess.Popen([sys.executable, __file__, str(test_file), str(r), str(world),
                          str(port), str(out_dir)], env=env, stdout=logs[r],
                         stderr=subprocess.STDOUT)
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    tails = []
    for r, _ in failed:
        logs[r].seek(0)
        tails.append(f"--- rank {r} ---\n" + logs[r].read().decode(errors="replace")[-3000:])
    for f in logs:
        f.close()
    if failed:
        pytest.fail(f"{Path(test_file).name}, world size {world}: ranks (rank, returncode) "
                    f"{failed} failed or timed out after {timeout_s} s\n" + "\n".join(tails))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@contextlib.contextmanager
def world_of_one(store: Path, device):
    """An initialized process group of this process alone (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run_rank(test_file: str, rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location(Path(test_file).stem, test_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        results = module.run_rank(rank, world)
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    if len(sys.argv) != 6:
        raise SystemExit("usage: _gloo.py TEST_FILE RANK WORLD PORT OUT_DIR")
    _run_rank(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
