"""The compose smoke test's steps, over real HTTP against the running containers.

    python scripts/compose_smoke.py --url http://127.0.0.1:18000 --service worker-cpu -- docker-compose -p ...

``scripts/compose-smoke.sh`` builds the images and calls this with its compose command (everything after
``--``); run alone, the stack must not be up yet. Each step prints its time; a failed check exits non-zero
with what was seen. The steps:

1. ``up``: redis, api and one worker; ``/readyz`` answers ready.
2. A key from ``compose exec api python -m service.keys create``; a request without it gets 401.
3. The demo's digits teacher (trained here, in seconds) compressed by a job: succeeded, downloaded, and the
   student (``student.pt2``) checked on held-out digits the service never saw.
4. The worker container killed mid-job: that job ends ``failed`` with the reaper's "worker lost" message,
   while the restarted worker runs the next job to ``succeeded``.
5. Redis restarted: the finished jobs and their artifacts are still there (its AOF volume).
6. ``--scale <worker>=2``: two jobs run at the same time, on two containers, and both succeed.
7. ``/metrics`` counts those jobs by state (succeeded and failed); ``/`` serves the web page with its CSP.
8. ``down -v``: no container of the project is left.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from jobs.reaper import LOST
from kegnet.client import KegnetClient
from kegnet.demo import CONFIG, MODEL, accuracy, load_digits_split, train_teacher

# A job that is still in its generator stage minutes after it starts: the one the worker dies under.
LONG_CONFIG = {**CONFIG, "generator": {**CONFIG["generator"], "steps": 20000}}
TIMINGS: list[tuple[str, float]] = []


class SmokeFailure(RuntimeError):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SmokeFailure(message)


@contextmanager
def step(name: str) -> Iterator[None]:
    print(f"[smoke] {name} ...", flush=True)
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    TIMINGS.append((name, dt))
    print(f"[smoke] {name}: ok ({dt:.1f} s)", flush=True)


class Stack:
    """The compose project under test: its command line and the few docker calls the steps need."""

    def __init__(self, compose: list[str], worker: str) -> None:
        self.compose = compose
        self.worker = worker

    def run(self, *args: str, timeout: float = 600) -> str:
        cmd = [*self.compose, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SmokeFailure(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        args = ["ps", "-q"] + (["-a"] if all_states else []) + ([service] if service else [])
        return self.run(*args).split()

    def started_at(self, service: str) -> str:
        (container,) = self.containers(service)
        return subprocess.run(["docker", "inspect", "-f", "{{.State.StartedAt}}", container], capture_output=True,
                              text=True, check=True).stdout.strip()

    def logs(self, container: str) -> str:
        done = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr


def wait_for(what: str, probe: Callable[[], Any], timeout: float, poll: float = 0.5) -> Any:
    """Call ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(poll)
    raise SmokeFailure(f"timed out after {timeout:.0f} s waiting for {what} (last seen: {last!r})")


def ready_workers(url: str) -> list[str]:
    r = httpx.get(f"{url}/readyz", timeout=5)
    return r.json()["workers"] if r.status_code == 200 else []


