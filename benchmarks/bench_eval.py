"""Evaluation speed: env steps/s on Hopper-v5, dtlab's batched rollout vs the HF blog loop.

    python benchmarks/bench_eval.py [--quick] [--json out.json]
    python benchmarks/bench_eval.py --workers 1 2 [--episodes 50]   # env worker processes only

Cases (untrained models with random weights, DT paper configuration, targets 3600 and 1800):
  dtlab_rollout      dtlab.rollout.rollout: all episodes of both targets batched, one forward per
                     env step (rate from rollout's own timing: env construction excluded)
  hf_blog            the HF blog's loop: one env, get_action re-runs the whole K window every step,
                     no torch.no_grad (as in the blog)
  hf_blog_inference  the same inside torch.inference_mode()
  sim_random         the simulator alone: one Hopper-v5 env, random actions, resets counted
  matmul_peak        the arithmetic peak: one fp32 (2048 x 2048) @ (2048 x 2048) matmul at 1
                     thread (MKL sgemm), in GFLOP/s
The exact rollout's arithmetic ceiling (goal: dtlab_rollout >= 65% of it) is the env-step rate
if every env step cost only the matmul FLOPs of one exact K-window action at matmul_peak plus
one simulator step at sim_random's rate, both from the same repetition:
    ceiling = 1 / (exact_action_flops / peak + 1 / sim_rate)
exact_action_flops (``exact_action_flops``) counts 2 FLOPs per multiply-add of every matmul
that an exact action needs: the embeddings, every block over the 3K - 1 tokens up to s_K (the
window's last token, a_K, is seen by nothing that is read), attention over the causal half only,
and in the last block the keys and values of those tokens but the query, projection and MLP of
s_K alone (the only output read).
  dtlab_rollout_wN   (--workers N ...: this phase alone) the rollout with its envs stepped in N
                     worker processes (--eval-workers N), alternated with dtlab_rollout; the
                     returns of every run are checked identical
Episodes end on termination or at --max-steps (Hopper's own limit is 1000). Throughput phase at 1
torch thread; then the collapse phase (goal 4) on a smaller workload, thread conditions as in
bench_train; then where dtlab's eval time goes, and forward-pass what-if experiments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtlab  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads, as for every dtlab user)
import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
import hf_peer  # noqa: E402
from synthetic_hopper import ACT_DIM, ENV_ID, OBS_DIM, TARGETS, untrained_policy  # noqa: E402

from dtlab.rollout import rollout  # noqa: E402


def dtlab_case(policy, episodes: int, max_steps: int, seed: int, workers: int = 0,
               returns: list | None = None):
    """``returns``: a list that collects each run's returns (to check runs agree)."""
    def run():
        t0 = time.perf_counter()
        report = rollout(policy, ENV_ID, TARGETS, episodes, seed=seed, max_steps=max_steps,
                         workers=workers)
        results, stats = report.results, report.timing()
        wall = time.perf_counter() - t0
        lengths = [n for r in results for n in r.lengths]
        if returns is not None:
            returns.append([r.returns for r in results])
        return stats["env_steps"], stats["seconds"], {
            "episodes": len(lengths), "mean_length": float(np.mean(lengths)),
            "model_share": stats["model_seconds"] / stats["seconds"],
            "env_steps_per_model_second": stats["env_steps"] / stats["model_seconds"],
            "rate_incl_env_construction": stats["env_steps"] / wall}
    return run


def hf_case(model, env, episodes: int, max_steps: int, seed: int, inference: bool):
    zeros, ones = np.zeros(OBS_DIM, np.float32), np.ones(OBS_DIM, np.float32)

    def run():
        steps, lengths = 0, []
        t0 = time.perf_counter()
        with torch.inference_mode(inference):
            for target in TARGETS:
                for i in range(episodes):
                    n, _ = hf_peer.blog_episode(model, env, seed=seed + i, target_return=target,
                                                state_mean=zeros, state_std=ones, max_ep_len=max_steps)
                    steps += n
                    lengths.append(n)
        return steps, time.perf_counter() - t0, {"episodes": len(lengths),
                                                 "mean_length": float(np.mean(lengths))}
    return run


