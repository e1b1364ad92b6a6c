"""Side-by-side performance benchmark: the default lesion pipeline stage by stage, our engine against naive
PyTorch, brainchop-cli and the MONAI models of the MeshNet paper's Table 1, plus the Slicer module's
overhead. Prints tables and writes JSON.

    make bench                                   # sets up both environments, then runs this
    .venv/bin/python lab/benchmarks/performance.py   # --sections default,meshnet,brainchop --device cuda --size 128

Every measurement runs in a fresh worker process (``--worker``), so peak resident memory
(``ru_maxrss``) belongs to that measurement alone and one run cannot warm caches for another.
CLI programs are measured whole (start-up, model load, I/O included) from a worker that only
waits for them. Random weights (seed 0) are used for MeshNet-5/16/26: timing does not depend on
them. On a GPU, time is synchronised and memory is ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshnet_lesion.machine import machine

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MESHNET_LESION_MIRROR") or ROOT.parent / "shared" / "data")
BRAINCHOP = Path(os.environ.get("BRAINCHOP", ROOT / ".venv-brainchop" / "bin" / "brainchop"))
BENCH_DIR = ROOT / "lab" / "benchmarks" / ".work"           # brainchop's private HOME and the outputs (gitignored)
SCAN = "M2265_T2w.nii.gz"                            # ARC chronic stroke T2w, sample-arc-m2265-t2w
T1 = "t1_crop.nii.gz"                                # sample-t1-crop
VARIANTS = ("meshnet-5", "meshnet-16", "meshnet-26", "t2lesion-meshnet11")
# The default pipeline section: the registry's default, its fast single-model choice, the first ARC model.
PIPELINE_MODELS = ("arc-meshnet26", "arc-meshnet26-r0", "t2lesion-meshnet11")
STAGES = ("conform", "brain_mask", "standardize", "network", "to_source")
BRAINCHOP_MODELS = {"tissue_fast": ("model5_gw_ae", "brainchop-tissue-fast"),
                    "subcortical": ("model18cls", "brainchop-subcortical")}
ZOO = ("segresnet", "unetr", "swinunetr", "vnet", "resunet")
PAPER_PARAMS = {"segresnet": 1_176_186, "unetr": 95_763_682, "swinunetr": 18_346_844, "vnet": 45_597_898,
                "resunet": None}


# ============================================================================ worker side
def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _memory(device: str) -> dict:
    import torch
    out = {"peak_rss_gb": _rss_gb()}
    if device.startswith("cuda"):
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def _loaded_model(variant: str):
    """The variant as a LoadedModel: random MeshNet-X (seed 0) or the shipped ARC-trained weights."""
    import torch

    from meshnet_lesion import Registry
    from meshnet_lesion.train.model import build_meshnet
    if variant.startswith("meshnet-"):
        torch.manual_seed(0)
        return build_meshnet(int(variant.split("-")[1])).eval().to_loaded()
    return Registry().load(variant)


def _input(size: int, normalization=None):
    """M2265 conformed and normalised (as every pipeline feeds it), centre-cropped to ``size``³."""
    from meshnet_lesion import load_volume
    from meshnet_lesion.conform import conform
    from meshnet_lesion.preprocess import normalize
    from meshnet_lesion.spec import Normalization
    x = normalize(conform(load_volume(SHARED / "mri" / SCAN)).array, normalization or Normalization("minmax"))
    lo = (256 - size) // 2
    return x[lo:lo + size, lo:lo + size, lo:lo + size].copy()


def work_peak(task: dict) -> dict:
    """Best-of-3 square matmul throughput, fp32 and bf16 (what the CPU or GPU can do at best).

    The size grows until one product takes 0.3 s (or reaches 4096): emulated bf16 is far too slow for 4096².
    """
    import torch

    from meshnet_lesion.devices import cpu_has_native_bf16
    device = task["device"]
    out = {"native_bf16": cpu_has_native_bf16() if device == "cpu" else True}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n, best = 256, 0.0
        while True:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            times = []
            for _ in range(4):
                _sync(device)
                t = time.perf_counter()
                torch.mm(a, b)
                _sync(device)
                times.append(time.perf_counter() - t)
            best = min(times[1:])
            if best > 0.3 or n >= 4096:
                break
            n *= 2
        out[f"{name}_gflops"], out[f"{name}_n"] = 2 * n ** 3 / best / 1e9, n
    return out


def _naive_module(loaded):
    """A plain nn.Sequential of Conv3d / BatchNorm3d / ReLU holding the same weights."""
    from torch import nn

    from meshnet_lesion.train.model import MeshNet
    blocks = MeshNet.from_loaded(loaded).layers
    return nn.Sequential(*(m for b in blocks for m in (b.conv, b.norm, b.act) if not isinstance(m, nn.Identity)))


def work_network(task: dict) -> dict:
    """One network on the conformed scan: naive PyTorch (whole volume, fp32) or our engine.

    With ``pipeline`` the naive run is timed as a whole pipeline too (load → conform → network →
    softmax → lesion probability back to the source grid), the same steps as ours.
    """
    import numpy as np
    import torch

    from meshnet_lesion import load_volume
    from meshnet_lesion.conform import conform
    from meshnet_lesion.engine import Engine
    from meshnet_lesion.postprocess import lesion_to_source
    from meshnet_lesion.preprocess import normalize
    from meshnet_lesion.train.model import MeshNet

    device, size = task["device"], task["size"]
    loaded = _loaded_model(task["variant"])
    out: dict = {"macs_per_voxel": sum(layer.macs_per_voxel for layer in loaded.spec.layers),
                 "parameters": loaded.num_parameters}
    with tempfile.TemporaryDirectory() as tmp:   # size on disk as our safetensors (weights, BatchNorm, spec)
        MeshNet.from_loaded(loaded).save(f"{tmp}/m.safetensors")
        out["disk_mb"] = os.path.getsize(f"{tmp}/m.safetensors") / 1e6
    if task["impl"] == "naive":
        module = _naive_module(loaded).to(device).eval()
        started = time.perf_counter()
        conformed = conform(load_volume(SHARED / "mri" / SCAN))
        x = normalize(conformed.array, loaded.spec.normalization)
        lo = (256 - size) // 2
        x = x[lo:lo + size, lo:lo + size, lo:lo + size]
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device)
            _sync(device)
            tick = time.perf_counter()
            probability = torch.softmax(module(xt), dim=1)[0]
            _sync(device)
            out["network_s"] = time.perf_counter() - tick
            labels = probability.argmax(0).to(torch.uint8).cpu().numpy()
            lesion = probability[1].float().cpu().numpy()
        del probability, xt
        if size == 256:
            lesion_to_source(lesion, conformed, None)
            out["pipeline_s"] = time.perf_counter() - started
    else:
        engine = Engine(loaded, device, task["precision"])
        x = _input(size, loaded.spec.normalization)
        _sync(device)
        tick = time.perf_counter()
        result = engine.run(x, probability_classes=[1])
        _sync(device)
        out["network_s"] = time.perf_counter() - tick
        out["precision"], out["warnings"] = result.precision, result.warnings
        labels = result.labels.astype(np.uint8)
    np.save(task["labels"], labels)
    return {**out, **_memory(device)}


def work_pipeline(task: dict) -> dict:
    """Our whole pipeline as the CLI and Slicer run it (Segmenter: conform → [brain mask] → crop → engine →
    source grid); the model load is timed apart (``load_s``)."""
    import numpy as np
    import torch

    from meshnet_lesion import Registry, Segmenter, load_volume
    from meshnet_lesion.train.model import build_meshnet

    variant, registry = task["variant"], Registry()
    with tempfile.TemporaryDirectory() as tmp:
        if variant.startswith("meshnet-"):
            torch.manual_seed(0)
            folder = Path(tmp) / variant
            folder.mkdir()
            build_meshnet(int(variant.split("-")[1])).eval().save(folder / "model.safetensors")
            registry = Registry(cache_dir=Path(tmp) / "cache")
            registry.import_folder(folder, f"bench-{variant}")
            variant = f"bench-{variant}"
        started = time.perf_counter()
        segmenter = Segmenter(variant, registry=registry, device=task["device"], precision=task["precision"],
                              brain_mask=task["brain_mask"])   # None: the model card's choice
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        result = segmenter.segment(load_volume(SHARED / "mri" / SCAN))
        _sync(task["device"])
        elapsed = time.perf_counter() - started
    if task.get("labels"):
        np.save(task["labels"], result.labels)
    return {"pipeline_s": elapsed, "load_s": load_s, "timings_s": result.timings_s,
            "lesion_ml": result.lesion_volume_ml, "brain_ml": result.brain_volume_ml if result.brain_mask else None,
            "precision": result.precision, "brain_precision": result.brain_precision,
            "precision_notes": segmenter.precision_notes, **_memory(task["device"])}


def work_command(task: dict) -> dict:
    """A whole CLI run: wall time and the child's peak RSS."""
    started = time.perf_counter()
    proc = subprocess.run(task["argv"], env={**os.environ, **task.get("env", {})}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{task['argv'][0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"wall_s": elapsed, "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20}


def _monai(arch: str, size: int):
    from monai.networks.nets import UNETR, SegResNet, SwinUNETR, UNet, VNet
    return {"segresnet": lambda: SegResNet(spatial_dims=3, in_channels=1, out_channels=2),
            "unetr": lambda: UNETR(1, 2, img_size=size, feature_size=16),
            "swinunetr": lambda: SwinUNETR(in_channels=1, out_channels=2, feature_size=24, use_v2=True),
            "vnet": lambda: VNet(spatial_dims=3, in_channels=1, out_channels=2),
            "resunet": lambda: UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                                    num_res_units=2)}[arch]()


def _flops(make, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    model = make().eval().to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 1, size, size, size, device="meta"))
    return counter.get_total_flops()


def work_zoo(task: dict) -> dict:
    """A MONAI architecture: parameters, safetensors size, FLOPs at 256³, one forward pass at ``size``³."""
    import warnings

    import torch
    from safetensors.torch import save_file
    warnings.filterwarnings("ignore")
    arch, size, device = task["arch"], task["size"], task["device"]
    if task.get("memory_limit_gb"):
        limit = int(task["memory_limit_gb"] * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    model = _monai(arch, size).eval()
    out = {"parameters": sum(p.numel() for p in model.parameters()),
           "flops_256": _flops(lambda: _monai(arch, 256), 256)}
    out["flops_run"] = out["flops_256"] if size == 256 else _flops(lambda: _monai(arch, size), size)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/m.safetensors")
        out["disk_mb"] = os.path.getsize(f"{tmp}/m.safetensors") / 1e6
    model = model.to(device)
    x = torch.from_numpy(_input(size))[None, None].to(device)
    with torch.inference_mode():
        _sync(device)
        tick = time.perf_counter()
        model(x)
        _sync(device)
        out["latency_s"] = time.perf_counter() - tick
    return {**out, **_memory(device)}


def work_slicer(task: dict) -> dict:
    """The Slicer module's logic in a headless scene (slicer-core): time around the network, cold and warm."""
    sys.path[:0] = [str(ROOT / "MeshNetLesion"), str(ROOT / "MeshNetLesion" / "Testing" / "Python")]
    from headless_slicer import App

    from meshnet_lesion import load_volume
    from MeshNetLesionLib.logic import MeshNetLesionLogic
    volume = load_volume(SHARED / "mri" / SCAN)
    runs = []
    with tempfile.TemporaryDirectory() as share:
        app = App(share)
        logic = MeshNetLesionLogic(app.scene, None, app.terminologies)
        node = app.add_volume("M2265", volume.array, volume.affine)
        for _ in range(2):
            job = logic.segmentAsync(node, modelId=task["model"], brainMask=False, device=task["device"])
            job.wait(interval=0.01)
            if job.state != "done":
                raise RuntimeError(f"the Slicer job ended '{job.state}': {job.error}")
            network = job.result.timings_s["network"]
            runs.append({"elapsed_s": job.elapsed, "network_s": network, "overhead_s": job.elapsed - network,
                         "timings_s": job.result.timings_s})
    return {"cold": runs[0], "warm": runs[1], **_memory(task["device"])}


WORKERS = {"peak": work_peak, "network": work_network, "pipeline": work_pipeline, "command": work_command,
           "zoo": work_zoo, "slicer": work_slicer}


# ============================================================================ parent side
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device
        self.results: dict = {"machine": machine(), "device": args.device, "size": args.size,
                              "command": " ".join([Path(sys.executable).name, *sys.argv])}
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_DIR))

    def worker(self, task: dict, timeout: float | None = None) -> dict:
        """Run one measurement in a fresh process; returns its result or {'error': ...}."""
        label = task.get("label") or task["kind"]
        print(f"  ... {label}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"over {timeout:.0f} s"}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            return {"error": tail[0][:300]}
        return json.loads(lines[-1][7:])

    # ------------------------------------------------------------------ sections
    def peak(self) -> None:
        r = self.results["peak"] = self.worker({"kind": "peak", "device": self.device, "label": "matmul peak"})
        if "error" in r:
            sys.exit(f"matmul peak failed: {r['error']}")
        print(f"\nPeak matmul ({self.device}): fp32 {r['fp32_gflops']:.0f} GFLOP/s, bf16 {r['bf16_gflops']:.0f} "
              f"GFLOP/s{'' if r['native_bf16'] else ' (emulated: this CPU has no native bf16)'}")

    def default(self) -> None:
        """The whole default run, as the CLI and Slicer make it (brain restriction on), stage by stage, beside a
        plain-PyTorch MeshNet-26 on the whole grid without any brain mask (the goal's yardstick)."""
        import numpy as np

        from meshnet_lesion.train.metrics import dice

        rows = {}
        for model in PIPELINE_MODELS:
            for precision in ("auto", "fp32"):
                rows[f"{model} {precision}"] = self.worker(
                    {"kind": "pipeline", "variant": model, "device": self.device, "precision": precision,
                     "brain_mask": None, "labels": str(self.tmp / f"{model}.{precision}.npy"),
                     "label": f"{model} pipeline {precision}"})
            auto, fp32 = rows[f"{model} auto"], rows[f"{model} fp32"]
            if "error" not in auto and "error" not in fp32:
                auto["lesion_dice_vs_fp32"] = dice(np.load(self.tmp / f"{model}.auto.npy") == 1,
                                                   np.load(self.tmp / f"{model}.fp32.npy") == 1)
        rows["plain PyTorch MeshNet-26, no brain mask"] = self.worker(
            {"kind": "network", "variant": "meshnet-26", "impl": "naive", "precision": "fp32", "device": self.device,
             "size": 256, "labels": str(self.tmp / "plain.npy"), "label": "plain PyTorch MeshNet-26 pipeline"})
        self.results["default"] = rows
        print_default(rows)

    def meshnet(self) -> None:
        import numpy as np

        from meshnet_lesion.train.metrics import dice
        size, rows = self.args.size, {}
        peak = self.results["peak"]
        bf16 = self.device != "cpu" or peak["native_bf16"]
        fast = "fp16" if self.device.startswith("cuda") else "bf16"
        for variant in self.args.variants:
            row = rows[variant] = {}
            base = {"kind": "network", "variant": variant, "device": self.device, "size": size}
            row["naive"] = self.worker({**base, "impl": "naive", "precision": "fp32",
                                        "labels": str(self.tmp / f"{variant}.naive.npy"), "label": f"{variant} naive"})
            row["ours"] = self.worker({**base, "impl": "ours", "precision": "fp32",
                                       "labels": str(self.tmp / f"{variant}.ours.npy"), "label": f"{variant} ours"})
            if bf16:
                row[fast] = self.worker({**base, "impl": "ours", "precision": fast, "label": f"{variant} {fast}",
                                         "labels": str(self.tmp / f"{variant}.{fast}.npy")})
            if size == 256:
                row["ours_pipeline"] = self.worker({"kind": "pipeline", "variant": variant, "device": self.device,
                                                    "precision": "auto", "brain_mask": False,
                                                    "label": f"{variant} our pipeline"})
            if "error" in row["naive"] or "error" in row["ours"]:
                continue
            naive = np.load(self.tmp / f"{variant}.naive.npy")
            ours = np.load(self.tmp / f"{variant}.ours.npy")
            row["labels_equal"] = float(np.mean(naive == ours))
            row["lesion_dice_vs_naive"] = dice(naive == 1, ours == 1)
            if fast in row and "error" not in row[fast]:
                row[f"{fast}_dice_vs_fp32"] = dice(np.load(self.tmp / f"{variant}.{fast}.npy") == 1, ours == 1)
            flops = 2 * row["ours"]["macs_per_voxel"] * size ** 3
            row["tflop"] = flops / 1e12
            row["fraction_of_fp32_peak"] = flops / row["ours"]["network_s"] / 1e9 / peak["fp32_gflops"]
        self.results["meshnet"] = rows
        print_meshnet(rows, size, fast)

    def brainchop(self) -> None:
        if not BRAINCHOP.exists():
            print(f"\nbrainchop: skipped, {BRAINCHOP} is missing (make bench installs it)")
            return
        if shutil.which("clang") is None:
            print("\nbrainchop: skipped, tinygrad's CPU backend needs clang (apt-get install clang)")
            return
        import nibabel as nib
        import numpy as np
        home = BENCH_DIR / "brainchop-home"
        models = home / ".cache" / "brainchop"
        listing = {}
        for name, (folder, _) in BRAINCHOP_MODELS.items():
            target = models / "models" / folder
            target.mkdir(parents=True, exist_ok=True)
            for file in ("model.json", "model.pth"):
                shutil.copy2(SHARED / "models" / "brainchop" / folder / file, target / file)
            listing[name] = {"folder": folder, "description": name, "parameter_name": name}
        (models / "models.json").write_text(json.dumps(listing))
        shutil.rmtree(home / ".cache" / "tinygrad", ignore_errors=True)   # the first run compiles its kernels
        t1 = SHARED / "mri" / T1
        ours_cli = Path(sys.executable).with_name("meshnet-lesion")
        rows = {}
        for name, (_, model_id) in BRAINCHOP_MODELS.items():
            row = rows[name] = {}
            theirs_out, ours_out = self.tmp / f"{name}.brainchop.nii.gz", self.tmp / f"{name}.ours.nii.gz"
            argv = [str(BRAINCHOP), str(t1), "-m", name, "-o", str(theirs_out), "--no-optimize"]
            env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),   # brainchop calls niimath
                   "PATH": os.pathsep.join([str(BRAINCHOP.parent), os.environ.get("PATH", "")])}
            row["brainchop_first"] = self.worker({"kind": "command", "argv": argv, "env": env,
                                                  "label": f"brainchop {name} (first run)"})
            row["brainchop"] = self.worker({"kind": "command", "argv": argv, "env": env,
                                            "label": f"brainchop {name} (second run)"})
            ours_argv = [str(ours_cli), "segment", str(t1), "--model", model_id, "-o", str(ours_out),
                         "--device", self.device, "-q"]
            row["ours"] = self.worker({"kind": "command", "argv": ours_argv, "label": f"meshnet-lesion {name}"})
            if theirs_out.exists() and ours_out.exists():
                theirs = np.asarray(nib.load(theirs_out).dataobj)
                row["voxels_differing"] = int(np.count_nonzero(np.asarray(nib.load(ours_out).dataobj) != theirs))
        self.results["brainchop"] = rows
        print_brainchop(rows)

    def zoo(self) -> None:
        rows = {}
        for arch in ZOO:
            for size in [s for s in (256, 192, 128) if s <= self.args.size] or [self.args.size]:
                row = self.worker({"kind": "zoo", "arch": arch, "size": size, "device": self.device,
                                   "memory_limit_gb": self.args.zoo_memory_gb, "label": f"{arch} at {size}³"},
                                  timeout=self.args.zoo_timeout)
                row["size"] = size
                rows.setdefault(arch, []).append(row)
                if "error" not in row:
                    break
        self.results["zoo"] = rows
        print_zoo(rows, self.results.get("meshnet", {}), self.args.size)

    def slicer(self) -> None:
        r = self.results["slicer"] = self.worker({"kind": "slicer", "model": "t2lesion-meshnet11",
                                                  "device": self.device, "label": "Slicer logic, headless"})
        if "error" in r:
            print(f"\nSlicer module: failed: {r['error']}")
            return
        print("\nSlicer module (headless slicer-core scene, t2lesion-meshnet11 on M2265 256³, no brain mask)")
        for run in ("cold", "warm"):
            t = r[run]
            print(f"  {run}: Apply to segment {t['elapsed_s']:.2f} s = network {t['network_s']:.2f} s "
                  f"+ overhead {t['overhead_s']:.2f} s (conform {t['timings_s']['conform']:.2f} s, "
                  f"back to source {t['timings_s']['to_source']:.2f} s)")
        print(f"  peak RSS {r['peak_rss_gb']:.2f} GB")


