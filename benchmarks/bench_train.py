"""Training speed, CPU, DT paper configuration: dtlab vs Hugging Face transformers.

    python benchmarks/bench_train.py [--quick] [--json out.json] [--size paper|quickstart]

--size quickstart: both models at the quickstart's size (64 wide, 2 layers, MLP 256, K=10; the
data and max_ep_len stay Hopper's) instead of the paper's (128 wide, 3 layers, MLP 512, K=20).

Cases (samples = windows of K=20 steps; batch 64; AdamW lr 1e-4 wd 1e-4, clip 0.25, warm-up LR):
  dtlab_step   dtlab DecisionTransformer: forward, masked action MSE, backward, clip, AdamW step,
               on pre-built batches (goal 1); dtlab_step_bf16 under bf16 autocast
  hf_step      transformers.DecisionTransformerModel, the same windows, the blog's loss (goal 1);
               hf_step_bf16 under bf16 autocast (what HF's Trainer(bf16=True) does)
  dtlab_e2e    SequenceSampler.sample + to_tensors + the step above (goal 2)
  hf_e2e       the HF blog's collator (Python loop per sample, per-sample discounted cumsum,
               np.concatenate padding) + the HF step (goal 2)
  hf_e2e_pre   the same with returns-to-go precomputed per episode (a stronger peer, not the blog)
  hf_e2e_arrow the blog's collator reading a datasets.Dataset, as the blog does (only when the
               `datasets` package is installed; rows come back as Python lists)
Throughput phase at 1 torch thread (t1); then the sampler alone; then the collapse phase (goal 4)
with fewer steps per measurement: t1 = 1 thread; t2_busy = 2 threads while a busy-loop process
keeps one core busy; t1_busy = 1 thread next to that process. Last, where dtlab's step time goes
(timed phases, torch.profiler's top operators, and a few what-if experiments).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtlab  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads, as for every dtlab user)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import harness  # noqa: E402
import hf_peer  # noqa: E402
from synthetic_hopper import ACT_DIM, OBS_DIM, synthetic_episodes  # noqa: E402

from dtlab.config import ModelConfig, OptimConfig  # noqa: E402
from dtlab.data.sampling import SequenceSampler  # noqa: E402
from dtlab.model import DecisionTransformer  # noqa: E402
from dtlab.normalizer import Normalizer  # noqa: E402
from dtlab.spaces import ContinuousActions, VectorObservations  # noqa: E402
try:  # the step lives in dtlab.trainer since issue 20
    import dtlab.trainer as step_module  # noqa: E402
except ImportError:  # older dtlab: benchmarks/ab_sources.py runs this file against it too
    import dtlab.train as step_module  # noqa: E402
action_loss, make_optimizer = step_module.action_loss, step_module.make_optimizer
to_tensors, train_step = step_module.to_tensors, step_module.train_step

B, K, CLIP, LR, WD, WARMUP = 64, 20, 0.25, 1e-4, 1e-4, 10_000
CPU = torch.device("cpu")
# Model sizes: (embed, layers, mlp, K). paper: the DT paper's gym configuration; quickstart:
# dtlab.quickstart.MODEL's width, depth and context (its max_ep_len 200 is Pendulum's; Hopper's
# 1000 is kept here, which only sizes the timestep table).
SIZES = {"paper": (128, 3, 512, 20), "quickstart": (64, 2, 256, 10)}
SIZE = "paper"


def model_config() -> ModelConfig:
    embed, layers, mlp, k = SIZES[SIZE]
    return ModelConfig(embed_dim=embed, n_layers=layers, mlp_ratio=mlp // embed, context_len=k)


def warmup_lambda(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


def update(model: torch.nn.Module, opt, sched, loss: torch.Tensor) -> torch.Tensor:
    """The optimizer half of the HF peer's training step: backward, clip, AdamW, LR (dtlab's is
    dtlab.train.train_step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    sched.step()
    return loss.detach()


