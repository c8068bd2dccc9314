"""`bagel-ft data trajectories` against a slow, faulty, rate-limited OpenAI-compatible server: how full the
allowed requests stay, how fast it goes, and whether any record or paid call is lost or repeated.

The server is the tests' fake (tests/fake_openai_server.py) on 127.0.0.1, answering after `--latency`
seconds (asyncio.sleep on one event loop: latency-bound, not CPU-bound, so a shared machine measures the
client, not the server): scene graphs for the extractor, "consistent" for the VLM judge. Each scenario runs
the real CLI as a user would (`python -m commands.data trajectories`, LLM extractor + VLM judge, 64 px shapes
editor, concurrency `--concurrency`; `--code DIR`: another checkout's CLI, e.g. a baseline) in a process of
its own, re-runs it until its shard is complete (and once more when replies were rejected invalid: a re-run
asks again), and compares:
  in flight / allowed    server: requests being handled by the server, averaged over the first run (first
                         request to last reply), divided by the concurrency; "to last start": until the last
                         prompt's first request (after it the queue is empty and the run drains). client: the
                         client's own count (a slot held from sending to the parsed reply), first run (to the last
                         prompt's start). The server's figure is below the client's by the time a request
                         spends in the client's process (built, sent, its reply read and parsed): on a loaded
                         machine the pipeline's CPU work delays that (compare the ceiling row)
  limit                  the client's mean allowed concurrency (AIMD lowers it under sustained 429s)
  requests/s, answered/s requests per second of the first run, faults included, and those answered in full;
                         the latter's ratio to the ideal, concurrency / latency (or the server's rate limit:
                         60% of the fault-free run's rate, below what the machine allows, so that it binds)
  records                vs the fault-free scenario: lost / duplicated / different, after all the runs
  repeated               requests sent again after the server had answered them in full (a billed call paid
                         twice), counted once each; with SIGKILL only the ones in flight at the kill can be
The fault-free scenario runs first and is the reference for the others. Then a ceiling: the endpoint client
alone sends as many trivial requests at the same concurrency (no pipeline, no images, no cache): on a
loaded shared machine it shows how much of the ideal the machine itself allows.

    OMP_NUM_THREADS=1 python benchmarks/data_synthesis.py                      # the table in docs/benchmarks.md
    OMP_NUM_THREADS=1 python benchmarks/data_synthesis.py --prompts 120 --latency 0.2 --only 0,1   # quick look
    git archive <commit> | tar -x -C /tmp/base       # the same rows for an earlier version, as a baseline:
    OMP_NUM_THREADS=1 python benchmarks/data_synthesis.py --only 1 --code /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fake_openai_server import FakeOpenAIServer, first_user_text, scene_graph_reply  # noqa: E402

from data_gen.runner import shapes_prompts  # noqa: E402
from data_gen.shards import merge, read_manifests, shard_files  # noqa: E402

FAULTS = {"429@1": 0.10, "500": 0.05, "malformed": 0.02}  # the goal: 10% 429 + 5% 500 + 2% malformed
TRANSPORT = {**FAULTS, "cutoff": 0.01, "cutoff_eof": 0.01, "reset": 0.01}
CONSISTENT = json.dumps({"verdict": "consistent", "analysis": "", "fix": ""})
# name, random faults, server rate limit (share of the fault-free run's rate), signal sent after 40% of the chunks
SCENARIOS = [
    ("no faults", {}, None, None),
    ("10% 429 + 5% 500 + 2% malformed", FAULTS, None, None),
    ("same + 1% each: cut-off body (2 kinds), reset", TRANSPORT, None, None),
    ("server rate limit: 60% of the no-fault rate (429 + Retry-After)", {}, 0.6, None),
    ("faults as row 2 + Ctrl-C at 40%, re-run", FAULTS, None, signal.SIGINT),
    ("faults as row 2 + SIGKILL at 40%, re-run", FAULTS, None, signal.SIGKILL),
]


def answer(body: dict) -> str:
    """A perfect model, cheaply: the prompt's scene graph; every drawn step consistent (the shapes editor
    draws exactly what is asked)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    if isinstance(user, list):
        return CONSISTENT
    if user.startswith(CEILING_TEXT):
        return "{}"
    return json.dumps(scene_graph_reply(first_user_text(body)))


CEILING_TEXT = "ceiling request"
CEILING = """
import asyncio, sys, time
from common.endpoint import ChatClient, EndpointConfig
url, n, concurrency, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
async def main():
    client = ChatClient(EndpointConfig(base_url=url, model="fake-gpt", api_key_env="", concurrency=concurrency))
    await asyncio.gather(*(client.complete([{"role": "user", "content": f"{text} {i}"}]) for i in range(n)))
    print("client in flight", client.limit.means()[0])
    await client.close()
asyncio.run(main())
"""


