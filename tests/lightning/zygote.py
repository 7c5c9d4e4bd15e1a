"""Run many short 2-rank Lightning jobs cheaply: one process per rank imports the stack once
(~7 s) and forks a child per job; Lightning sees an externally launched rank (``LOCAL_RANK`` set).

    python -m tests.lightning.zygote RANK WORLD

reads one JSON command per line on stdin -- ``{"out": dir, "cfg": {...}, "port": p}`` -- forks a
child that runs ``fit_job.main(out, cfg)`` and prints ``{"pid": ...}`` when it starts and
``{"rc": ..., "signal": ...}`` when it ends. :class:`Pair` drives two of them from a test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.envs import DIST_ENV


def serve(rank: int, world: int) -> None:
    import lightning.pytorch  # noqa: F401  (imported once, inherited by every job)
    import torch
    import torchrec  # noqa: F401

    from . import fit_job  # noqa: F401

    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the job
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cmd["port"]),
                              RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
                              WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
            code = 0
            try:
                os.makedirs(cmd["out"], exist_ok=True)
                with open(os.path.join(cmd["out"], f"log-{rank}.txt"), "w") as log:
                    os.dup2(log.fileno(), 1)
                    os.dup2(log.fileno(), 2)
                    fit_job.main(cmd["out"], cmd["cfg"])
            except BaseException:  # noqa: BLE001 - report through the exit code
                import traceback

                with open(os.path.join(cmd["out"], f"error-{rank}.txt"), "w") as err:
                    traceback.print_exc(file=err)
                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -sig
        print(json.dumps({"rc": rc, "signal": sig}), flush=True)


class Pair:
    """Two zygotes (ranks 0 and 1) and a way to run a job on both."""

    def __init__(self, root: str, world: int = 2) -> None:
        env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV},  # never inherited
           "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-m", "tests.lightning.zygote", str(r),
                                        str(world)], cwd=root, env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, bufsize=1)
                      for r in range(world)]
        for p in self.procs:
            assert json.loads(p.stdout.readline()).get("ready"), "zygote did not start"

    def run(self, out: str, cfg: dict, port: int, grace: float = 20.0) -> list[dict]:
        """Run one job on every rank; returns each rank's ``{"rc", "signal"}``. Once one rank
        has ended abnormally, the others get ``grace`` seconds, then SIGKILL (a job whose rank
        died must not hang the test)."""
        for p in self.procs:
            p.stdin.write(json.dumps({"out": out, "cfg": cfg, "port": port}) + "\n")
            p.stdin.flush()
        pids = [json.loads(p.stdout.readline())["pid"] for p in self.procs]
        results: list[dict | None] = [None] * len(self.procs)
        deadline = None
        import selectors

        sel = selectors.DefaultSelector()
        for i, p in enumerate(self.procs):
            sel.register(p.stdout, selectors.EVENT_READ, i)
        while any(r is None for r in results):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = sel.select(timeout)
            if not events and deadline is not None:
                for i, pid in enumerate(pids):
                    if results[i] is None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                deadline = time.monotonic() + 60
                continue
            for key, _ in events:
                i = key.data
                results[i] = json.loads(self.procs[i].stdout.readline())
                sel.unregister(self.procs[i].stdout)
                if results[i]["rc"] != 0 and deadline is None:
                    deadline = time.monotonic() + grace
        sel.close()
        return results

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
            p.wait(timeout=30)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