class DtlabTrainer:
    def __init__(self, seed: int, episodes, device: torch.device = CPU) -> None:
        torch.manual_seed(seed)
        self.device = device
        actions = ContinuousActions(ACT_DIM, (-1.0,) * ACT_DIM, (1.0,) * ACT_DIM)
        self.model = DecisionTransformer(model_config(), VectorObservations(OBS_DIM),
                                         actions).to(device).train()
        self.opt = make_optimizer(self.model, OptimConfig(lr=LR, weight_decay=WD), device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda)
        self.sampler = SequenceSampler(episodes, K, Normalizer.from_episodes(episodes, 1000.0, actions))
        self.rng = np.random.default_rng(seed)
        # The trainer's one non-finite check, made once as dtlab.trainer.Trainer does (absent in
        # dtlab before issue 20: benchmarks/ab_sources.py runs this file against older code too).
        scaler = getattr(step_module, "unit_scaler", None)
        self.step_options = {"scaler": scaler(device)} if scaler else {}

    def batch(self) -> dict:
        return to_tensors(self.sampler.sample(B, self.rng), self.device)

    def step(self, b: dict, bf16: bool = False) -> torch.Tensor:
        # The shipped step itself (dtlab.trainer.train_step), then the schedule as dtlab.train does.
        loss, _ = train_step(self.model, self.opt, b, grad_clip=CLIP,
                             precision="bf16" if bf16 else "fp32", **self.step_options)
        self.sched.step()
        return loss


class HFTrainer:
    def __init__(self, seed: int, blog_episodes, precompute_rtg: bool = False,
                 device: torch.device = CPU) -> None:
        torch.manual_seed(seed)
        self.device = device
        embed, layers, mlp, _ = SIZES[SIZE]
        self.model = hf_peer.hf_model(OBS_DIM, ACT_DIM, hidden=embed, layers=layers,
                                      inner=mlp).to(device).train()
        self.opt = hf_peer.hf_optimizer(self.model, LR, WD)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda)
        self.collator = hf_peer.BlogCollator(blog_episodes, max_len=K)
        self.collator_pre = hf_peer.BlogCollator(blog_episodes, max_len=K, precompute_rtg=True)
        self.collator_arrow = None
        try:  # the blog's own store: a datasets.Dataset (Arrow); rows come back as Python lists
            from datasets import Dataset

            arrow = Dataset.from_dict({key: [ep[key] for ep in blog_episodes] for key in blog_episodes[0]})
            self.collator_arrow = hf_peer.BlogCollator(arrow, max_len=K)
        except ImportError:
            pass

    def step(self, b: dict, bf16: bool = False) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf_peer.hf_loss(self.model, b)
        return update(self.model, self.opt, self.sched, loss)


def hf_batch_from(b: dict) -> dict:
    """The same windows in the blog collator's layout (actions padded with -10, float mask)."""
    m = b["masks"]
    actions = torch.where(m[..., None], b["actions"], torch.full_like(b["actions"], -10.0))
    return {"states": b["observations"], "actions": actions,
            "rewards": torch.zeros_like(b["returns_to_go"]), "returns_to_go": b["returns_to_go"],
            "timesteps": b["timesteps"], "attention_mask": m.float()}