def ceiling(args, server: FakeOpenAIServer, n: int) -> dict:
    """The endpoint client alone, `n` trivial requests: what this machine allows, pipeline or not."""
    start = len(server.log)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CEILING, server.url, str(n), str(args.concurrency), CEILING_TEXT]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    first = server.log[start:]
    t0, t_end = first[0]["t"], server.events[-1][0]
    client = float(out.rsplit(" ", 1)[1])
    return {
        "scenario": "ceiling: the endpoint client alone, as many trivial requests",
        "in_flight": server.mean_in_flight(t0, t_end) / args.concurrency,
        "client_in_flight": client,
        "req_s": len(first) / (t_end - t0),
        "ok_s": len(first) / (t_end - t0),
        "ideal": args.concurrency / args.latency,
        "requests": len(first),
    }


def write_config(path: Path, url: str, concurrency: int, code: Path) -> None:
    config = {
        "endpoint": {"base_url": url, "model": "fake-gpt", "api_key_env": "", "concurrency": concurrency},
        "backends": {"extractor": "llm", "judge": "vlm"},
        "pipeline": {"min_steps": 1, "image_size": 64},
    }
    if "class RunConfig" in (code / "data_gen" / "config.py").read_text():  # not in a baseline before it
        config["run"] = {"prices": {"fake-gpt": {"prompt": 2.5, "completion": 10.0}}, "progress_every_s": 15}
    path.write_text(yaml.safe_dump(config))


def chunks(out: Path) -> tuple[int, bool]:
    """(chunks written, complete with nothing to ask again)."""
    try:
        m = read_manifests(out, allow_partial=True)[0]
    except FileNotFoundError:
        return 0, False
    return len(m["chunks"]), bool(m.get("complete")) and all(c.get("retry", 0) == 0 for c in m["chunks"].values())


def run_cli(args, out: Path, prompts: Path, config: Path, log, sig=None, at_chunks: int = 0) -> int:
    cmd = [sys.executable, "-m", "commands.data", "trajectories", "--out", str(out), "--prompts", str(prompts)]
    cmd += ["--config", str(config), "--concurrency", str(args.concurrency)]
    env = {**os.environ, "PYTHONPATH": str(args.code), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=args.code, env=env, stdout=log, stderr=subprocess.STDOUT)
    if sig is not None:
        while chunks(out)[0] < at_chunks and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(sig)
    return proc.wait()


def records(out: Path) -> tuple[dict[str, dict], int]:
    """({id: row} after merge, rows in the files: duplicates show as rows > ids)."""
    rows = sum(pq.read_metadata(f).num_rows for f in shard_files(out, allow_partial=True))
    return {r["id"]: r for r in merge([out], allow_partial=True).to_list()}, rows