# ============================================================================ reporting
def _fmt(r: dict, key: str, unit: str = "s", digits: int = 1) -> str:
    if "error" in r:
        return "failed"
    return f"{r[key]:.{digits}f} {unit}" if key in r else "-"


def _ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b or key not in a or key not in b:
        return "-"
    return f"{a[key] / b[key]:.1f}×"


def print_default(rows: dict) -> None:
    print("\nThe default pipeline on M2265 (whole run after the model load: load the scan, conform, brain mask, "
          "standardise, network, back to the source grid)")
    print("(auto: the precision `auto` chose per network on this machine, lesion/brain; fp32: today's exact path)")
    print(f"{'run':<42}{'total':>9}" + "".join(f"{s:>12}" for s in STAGES)
          + f"{'lesion':>10}{'precision':>12}{'Dice/fp32':>10}{'RSS':>9}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<42} failed: {row['error']}")
            continue
        stages = row.get("timings_s", {})
        precision = row.get("precision", "") + (f"/{row['brain_precision']}" if row.get("brain_precision") else "")
        print(f"{name:<42}{_fmt(row, 'pipeline_s'):>9}" + "".join(
            f"{stages[s]:>10.1f} s" if s in stages else f"{'-':>12}" for s in STAGES)
            + (f"{row['lesion_ml']:>7.1f} mL" if "lesion_ml" in row else f"{'-':>10}") + f"{precision:>12}"
            + (f"{row['lesion_dice_vs_fp32']:>10.4f}" if "lesion_dice_vs_fp32" in row else f"{'':>10}")
            + f"{_fmt(row, 'peak_rss_gb', 'GB', 2):>9}")
    plain = rows.get("plain PyTorch MeshNet-26, no brain mask", {})
    for name, row in rows.items():
        if name != "plain PyTorch MeshNet-26, no brain mask" and "pipeline_s" in row and "pipeline_s" in plain:
            print(f"  {name}: {row['pipeline_s'] / plain['pipeline_s']:.2f}× the plain-PyTorch run's time")