def timed(fn, n: int):
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return float(n * B), time.perf_counter() - t0, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="throughput 3 reps x 4 steps, collapse 2 reps x 2 steps "
                         "(default 5 x 10 and 3 x 2)")
    ap.add_argument("--reps", type=int, help="repetitions of the throughput phase")
    ap.add_argument("--steps", type=int, help="optimizer steps per measurement (throughput phase)")
    ap.add_argument("--collapse-reps", type=int)
    ap.add_argument("--collapse-steps", type=int)
    ap.add_argument("--size", choices=sorted(SIZES), default="paper",
                    help="model size of both sides (default: the paper configuration)")
    harness.add_run_args(ap, collapse=True, profile=True)
    args = ap.parse_args()
    global SIZE, K
    SIZE, K = args.size, SIZES[args.size][3]
    reps = args.reps or (3 if args.quick else 5)
    steps = args.steps or (4 if args.quick else 10)
    c_reps = args.collapse_reps or (2 if args.quick else 3)
    c_steps = args.collapse_steps or 2
    harness.seed_everything(args.seed)
    torch.set_num_threads(1)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    episodes, blog = synthetic_episodes(seed=args.seed)
    dt = DtlabTrainer(args.seed, episodes)
    hf = HFTrainer(args.seed, blog)
    pool = [dt.batch() for _ in range(8)]  # the same windows for both step cases
    hf_pool = [hf_batch_from(b) for b in pool]
    n_dt = sum(p.numel() for p in dt.model.parameters())
    n_hf = sum(p.numel() for p in hf.model.parameters())

    def make_cases(n: int) -> dict:
        cases = {
            "dtlab_step": lambda: timed(lambda i: dt.step(pool[i % 8]), n),
            "hf_step": lambda: timed(lambda i: hf.step(hf_pool[i % 8]), n),
            "dtlab_e2e": lambda: timed(lambda i: dt.step(dt.batch()), n),
            "dtlab_step_bf16": lambda: timed(lambda i: dt.step(pool[i % 8], bf16=True), n),
            "hf_step_bf16": lambda: timed(lambda i: hf.step(hf_pool[i % 8], bf16=True), n),
            "dtlab_e2e_bf16": lambda: timed(lambda i: dt.step(dt.batch(), bf16=True), n),
            "hf_e2e": lambda: timed(lambda i: hf.step(hf.collator(B)), n),
            "hf_e2e_pre": lambda: timed(lambda i: hf.step(hf.collator_pre(B)), n),
        }
        if hf.collator_arrow is not None:
            cases["hf_e2e_arrow"] = lambda: timed(lambda i: hf.step(hf.collator_arrow(B)), n)
        return cases

    cases = make_cases(steps)
    units = {name: "samples/s" for name in cases}
    for fn in make_cases(1).values():  # warm-up: first-call allocations, lazy init
        fn()
    log(f"train throughput: {reps} reps x {steps} steps, 1 thread")
    results = {"t1": harness.run_matrix(["t1"], cases, reps, units, log)["t1"]}

    # Sampling alone (1 thread): windows/s of each batch builder.
    sample_cases = {
        "dtlab_sampler": lambda: timed(lambda i: dt.batch(), 20),
        "blog_collator": lambda: timed(lambda i: hf.collator(B), 5),
        "blog_collator_pre": lambda: timed(lambda i: hf.collator_pre(B), 20),
    }
    if hf.collator_arrow is not None:
        sample_cases["blog_collator_arrow"] = lambda: timed(lambda i: hf.collator_arrow(B), 5)
    sampling = harness.alternate(sample_cases, reps, {n: "samples/s" for n in sample_cases})

    # Collapse phase: fewer steps (2 threads next to a busy core can be 10-80x slower), its own
    # 1-thread reference measured in the same repetitions.
    collapse = {}
    if not args.no_collapse:
        c_cases = {k: v for k, v in make_cases(c_steps).items()
                   if k in ("dtlab_step", "hf_step", "dtlab_e2e", "hf_e2e", "dtlab_step_bf16")}
        log(f"train collapse: {c_reps} reps x {c_steps} steps, conditions {list(harness.CONDITIONS)}")
        collapse = harness.run_matrix(list(harness.CONDITIONS), c_cases, c_reps,
                                      {k: units[k] for k in c_cases}, log)

    table = harness.Ratios()
    ratios, rows, add = table.ratios, table.rows, table.add

    r = results["t1"]
    add("t1: step dtlab/HF", r["dtlab_step"], r["hf_step"], ">= 1.4")
    add("t1: e2e dtlab/HF blog collator", r["dtlab_e2e"], r["hf_e2e"], ">= 3")
    add("t1: step dtlab bf16 (--precision bf16)/HF fp32", r["dtlab_step_bf16"], r["hf_step"], ">= 1.4")
    add("t1: step dtlab bf16/HF bf16 (both under autocast)", r["dtlab_step_bf16"], r["hf_step_bf16"])
    add("t1: e2e dtlab bf16/HF blog collator", r["dtlab_e2e_bf16"], r["hf_e2e"], ">= 3")
    add("t1: e2e dtlab/HF blog collator, rtg precomputed", r["dtlab_e2e"], r["hf_e2e_pre"], "")
    if "hf_e2e_arrow" in r:
        add("t1: e2e dtlab/HF blog collator on Arrow dataset", r["dtlab_e2e"], r["hf_e2e_arrow"], "")
    add("t1: sampler alone dtlab/blog collator", sampling["dtlab_sampler"], sampling["blog_collator"], "")
    add("t1: sampler alone dtlab/blog collator, rtg pre", sampling["dtlab_sampler"],
        sampling["blog_collator_pre"], "")
    if "blog_collator_arrow" in sampling:
        add("t1: sampler alone dtlab/blog collator on Arrow", sampling["dtlab_sampler"],
            sampling["blog_collator_arrow"], "")
    if collapse:
        for ref in ("t1", "t1_busy"):
            for name in collapse["t1"]:  # slowdown factor: rate at ref / rate at t2_busy
                add(f"slowdown t2_busy vs {ref}: {name}", collapse[ref][name], collapse["t2_busy"][name],
                    "<= 2" if ref == "t1" else "")
        add("t2_busy: step dtlab/HF", collapse["t2_busy"]["dtlab_step"], collapse["t2_busy"]["hf_step"], "")
        add("t2_busy: e2e dtlab/HF blog", collapse["t2_busy"]["dtlab_e2e"], collapse["t2_busy"]["hf_e2e"], "")

    profile = None if args.no_profile else profile_steps(dt, hf, pool, hf_pool, 4 if args.quick else 10)
    payload = {
        "benchmark": "train", "machine": harness.machine_info(),
        "setup": {"size": SIZE, "batch": B, "K": K, "obs_dim": OBS_DIM, "act_dim": ACT_DIM,
                  "embed": SIZES[SIZE][0], "layers": SIZES[SIZE][1], "heads": 1,
                  "mlp": SIZES[SIZE][2], "dropout": 0.1, "lr": LR, "weight_decay": WD,
                  "grad_clip": CLIP, "reps": reps, "steps_per_measurement": steps,
                  "collapse_reps": c_reps, "collapse_steps_per_measurement": c_steps, "seed": args.seed,
                  "dataset": {"episodes": int(episodes.num_episodes), "transitions": int(episodes.num_transitions)},
                  "params": {"dtlab": n_dt, "hf": n_hf}},
        "results": harness.samples_json(results),
        "sampling": harness.samples_json({"t1": sampling}),
        "collapse": harness.samples_json(collapse),
        "ratios": ratios, "profile": profile,
    }
    tables = [harness.markdown_table(results, {}),
              harness.markdown_table({"t1 (sampling only)": sampling}, {})]
    if collapse:
        tables.append(harness.markdown_table(collapse, {}))
    tables.append(harness.ratio_table(rows))
    if profile:
        tables.append(profile_table(profile))
    harness.report("bench_train", payload, tables, args.json)