def scenario(args, server, work: Path, k: int, prompts: list[str], reference: dict | None, reference_rate: float):
    name, rates, limit_share, sig = SCENARIOS[k]
    ideal = args.concurrency / args.latency
    server.rates = dict(rates)
    # a rate limit below what this machine lets the client reach (the fault-free run's rate), so that it binds
    server.requests_per_s = limit_share * reference_rate if limit_share else None
    server.burst = max(1.0, server.requests_per_s or 0)  # a second's worth, as providers quantize per-minute limits
    out, config, prompt_file = work / f"s{k}", work / f"s{k}.yaml", work / "prompts.txt"
    write_config(config, server.url, args.concurrency, args.code)
    start = len(server.log)
    with open(work / f"s{k}.log", "w") as log:
        at = max(1, int(0.4 * -(-len(prompts) // 64)))  # 40% of the 64-prompt chunks
        codes = [run_cli(args, out, prompt_file, config, log, sig, at_chunks=at)]
        first_end, t_end = len(server.log), server.events[-1][0]
        summary_path = out / "summary-00000of00001.json"
        first_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}  # none after SIGKILL
        while not chunks(out)[1] and len(codes) < 4:
            codes.append(run_cli(args, out, prompt_file, config, log))
    first, every = server.log[start:first_end], server.log[start:]
    t0 = first[0]["t"]
    asked = {}  # prompt -> its first request's arrival: the last one is when the queue emptied
    for e in first:
        asked.setdefault(e["key"], e["t"])
    last_start = max(asked.get(p, t0) for p in prompts)
    answered, repeated = set(), set()  # request bodies answered in full; those sent again after it
    for e in every:
        if e["sha"] in answered:
            repeated.add(e["sha"])
        if e["fault"] == "ok":
            answered.add(e["sha"])
    got, rows = records(out)
    row = {
        "scenario": name,
        "codes": codes,
        "in_flight": server.mean_in_flight(t0, t_end) / args.concurrency,
        "in_flight_to_last_start": server.mean_in_flight(t0, last_start) / args.concurrency,
        "limit": first_summary.get("requests_in_flight", {}).get("mean_allowed"),
        "client_in_flight": first_summary.get("requests_in_flight", {}).get("mean"),
        "client_to_last_start": first_summary.get("requests_in_flight", {}).get("mean_to_last_start"),
        "req_s": len(first) / (t_end - t0),
        "ok_s": sum(e["fault"] == "ok" for e in first) / (t_end - t0),
        "ideal": min(ideal, server.requests_per_s or ideal),
        "requests": len(every),
        "faults": sum(e["fault"] != "ok" for e in every),
        "retries": sum(first_summary["this_run"]["retries"].values()) if first_summary else None,
        "retry_reasons": first_summary["this_run"]["retries"] if first_summary else None,
        "records": len(got),
        "failed": sum(json.loads(summary_path.read_text())["total"]["failed"].values()),
        "repeated": len(repeated),
        "first_run_s": t_end - t0,
    }
    if reference is not None:
        row["lost"] = len(set(reference) - set(got))
        row["extra"] = len(set(got) - set(reference)) + rows - len(got)  # unknown ids, and duplicated rows
        row["different"] = sum(got[i] != reference[i] for i in set(got) & set(reference))
    return row, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=800, help="shapes prompts per scenario")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per answer")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--only", default="", help="comma-separated scenario rows to run (row 0, the reference, always)"
    )
    parser.add_argument(
        "--code", type=Path, default=REPO, help="the checkout whose CLI runs (e.g. `git archive` of a baseline)"
    )
    args = parser.parse_args()
    chosen = sorted({0, *(int(x) for x in args.only.split(",") if x)}) if args.only else range(len(SCENARIOS))
    load_before, cpu_before, t_start = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeOpenAIServer(answer, delay=args.latency, max_requests=10**8) as server,
    ):
        work = Path(tmp)
        prompts = shapes_prompts(args.prompts, seed=0, categories=None)
        (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
        results, reference, reference_rate = [], None, 0.0
        for k in chosen:
            row, got = scenario(args, server, work, k, prompts, reference, reference_rate)
            if reference is None:
                reference, reference_rate = got, row["req_s"]
                results.append(ceiling(args, server, row["requests"]))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    print(
        f"\n{args.code}: {args.prompts} prompts, latency {args.latency} s, concurrency {args.concurrency}; "
        f"{os.cpu_count()} cores, "
        f"load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after; the client processes used "
        f"{client_cpu:.0f} CPU s in {time.time() - t_start:.0f} s\n"
    )
    print(
        "| scenario | in flight ÷ allowed: server (to last start) | client (to last start) | mean limit | requests/s "
        "| answered/s (÷ ideal) | requests (faults) | retries, 1st run | records: lost / extra / different | failed "
        "| repeated answered calls | exit codes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["scenario"].startswith("ceiling"):
            print(
                f"| {r['scenario']} | {r['in_flight']:.1%} | {r['client_in_flight'] / args.concurrency:.1%} | - "
                f"| {r['req_s']:.1f} | {r['ok_s']:.1f} ({r['ok_s'] / r['ideal']:.2f}) | {r['requests']} (0) "
                "| - | - | - | - | - |"
            )
            continue
        diff = "reference" if "lost" not in r else f"{r['lost']} / {r['extra']} / {r['different']}"
        limit = "-" if r["limit"] is None else f"{r['limit']:.1f}"
        client = "-" if r["client_in_flight"] is None else f"{r['client_in_flight'] / args.concurrency:.1%}"
        if r["client_to_last_start"] is not None:
            client += f" ({r['client_to_last_start'] / args.concurrency:.1%})"
        retries = "-" if r["retries"] is None else r["retries"]
        print(
            f"| {r['scenario']} | {r['in_flight']:.1%} ({r['in_flight_to_last_start']:.1%}) | {client} | {limit} "
            f"| {r['req_s']:.1f} | {r['ok_s']:.1f} ({r['ok_s'] / r['ideal']:.2f}) | {r['requests']} ({r['faults']}) "
            f"| {retries} "
            f"| {r['records']}: {diff} | {r['failed']} | {r['repeated']} | {' '.join(map(str, r['codes']))} |"
        )


if __name__ == "__main__":
    main()
