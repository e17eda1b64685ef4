"""
train.py's main as one of several processes, as torchrun starts them (RANK, WORLD_SIZE, ...), for
the tests of data-parallel training: each process's output in files, its exit status, and a
fault made to happen in one of them at a given step.
"""

import importlib
import multiprocessing
import os
import socket
import sys
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, args, folder, fault):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TQDM_DISABLE="1")
    folder = Path(folder)
    for fd, name in ((1, "out"), (2, "err")):  # what the process itself writes, whatever sys.stdout becomes
        f = open(folder / f"rank{rank}.{name}", "w")
        os.dup2(f.fileno(), fd)
    sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
    import torch

    torch.set_num_threads(1)
    from machinery import cli
    import train

    mine = fault if fault and fault[0] == rank else None  # (rank, step, what): what goes wrong in that process
    real, calls = train.target_loss, {"n": 0}

    def target_loss(*a):  # counts the training passes (one a step here); `what`, an exception, raises in step `step`'s
        calls["n"] += torch.is_grad_enabled()
        if mine and isinstance(mine[2], BaseException) and torch.is_grad_enabled() and calls["n"] == mine[1]:
            raise mine[2]
        return real(*a) * (1e6 if fault and fault[2] == "huge gradients" else 1)  # in every process: clipped steps

    train.target_loss = target_loss
    generate = importlib.import_module("mini_gpt2.generate")  # the module (mini_gpt2.generate is also its function)
    real_decode, decodes = generate.decode, {"n": 0}

    def decode(*a):  # counts the batches this process decodes
        decodes["n"] += 1
        return real_decode(*a)

    generate.decode = decode
    if mine and mine[2] in ("checkpoint", "best"):  # writing the checkpoint, or the best file, of step `step` fails
        from machinery import run_folder
        from mini_gpt2 import UserError

        name = {"checkpoint": "_checkpoint", "best": "save_learned"}[mine[2]]
        real_write = getattr(run_folder.Run, name)

        def write(self, *a):
            if self.step == mine[1]:
                raise UserError(f"no space left on device for its {mine[2]}")
            return real_write(self, *a)

        setattr(run_folder.Run, name, write)
    code = 0
    try:
        cli.run(lambda: train.main(args))
    except SystemExit as e:
        code = e.code
    (folder / f"rank{rank}.passes").write_text(str(calls["n"]))
    (folder / f"rank{rank}.decodes").write_text(str(decodes["n"]))
    (folder / f"rank{rank}.code").write_text(str(code))


def processes(args, folder, world=2, fault=None, timeout=1800):
    """
    Run train.main(args) as `world` processes; -> [(exit status, stdout, stderr)] by rank (and in
    `folder`, rank{r}.passes and .decodes: how many training passes each began, how many batches
    it decoded). A run
    that does not end within `timeout` seconds (hung) fails the test that called it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, [str(a) for a in args], str(folder), fault))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        p.kill() if p.is_alive() else None
    assert not hung, f"processes {hung} hung"
    read = lambda r, name: (folder / f"rank{r}.{name}").read_text() if (folder / f"rank{r}.{name}").exists() else ""  # noqa: E731
    return [(int(read(r, "code") or -1), read(r, "out"), read(r, "err")) for r in range(world)]