# ---- where the time goes ------------------------------------------------------------------------
def profile_steps(dt: DtlabTrainer, hf: HFTrainer, pool, hf_pool, n: int) -> dict:
    """Median ms per phase over n steps at 1 thread (no neighbour), and torch.profiler's top ops."""
    torch.set_num_threads(1)

    def phases_dt(i):
        t = [time.perf_counter()]
        sample = dt.sampler.sample(B, dt.rng); t.append(time.perf_counter())
        b = to_tensors(sample, CPU); t.append(time.perf_counter())
        pred = dt.model(b["observations"], b["actions"], b["returns_to_go"], b["timesteps"], b["masks"])
        t.append(time.perf_counter())
        loss = action_loss(pred, b["actions"], b["masks"]); t.append(time.perf_counter())
        dt.opt.zero_grad(set_to_none=True)
        loss.backward(); t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(dt.model.parameters(), CLIP); t.append(time.perf_counter())
        dt.opt.step(); dt.sched.step(); t.append(time.perf_counter())
        return np.diff(t) * 1e3

    def phases_hf(i):
        t = [time.perf_counter()]
        b = hf.collator(B); t.append(time.perf_counter())
        loss = hf_peer.hf_loss(hf.model, b); t.append(time.perf_counter())
        hf.opt.zero_grad(set_to_none=True)
        loss.backward(); t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(hf.model.parameters(), CLIP); t.append(time.perf_counter())
        hf.opt.step(); hf.sched.step(); t.append(time.perf_counter())
        return np.diff(t) * 1e3

    out = {}
    for name, fn, labels in (
        ("dtlab", phases_dt, ["sample", "to_tensors", "forward", "loss", "backward", "clip", "adamw"]),
        ("hf", phases_hf, ["blog_collate", "forward+loss", "backward", "clip", "adamw"]),
    ):
        fn(0)
        rows = np.array([fn(i) for i in range(n)])
        out[name] = {lab: float(np.median(rows[:, j])) for j, lab in enumerate(labels)}
        out[name]["total"] = float(np.median(rows.sum(1)))

    # What the step costs with bf16 autocast (dtlab's --precision bf16), with dropout off (not a
    # dtlab option), and with 2 threads and no neighbour.
    def no_dropout_step():
        dt.model.eval()  # dropout off; everything else as in training
        try:
            dt.step(pool[0])
        finally:
            dt.model.train()

    rounds = 3 if n < 10 else 5
    exp = harness.alternating_ms({"fp32_step_ms": lambda: dt.step(pool[0]),
                                  "bf16_autocast_step_ms": lambda: dt.step(pool[0], bf16=True),
                                  "dropout_off_step_ms": no_dropout_step}, rounds=rounds, calls=2)
    torch.set_num_threads(2)
    exp["fp32_step_ms_2_threads"] = harness.alternating_ms(
        {"x": lambda: dt.step(pool[0])}, rounds=rounds, calls=2)["x"]
    torch.set_num_threads(1)
    out["experiments"] = exp

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3):
            dt.step(pool[i])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    out["dtlab_top_ops"] = [
        {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 3e3,
         "share": e.self_cpu_time_total / total_us, "calls_per_step": e.count / 3}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    print(table, file=sys.stderr)
    return out


def profile_table(p: dict) -> str:
    lines = ["| dtlab phase | ms/step | HF blog phase | ms/step |", "|---|---:|---|---:|"]
    d, h = list(p["dtlab"].items()), list(p["hf"].items())
    for i in range(max(len(d), len(h))):
        a = d[i] if i < len(d) else ("", None)
        b = h[i] if i < len(h) else ("", None)
        lines.append(f"| {a[0]} | {'' if a[1] is None else f'{a[1]:.1f}'} | {b[0]} | "
                     f"{'' if b[1] is None else f'{b[1]:.1f}'} |")
    lines.append("")
    lines.append("| dtlab top ops (self CPU) | ms/step | share | calls/step |")
    lines.append("|---|---:|---:|---:|")
    for e in p["dtlab_top_ops"]:
        lines.append(f"| {e['op']} | {e['self_ms_per_step']:.1f} | {e['share']:.0%} | "
                     f"{e['calls_per_step']:.0f} |")
    lines.append("")
    lines.append("| experiment | ms/step |")
    lines.append("|---|---:|")
    for k, v in p["experiments"].items():
        lines.append(f"| {k} | {v:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