def exact_action_flops(cfg, obs_dim: int, act_dim: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one exact action from a full K-step window: the
    arithmetic a rollout cannot avoid without approximating (module docstring)."""
    d, k, n_layers, hidden = cfg.embed_dim, cfg.context_len, cfg.n_layers, cfg.mlp_ratio * cfg.embed_dim
    t = 3 * k - 1  # tokens up to s_K
    causal_pairs = t * (t + 1) / 2
    embed = 2 * k * d * (obs_dim + act_dim + 1)  # state, action and return embeddings
    block = (2 * t * d * 3 * d  # q, k, v of every token
             + 2 * 2 * causal_pairs * d  # q k^T and attention @ v, causal half
             + 2 * t * d * d  # output projection
             + 2 * 2 * t * d * hidden)  # MLP
    last = (2 * t * d * 2 * d + 2 * d * d  # keys and values of every token, s_K's query
            + 2 * 2 * t * d + 2 * d * d + 2 * 2 * d * hidden)  # s_K's attention, projection, MLP
    return embed + (n_layers - 1) * block + last + 2 * d * act_dim


def matmul_peak_case(n: int = 2048, calls: int = 3):
    a, b = torch.randn(n, n), torch.randn(n, n)

    def run():
        a @ b
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        return 2 * n ** 3 * calls / 1e9, time.perf_counter() - t0, {}
    return run


def sim_case(env, steps: int, seed: int):
    def run():
        env.reset(seed=seed)
        env.action_space.seed(seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
        return steps, time.perf_counter() - t0, {}
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="throughput 3 reps, 10 dtlab / 1 HF episode per target; collapse 2 reps "
                         "(default 5 reps, 20 / 2 episodes; collapse 3 reps)")
    ap.add_argument("--reps", type=int, help="repetitions of the throughput phase")
    ap.add_argument("--episodes", type=int, help="dtlab episodes per target (throughput phase)")
    ap.add_argument("--hf-episodes", type=int, help="HF blog episodes per target (throughput phase)")
    ap.add_argument("--max-steps", type=int, default=1000, help="cap on steps per episode")
    ap.add_argument("--sim-steps", type=int, default=3000)
    ap.add_argument("--collapse-reps", type=int)
    ap.add_argument("--collapse-episodes", type=int, default=5, help="dtlab episodes per target")
    ap.add_argument("--collapse-max-steps", type=int, default=60, help="cap on steps per episode")
    ap.add_argument("--workers", type=int, nargs="+",
                    help="measure only rollouts with the envs in N worker processes (per N given) "
                         "against the in-process rollout")
    harness.add_run_args(ap, collapse=True, profile=True)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    episodes = args.episodes or (10 if args.quick else 20)
    hf_episodes = args.hf_episodes or (1 if args.quick else 2)
    c_reps = args.collapse_reps or (2 if args.quick else 3)
    harness.seed_everything(args.seed)
    torch.set_num_threads(1)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    policy = untrained_policy(args.seed)
    if args.workers:
        workers_phase(policy, args.workers, reps, episodes, args.max_steps, args.seed, args.json,
                      log)
        return
    policy_bf16 = type(policy)(policy.model, policy.info, precision="bf16")  # --precision bf16
    policy_kv = type(policy)(policy.model, policy.info, kv_cache=True)  # --kv-cache (approximate)
    policy_kv_bf16 = type(policy)(policy.model, policy.info, precision="bf16", kv_cache=True)
    torch.manual_seed(args.seed)
    hf = hf_peer.hf_model(OBS_DIM, ACT_DIM).eval()
    hf_env, sim_env = gym.make(ENV_ID), gym.make(ENV_ID)

    def make_cases(eps: int, hf_eps: int, max_steps: int, sim_steps: int) -> dict:
        return {
            "dtlab_rollout": dtlab_case(policy, eps, max_steps, args.seed),
            "dtlab_rollout_bf16": dtlab_case(policy_bf16, eps, max_steps, args.seed),
            "dtlab_rollout_kv": dtlab_case(policy_kv, eps, max_steps, args.seed),
            "dtlab_rollout_kv_bf16": dtlab_case(policy_kv_bf16, eps, max_steps, args.seed),
            "hf_blog": hf_case(hf, hf_env, hf_eps, max_steps, args.seed, inference=False),
            "hf_blog_inference": hf_case(hf, hf_env, hf_eps, max_steps, args.seed, inference=True),
            "sim_random": sim_case(sim_env, sim_steps, args.seed),
            "matmul_peak": matmul_peak_case(),
        }

    cases = make_cases(episodes, hf_episodes, args.max_steps, args.sim_steps)
    units = {name: "env steps/s" for name in cases} | {"matmul_peak": "GFLOP/s"}
    for fn in make_cases(1, 1, 30, 100).values():  # warm-up
        fn()
    log(f"eval throughput: {reps} reps; dtlab {episodes} x {len(TARGETS)} episodes, HF "
        f"{hf_episodes} x {len(TARGETS)}, sim {args.sim_steps} steps, max {args.max_steps} steps")
    results = {"t1": harness.run_matrix(["t1"], cases, reps, units, log)["t1"]}

    # Collapse phase: a smaller workload (2 threads next to a busy core can be 10-80x slower), with
    # its own 1-thread reference measured in the same repetitions.
    collapse = {}
    if not args.no_collapse:
        c_cases = make_cases(args.collapse_episodes, 1, args.collapse_max_steps, 1000)
        del c_cases["matmul_peak"]
        log(f"eval collapse: {c_reps} reps; dtlab {args.collapse_episodes} x {len(TARGETS)}, HF 1 x "
            f"{len(TARGETS)}, max {args.collapse_max_steps} steps; conditions {list(harness.CONDITIONS)}")
        collapse = harness.run_matrix(list(harness.CONDITIONS), c_cases, c_reps, units, log)

    table = harness.Ratios()
    ratios, rows, add = table.ratios, table.rows, table.add

    r = results["t1"]
    flops = exact_action_flops(policy.model.cfg, OBS_DIM, ACT_DIM)
    ceiling = harness.Samples("env steps/s", [
        1.0 / (flops / (peak * 1e9) + 1.0 / sim)
        for peak, sim in zip(r["matmul_peak"].rates, r["sim_random"].rates)])
    add("t1: dtlab exact/its arithmetic ceiling", r["dtlab_rollout"], ceiling, ">= 0.65")
    forward_gflops = [x["env_steps_per_model_second"] * flops / 1e9
                      for x in r["dtlab_rollout"].extra]
    add("t1: dtlab exact model forward/matmul peak (GFLOP/s)",
        harness.Samples("GFLOP/s", forward_gflops), r["matmul_peak"], "")
    add("t1: dtlab/HF blog", r["dtlab_rollout"], r["hf_blog"], ">= 15")
    add("t1: dtlab/HF blog inference_mode", r["dtlab_rollout"], r["hf_blog_inference"], ">= 15")
    add("t1: dtlab/simulator alone", r["dtlab_rollout"], r["sim_random"], ">= 0.35")
    add("t1: dtlab bf16/HF blog", r["dtlab_rollout_bf16"], r["hf_blog"], ">= 15")
    add("t1: dtlab bf16/simulator alone", r["dtlab_rollout_bf16"], r["sim_random"], ">= 0.35")
    add("t1: dtlab kv-cache (approximate)/HF blog", r["dtlab_rollout_kv"], r["hf_blog"], "")
    add("t1: dtlab kv-cache/simulator alone", r["dtlab_rollout_kv"], r["sim_random"], "")
    add("t1: dtlab kv-cache + bf16/HF blog", r["dtlab_rollout_kv_bf16"], r["hf_blog"], "")
    add("t1: dtlab kv-cache + bf16/simulator alone", r["dtlab_rollout_kv_bf16"], r["sim_random"], "")
    if collapse:
        for ref in ("t1", "t1_busy"):
            for name in collapse["t1"]:
                add(f"slowdown t2_busy vs {ref}: {name}", collapse[ref][name], collapse["t2_busy"][name],
                    "<= 2" if ref == "t1" else "")
        c = collapse["t2_busy"]
        add("t2_busy: dtlab/HF blog", c["dtlab_rollout"], c["hf_blog"], "")
        add("t2_busy: dtlab/simulator alone", c["dtlab_rollout"], c["sim_random"], "")

    profile = None if args.no_profile else profile_eval(policy, hf, episodes, args.max_steps, args.seed)
    payload = {
        "benchmark": "eval", "machine": harness.machine_info(),
        "setup": {"env": ENV_ID, "targets": TARGETS, "dtlab_episodes_per_target": episodes,
                  "hf_episodes_per_target": hf_episodes, "max_steps": args.max_steps,
                  "sim_steps": args.sim_steps, "reps": reps, "seed": args.seed,
                  "collapse": {"reps": c_reps, "dtlab_episodes_per_target": args.collapse_episodes,
                               "hf_episodes_per_target": 1, "max_steps": args.collapse_max_steps,
                               "sim_steps": 1000},
                  "model": "untrained, DT paper configuration (embed 128, 3 layers, 1 head, K=20)"},
        "results": harness.samples_json(results), "collapse": harness.samples_json(collapse),
        "ratios": ratios, "profile": profile,
        "ceiling": {"exact_action_mflops": flops / 1e6,
                    "rates": ceiling.rates, "median": ceiling.summary()["median"]},
    }
    log(f"exact action: {flops / 1e6:.1f} MFLOP; ceiling median {ceiling.summary()['median']:.0f} "
        "env steps/s")
    tables = [harness.markdown_table(results, {})]
    if collapse:
        tables.append(harness.markdown_table(collapse, {}))
    tables.append(harness.ratio_table(rows))
    if profile:
        tables.append(profile_table(profile))
    harness.report("bench_eval", payload, tables, args.json)


def workers_phase(policy, workers: list[int], reps: int, episodes: int, max_steps: int, seed: int,
                  json_path: str | None, log) -> None:
    """In-process rollout vs the same rollout with its envs in N worker processes, alternated;
    checks every run returned the same returns."""
    # Exact fp32 (the model's share of the time is large) and kv-cache + bf16 (the simulator's is).
    fast = type(policy)(policy.model, policy.info, precision="bf16", kv_cache=True)
    returns: dict[str, list] = {"exact": [], "kv_bf16": []}
    cases = {}
    for label, pol in (("exact", policy), ("kv_bf16", fast)):
        for n in [0, *workers]:
            cases[f"{label}_w{n}"] = dtlab_case(pol, episodes, max_steps, seed, n, returns[label])
    units = {name: "env steps/s" for name in cases}
    dtlab_case(policy, 1, 30, seed, max(workers))()  # warm-up (imports in a worker)
    log(f"workers phase: {reps} reps; {episodes} x {len(TARGETS)} episodes, workers {workers}")
    results = {"t1": harness.alternate(cases, reps, units, log)}
    identical = all(r == runs[0] for runs in returns.values() for r in runs)
    table = harness.Ratios()
    for label in returns:
        for n in workers:
            table.add(f"t1 {label}: envs in {n} worker process(es) / in-process",
                      results["t1"][f"{label}_w{n}"], results["t1"][f"{label}_w0"], "")
    payload = {"benchmark": "eval_workers", "machine": harness.machine_info(),
               "setup": {"env": ENV_ID, "targets": TARGETS, "episodes_per_target": episodes,
                         "max_steps": max_steps, "reps": reps, "seed": seed, "workers": workers,
                         "model": "untrained, DT paper configuration", "torch_threads": 1},
               "returns_identical": identical, "results": harness.samples_json(results),
               "ratios": table.ratios}
    harness.report("bench_eval_workers", payload,
                   [harness.markdown_table(results, {}), harness.ratio_table(table.rows),
                    f"returns identical in every run: {identical}"], json_path)


# ---- where the time goes ------------------------------------------------------------------------
def last_action_forward(m, obs, act, rtg, ts):
    """Experiment (not dtlab code): DecisionTransformer.forward for full windows (no padding) that
    computes the last block only for the query that is read out (s_K), returning (B, A)."""
    b, k, _ = obs.shape
    time_e = m.embed_timestep(ts.clamp(max=m.cfg.max_ep_len - 1))
    x = torch.stack((m.embed_return(rtg) + time_e, m.embed_state(obs) + time_e,
                     m.embed_action(act) + time_e), dim=2).reshape(b, 3 * k, -1)
    x = m.drop(m.embed_ln(x))
    for block in m.blocks[:-1]:
        x = block(x, None)
    block, attn = m.blocks[-1], m.blocks[-1].attn
    x = x[:, :3 * k - 1]  # s_K is the last token any output needs
    h = block.ln_1(x)
    d, nh = h.shape[-1], attn.n_heads
    q = F.linear(h[:, -1:], attn.qkv.weight[:d], attn.qkv.bias[:d])  # (B, 1, D)
    kv = F.linear(h, attn.qkv.weight[d:], attn.qkv.bias[d:])  # (B, T, 2D)
    kk, v = kv.split(d, dim=2)
    q = q.view(b, 1, nh, d // nh).transpose(1, 2)
    kk = kk.view(b, -1, nh, d // nh).transpose(1, 2)
    v = v.view(b, -1, nh, d // nh).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(b, 1, d)
    y = x[:, -1:] + attn.proj(y)
    y = y + block.mlp(block.ln_2(y))
    return m.predict_action(m.ln_f(y)[:, 0])  # the action head (tanh for these actions)


def profile_eval(policy, hf, episodes: int, max_steps: int, seed: int) -> dict:
    torch.set_num_threads(1)
    model = policy.model
    fwd = {"seconds": 0.0, "calls": 0, "rows": 0}
    original = model.forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        out = original(*a, **kw)
        fwd["seconds"] += time.perf_counter() - t0
        fwd["calls"] += 1
        fwd["rows"] += a[0].shape[0]
        return out

    model.forward = timed_forward  # instance attribute: this policy object only
    try:
        t0 = time.perf_counter()
        stats = rollout(policy, ENV_ID, TARGETS, episodes, seed=seed, max_steps=max_steps).timing()
        wall = time.perf_counter() - t0
    finally:
        del model.forward
    s = stats["seconds"]
    out = {"rollout": {
        "env_steps": stats["env_steps"], "forward_calls": fwd["calls"],
        "mean_batch": fwd["rows"] / max(1, fwd["calls"]),
        "seconds_total": s, "seconds_env_construction_and_reset": wall - s,
        "seconds_model_forward": fwd["seconds"],
        "seconds_act_outside_forward": stats["model_seconds"] - fwd["seconds"],
        "seconds_env_step_loop": s - stats["model_seconds"],
        "ms_per_forward": fwd["seconds"] / max(1, fwd["calls"]) * 1e3,
        "us_model_per_env_step": fwd["seconds"] / stats["env_steps"] * 1e6,
        "us_env_loop_per_env_step": (s - stats["model_seconds"]) / stats["env_steps"] * 1e6,
    }}

    # Forward-pass experiments on full K windows (steps >= K of an episode).
    g = torch.Generator().manual_seed(seed)
    k = policy.context_len

    def inputs(n):
        return (torch.randn(n, k, OBS_DIM, generator=g), torch.rand(n, k, ACT_DIM, generator=g) * 2 - 1,
                torch.randn(n, k, 1, generator=g), torch.arange(k).repeat(n, 1) + 100)

    n = 2 * episodes
    x, x1 = inputs(n), inputs(1)
    with torch.inference_mode():
        ref = model(*x)[:, -1]
        pruned = last_action_forward(model, *x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(*x)[:, -1].float()
        fns = {
            f"dtlab_forward_ms_batch{n}": lambda: model(*x),
            f"dtlab_forward_ms_batch{n}_bf16_autocast": lambda: _bf16(model, x),
            f"dtlab_forward_ms_batch{n}_last_token_only_in_last_layer": lambda: last_action_forward(model, *x),
            f"dtlab_forward_ms_batch{n}_bf16_and_last_token": lambda: _bf16(
                lambda *a: last_action_forward(model, *a), x),
            # Cost of pushing only the 3 new tokens of a step through the model: a lower bound for
            # a step with a key/value cache (attention over 3 instead of up to 3K keys).
            f"dtlab_forward_ms_batch{n}_one_step_3_tokens": lambda: model(*(t[:, -1:] for t in x)),
            "dtlab_forward_ms_batch1": lambda: model(*x1),
            "hf_forward_ms_batch1": lambda: hf(
                states=x1[0], actions=x1[1], rewards=x1[2], returns_to_go=x1[2], timesteps=x1[3],
                attention_mask=torch.ones(1, k, dtype=torch.long), return_dict=False),
        }
        exp = harness.alternating_ms(fns)
        torch.set_num_threads(2)
        exp[f"dtlab_forward_ms_batch{n}_2_threads"] = harness.alternating_ms({"x": lambda: model(*x)})["x"]
        torch.set_num_threads(1)
    exp["max_abs_diff_last_token_only"] = float((ref - pruned).abs().max())
    exp["max_abs_diff_bf16"] = float((ref - bf).abs().max())
    out["forward_experiments"] = exp

    from torch.profiler import ProfilerActivity, profile

    policy.reset(np.repeat(np.asarray(TARGETS, np.float32), episodes))
    obs = np.random.default_rng(seed).normal(size=(n, OBS_DIM)).astype(np.float32)
    for _ in range(k):  # fill the windows so the profiled calls are steady-state
        policy.act(obs, np.zeros(n, np.float32), index=np.arange(n))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            policy.act(obs, np.ones(n, np.float32), index=np.arange(n))
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    out["act_top_ops"] = [
        {"op": e.key, "self_ms_per_act": e.self_cpu_time_total / 5e3, "share": e.self_cpu_time_total / total,
         "calls_per_act": e.count / 5}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]]
    return out


def _bf16(fn, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*x)


def profile_table(p: dict) -> str:
    r = p["rollout"]
    lines = ["| dtlab rollout, 1 thread | value |", "|---|---:|"]
    for key, v in r.items():
        lines.append(f"| {key} | {v:.4g} |")
    lines += ["", "| forward experiment (1 thread unless named) | value |", "|---|---:|"]
    for key, v in p["forward_experiments"].items():
        lines.append(f"| {key} | {v:.3g} |")
    lines += ["", "| DTPolicy.act top ops (self CPU) | ms/act | share | calls/act |", "|---|---:|---:|---:|"]
    for e in p["act_top_ops"]:
        lines.append(f"| {e['op']} | {e['self_ms_per_act']:.2f} | {e['share']:.0%} | {e['calls_per_act']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