def print_meshnet(rows: dict, size: int, fast: str) -> None:
    print(f"\nMeshNet at {size}³ on the conformed ARC scan (network only; peak RSS of the whole process)")
    head = (f"{'model':<20}{'TFLOP':>7}{'naive':>10}{'RSS':>9}{'ours fp32':>11}{'RSS':>9}{'speed-up':>10}"
            f"{'% peak':>8}{'labels =':>11}{fast:>9}{'speed-up':>10}{'Dice':>8}")
    print(head)
    for variant, row in rows.items():
        naive, ours, low = row["naive"], row["ours"], row.get(fast, {"error": "n/a"})
        print(f"{variant:<20}{row.get('tflop', 0):>7.2f}{_fmt(naive, 'network_s'):>10}"
              f"{_fmt(naive, 'peak_rss_gb', 'GB', 2):>9}{_fmt(ours, 'network_s'):>11}{_fmt(ours, 'peak_rss_gb', 'GB', 2):>9}"
              f"{_ratio(naive, ours, 'network_s'):>10}{100 * row.get('fraction_of_fp32_peak', 0):>7.0f}%"
              f"{100 * row.get('labels_equal', 0):>10.4f}%"
              f"{('n/a' if 'error' in low else _fmt(low, 'network_s')):>9}{_ratio(naive, low, 'network_s'):>10}"
              f"{row.get(f'{fast}_dice_vs_fp32', float('nan')):>8.4f}")
    if any("ours_pipeline" in row for row in rows.values()):
        print("\nWhole pipeline (load → conform → network → back to the source grid; no brain mask)")
        print(f"{'model':<20}{'naive':>10}{'RSS':>9}{'ours':>10}{'RSS':>9}{'speed-up':>10}  ours: conform / network "
              "/ to source")
        for variant, row in rows.items():
            naive, ours = row["naive"], row.get("ours_pipeline", {"error": "n/a"})
            split = "" if "error" in ours else " / ".join(f"{ours['timings_s'][k]:.1f}" for k in
                                                          ("conform", "network", "to_source"))
            print(f"{variant:<20}{_fmt(naive, 'pipeline_s'):>10}{_fmt(naive, 'peak_rss_gb', 'GB', 2):>9}"
                  f"{_fmt(ours, 'pipeline_s'):>10}{_fmt(ours, 'peak_rss_gb', 'GB', 2):>9}"
                  f"{_ratio(naive, ours, 'pipeline_s'):>10}  {split} s")