def jobs_by_state(text: str) -> dict[str, float]:
    """``kegnet_jobs{state="..."} N`` lines of a /metrics page (Prometheus text format)."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^kegnet_jobs\{state="([a-z]+)"\} ([0-9.e+]+)$', text, re.MULTILINE)}


def wait_finished(client: KegnetClient, job_id: str, timeout: float) -> dict[str, Any]:
    return wait_for(f"job {job_id} to finish",
                    lambda: (j := client.status(job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                    timeout, poll=1.0)


def expect_succeeded(job: dict[str, Any]) -> None:
    check(job["status"] == "succeeded", f"job {job['id']} is {job['status']}: {job.get('error')}")


def check_student(client: KegnetClient, job_id: str, out: Path, teacher: torch.nn.Module,
                  x_te: torch.Tensor, y_te: torch.Tensor) -> str:
    files = client.download(job_id, out)
    names = {p.name for p in files}
    check({"student.safetensors", "student.pt2", "manifest.json"} <= names, f"artifacts: {sorted(names)}")
    manifest = json.loads((out / "manifest.json").read_text())
    student = torch.export.load(out / "student.pt2").module()  # the service's own output
    acc_t, acc_s = accuracy(teacher, x_te, y_te), accuracy(student, x_te, y_te)
    ratio = manifest["compression_ratio"]
    check(ratio > 1.5, f"compression ratio {ratio:.2f}")
    check(acc_s >= acc_t - 0.05, f"student {acc_s:.2%} against teacher {acc_t:.2%} on held-out digits")
    return f"{ratio:.2f}x smaller, held-out accuracy {acc_s:.2%} (teacher {acc_t:.2%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the API as published on this host")
    parser.add_argument("--service", default="worker-cpu", help="the worker service to kill and scale")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each wait")
    parser.add_argument("compose", nargs=argparse.REMAINDER, help="-- and the compose command line")
    args = parser.parse_args(argv)
    compose = args.compose[1:] if args.compose[:1] == ["--"] else args.compose
    check(bool(compose), "give the compose command after --")
    stack, url, timeout = Stack(compose, args.service), args.url.rstrip("/"), args.timeout
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="kegnet-smoke-"))

    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    teacher = train_teacher(x_tr, y_tr, 0)
    from safetensors.torch import save_file

    ckpt = out / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(ckpt))

    with step("up: redis, api and one worker; /readyz ready"):
        stack.run("up", "-d", "redis", "api", args.service)
        wait_for("/readyz", lambda: ready_workers(url), timeout)

    with step("key from `exec api python -m service.keys create`"):
        key = stack.run("exec", "-T", "api", "python", "-m", "service.keys", "create",
                        "--name", "smoke").strip().splitlines()[-1]
        check(key.startswith("kgn_"), f"no key in the output: {key!r}")
        check(httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 401, "a request without a key was let in")
    client = KegnetClient(url, key)

    with step("demo job: submit, follow to succeeded, download, check the student"):
        first = client.submit(ckpt, MODEL, CONFIG, seed=0, device="auto")["id"]
        expect_succeeded(wait_finished(client, first, timeout))
        print(f"[smoke]   {check_student(client, first, out / 'first', teacher, x_te, y_te)}")

    with step("worker killed mid-job: reaper fails it; the restarted worker runs the next job"):
        doomed = client.submit(ckpt, MODEL, LONG_CONFIG, seed=1, device="auto")["id"]
        wait_for(f"job {doomed} to run", lambda: client.status(doomed)["progress"] > 0, timeout)
        subprocess.run(["docker", "kill", *stack.containers(args.service)], check=True, capture_output=True)
        stack.run("up", "-d", "--no-deps", args.service)
        nxt = client.submit(ckpt, MODEL, CONFIG, seed=2, device="auto")["id"]
        lost = wait_finished(client, doomed, timeout)
        check(lost["status"] == "failed" and lost["error"] == LOST,  # the reaper's words, not the worker's
              f"killed job is {lost['status']}: {lost.get('error')}")
        print(f"[smoke]   {doomed}: failed: {lost['error']}")
        expect_succeeded(wait_finished(client, nxt, timeout))

    with step("redis restarted: finished jobs and artifacts still there"):
        before = {j: client.status(j)["status"] for j in (first, doomed, nxt)}
        started = stack.started_at("redis")
        stack.run("restart", "redis")
        check(stack.started_at("redis") != started, "the redis container did not restart")
        wait_for("/readyz after the restart", lambda: ready_workers(url), timeout)
        after = {j: client.status(j)["status"] for j in (first, doomed, nxt)}
        check(after == before, f"before {before}, after {after}")
        check(len(client.download(first, out / "again", ["manifest.json"])) == 1, "manifest gone")

    with step(f"--scale {args.service}=2: two jobs at once on two workers, both succeed"):
        stack.run("up", "-d", "--no-deps", "--scale", f"{args.service}=2", args.service)
        wait_for("two live workers", lambda: len(ready_workers(url)) >= 2, timeout)
        pair = [client.submit(ckpt, MODEL, CONFIG, seed=s, device="auto")["id"] for s in (3, 4)]
        wait_for("both jobs running at once",
                 lambda: all(client.status(j)["status"] == "running" for j in pair), timeout)
        for j in pair:
            expect_succeeded(wait_finished(client, j, timeout))
        ran_on = {j: [c for c in stack.containers(args.service) if f"job {j} started on" in stack.logs(c)]
                  for j in pair}
        check(all(len(c) == 1 for c in ran_on.values()) and ran_on[pair[0]] != ran_on[pair[1]],
              f"containers per job: {ran_on}")
        print(f"[smoke]   {pair[0]} on {ran_on[pair[0]][0][:12]}, {pair[1]} on {ran_on[pair[1]][0][:12]}")
    client.close()

    with step("/metrics counts the jobs by state; the web page is served"):
        counts = jobs_by_state(httpx.get(f"{url}/metrics", timeout=10).text)
        succeeded = {first, nxt, *pair}
        check(counts.get("succeeded", 0) >= len(succeeded) and counts.get("failed", 0) >= 1,
              f"/metrics says {counts}; expected at least {len(succeeded)} succeeded and 1 failed")
        page = httpx.get(f"{url}/", timeout=10)
        check(page.status_code == 200 and "script-src 'self'" in page.headers.get("content-security-policy", ""),
              f"GET / answered {page.status_code} without the page's CSP")
        print(f"[smoke]   kegnet_jobs: {counts}")

    with step("down -v: nothing left running"):
        stack.run("down", "-v", "--remove-orphans")
        left = stack.containers(all_states=True)
        check(not left, f"containers left: {left}")

    width = max(len(name) for name, _ in TIMINGS)
    print(f"\n{'step':<{width}}  {'seconds':>8}")
    for name, dt in TIMINGS:
        print(f"{name:<{width}}  {dt:>8.1f}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SmokeFailure as exc:
        print(f"[smoke] FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
