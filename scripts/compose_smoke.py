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
6. ``--scale <worker>=2``: two workers in separate containers that mount no volume and sit only on the
   internal network with Redis and the API; four jobs run across them (two at a time), all succeed, and
   every downloaded artifact's sha256 is the manifest's.
7. A worker killed during its upload (a one-off worker with a slow link): the job ends ``failed`` with the
   reaper's message, the API saw the upload cut off, and no partial file is left in its storage.
8. ``/metrics`` counts those jobs by state (succeeded and failed); ``/`` serves the web page with its CSP.
9. ``down -v``: no container of the project is left.
"""

from __future__ import annotations

import argparse
import hashlib
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
# The steps about where jobs run and how their files travel need jobs, not good students: a quarter of the
# demo's steps (the two-worker and killed-upload steps took 138 s and 62 s with the demo's own budget).
TRANSPORT_CONFIG = {**CONFIG, "generator": {**CONFIG["generator"], "steps": 150},
                    "distill": {**CONFIG["distill"], "steps": 200, "eval_every": 50}}
# The one-off worker killed mid-upload sends this many bytes/s: curves.png (~50 kB, uploaded first) takes ~6 s.
SLOW_LINK = 8192
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


def inspect(target: str, fmt: str, kind: str = "container") -> Any:
    """``docker <kind> inspect -f '{{json <fmt>}}'``, parsed."""
    done = subprocess.run(["docker", kind, "inspect", "-f", f"{{{{json {fmt}}}}}", target], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def check_isolated(containers: list[str], api: str) -> None:
    """Each worker mounts nothing (so nothing in common with the API or each other) and is only on networks
    with no route out, where it reaches Redis and the API."""
    api_mounts = {m.get("Name") or m["Source"] for m in inspect(api, ".Mounts")}
    for c in containers:
        mounts = inspect(c, ".Mounts")
        check(not mounts, f"worker {c[:12]} mounts {mounts} (the API mounts {sorted(api_mounts)})")
        networks = list(inspect(c, ".NetworkSettings.Networks"))
        internal = [inspect(n, ".Internal", "network") for n in networks]
        check(bool(networks) and all(internal), f"worker {c[:12]} is on {networks} (internal: {internal})")


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


def check_against_manifest(client: KegnetClient, job_id: str, out: Path) -> int:
    """Download every artifact (the client checks each against the job's listing) and check each file's
    sha256 against the one the run's manifest recorded. Returns how many files were checked."""
    files = {p.name: p for p in client.download(job_id, out)}
    recorded = json.loads(files["manifest.json"].read_text())["files"]
    check(set(recorded) == set(files) - {"manifest.json"}, f"{job_id}: manifest lists {sorted(recorded)}, "
                                                           f"downloaded {sorted(files)}")
    for name, info in recorded.items():
        digest = hashlib.sha256(files[name].read_bytes()).hexdigest()
        check(digest == info["sha256"], f"{job_id}/{name}: sha256 {digest}, the manifest says {info['sha256']}")
    return len(files)


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

    with step(f"--scale {args.service}=2: four jobs across two isolated workers; sha256s as in the manifests"):
        stack.run("up", "-d", "--no-deps", "--scale", f"{args.service}=2", args.service)
        wait_for("two live workers", lambda: len(ready_workers(url)) >= 2, timeout)
        workers = stack.containers(args.service)
        check_isolated(workers, stack.containers("api")[0])
        batch = [client.submit(ckpt, MODEL, TRANSPORT_CONFIG, seed=s, device="auto")["id"] for s in (3, 4, 5, 6)]
        wait_for("two jobs running at once",
                 lambda: sum(client.status(j)["status"] == "running" for j in batch) == 2, timeout)
        for j in batch:
            expect_succeeded(wait_finished(client, j, timeout))
        checked = sum(check_against_manifest(client, j, out / f"batch-{j}") for j in batch)
        ran_on = {j: [c for c in workers if f"job {j} started on" in stack.logs(c)] for j in batch}
        check(all(len(c) == 1 for c in ran_on.values()) and {c[0] for c in ran_on.values()} == set(workers),
              f"containers per job: {ran_on}")
        print(f"[smoke]   {len(batch)} jobs on {len(workers)} workers (no mounts, internal network only); "
              f"{checked} artifacts match their manifests")

    with step("a worker killed during its upload: job failed by the reaper, no partial file"):
        stack.run("up", "-d", "--no-deps", "--scale", f"{args.service}=0", args.service)
        slow = stack.run("run", "-d", "--no-deps", "-e", f"KEGNET_TRANSFER_RATE_BYTES_S={SLOW_LINK}",
                         args.service).strip().splitlines()[-1]
        try:
            cut = client.submit(ckpt, MODEL, TRANSPORT_CONFIG, seed=7, device="auto")["id"]
            wait_for(f"job {cut} to upload", lambda: client.status(cut)["stage"] == "upload", timeout)
            time.sleep(2)  # into its first file
            subprocess.run(["docker", "kill", slow], check=True, capture_output=True)
            lost = wait_finished(client, cut, timeout)
        finally:
            subprocess.run(["docker", "rm", "-f", slow], capture_output=True)
        check(lost["status"] == "failed" and lost["error"] == LOST, f"job is {lost['status']}: {lost.get('error')}")
        api = stack.containers("api")[0]
        seen = wait_for("the API to log the cut", lambda: re.search(rf"upload of {cut}/(\S+) interrupted",
                                                                     stack.logs(api)), 30)
        left = stack.run("exec", "-T", "api", "sh", "-c",
                         f"ls /data/tmp; ls /data/jobs/{cut}/out 2>/dev/null || true").split()
        check(not any(n.endswith(".part") for n in left) and seen.group(1) not in left,
              f"{seen.group(1)} was cut off; the API's storage holds {left}")
        print(f"[smoke]   {cut}: {seen.group(1)} cut off; failed: {lost['error']}; left in storage: {left}")
    client.close()

    with step("/metrics counts the jobs by state; the web page is served"):
        counts = jobs_by_state(httpx.get(f"{url}/metrics", timeout=10).text)
        succeeded = {first, nxt, *batch}
        check(counts.get("succeeded", 0) >= len(succeeded) and counts.get("failed", 0) >= 2,
              f"/metrics says {counts}; expected at least {len(succeeded)} succeeded and 2 failed")
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