def print_brainchop(rows: dict) -> None:
    print("\nbrainchop-cli 0.2.5 (tinygrad, CPU) against meshnet-lesion on t1_crop.nii.gz: whole CLI runs")
    print(f"{'model':<13}{'brainchop 1st':>14}{'2nd run':>10}{'RSS':>9}{'ours':>9}{'RSS':>9}{'speed-up':>10}"
          f"{'voxels differing':>18}")
    for name, row in rows.items():
        print(f"{name:<13}{_fmt(row['brainchop_first'], 'wall_s'):>14}{_fmt(row['brainchop'], 'wall_s'):>10}"
              f"{_fmt(row['brainchop'], 'peak_rss_gb', 'GB', 2):>9}{_fmt(row['ours'], 'wall_s'):>9}"
              f"{_fmt(row['ours'], 'peak_rss_gb', 'GB', 2):>9}{_ratio(row['brainchop'], row['ours'], 'wall_s'):>10}"
              f"{row.get('voxels_differing', '-'):>18}")


def print_zoo(rows: dict, meshnet: dict, size: int) -> None:
    print("\nThe paper's baselines, built with MONAI, against MeshNet (one volume, fp32, plain PyTorch for MONAI)")
    print(f"{'model':<20}{'parameters':>12}{'paper':>12}{'disk MB':>9}{'TFLOP@256³':>11}{'cube':>6}"
          f"{'latency':>10}{'RSS':>9}")
    for variant, row in meshnet.items():
        ours = row["ours"]
        if "error" in ours:
            continue
        flops = 2 * ours["macs_per_voxel"] * 256 ** 3 / 1e12
        print(f"{variant:<20}{ours['parameters']:>12,}{'':>12}{ours['disk_mb']:>9.2f}{flops:>11.2f}"
              f"{size:>5}³{_fmt(ours, 'network_s'):>10}{_fmt(ours, 'peak_rss_gb', 'GB', 2):>9}")
    for arch, attempts in rows.items():
        row = attempts[-1]
        paper = PAPER_PARAMS[arch]
        if "error" in row:
            tried = ", ".join(f"{a['size']}³: {a['error']}" for a in attempts)
            print(f"{arch:<20} failed ({tried})")
            continue
        print(f"{arch:<20}{row['parameters']:>12,}{(f'{paper:,}' if paper else '-'):>12}{row['disk_mb']:>9.2f}"
              f"{row['flops_256'] / 1e12:>11.2f}{row['size']:>5}³{_fmt(row, 'latency_s'):>10}"
              f"{_fmt(row, 'peak_rss_gb', 'GB', 2):>9}")


def write_results(path: Path, results: dict, sections: list[str]) -> None:
    """Update ``path``: the sections run now replace their earlier results; each keeps its own run's context."""
    merged = json.loads(path.read_text()) if path.exists() else {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    context = {k: results[k] for k in ("machine", "device", "size", "command", "peak") if k in results}
    for section in sections:
        if section in results:
            merged[section] = {"measured": stamp, **context, "results": results[section]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1))
    print(f"\nwrote {path} ({', '.join(s for s in sections if s in results)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sections", default="default,meshnet,brainchop,zoo,slicer",
                        help="comma-separated: default, meshnet, brainchop, zoo, slicer (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="MeshNet variants to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", type=int, default=256, help="cube edge for networks (256 for the real figures)")
    parser.add_argument("--zoo-timeout", type=float, default=900, help="seconds per MONAI attempt")
    parser.add_argument("--zoo-memory-gb", type=float, default=20, help="address-space limit per MONAI attempt")
    parser.add_argument("--json", type=Path, default=ROOT / "lab" / "benchmarks" / "results" / "performance.json")
    args = parser.parse_args()
    if args.worker:
        task = json.loads(args.worker)
        result = WORKERS[task["kind"]](task)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    os.environ.setdefault("MESHNET_LESION_MIRROR", str(SHARED))
    args.variants = [v for v in args.variants.split(",") if v]
    sections = [s for s in args.sections.split(",") if s]
    bench = Bench(args)
    print(f"{bench.results['machine']['cpu']}, {os.cpu_count()} logical CPUs, torch "
          f"{bench.results['machine']['torch']}; device {args.device}")
    try:
        bench.peak()
        for section in ("default", "meshnet", "brainchop", "zoo", "slicer"):
            if section in sections:
                getattr(bench, section)()
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
        write_results(args.json, bench.results, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
