"""Held-out accuracy of image adapters: questions about generated scenes of the val split (never trained on),
asked through the real chat path (SmolLM2 as `mmchat chat` loads it: Q4_1 blocks on mmchat's own CPU kernels where
they build, greedy answers), graded against the scenes' known facts; plus descriptions of scikit-image's real
photos. Several adapters are compared side by side in one run, on the same scenes with the same loaded model.

    python benchmarks/vision_accuracy.py [--adapter shipped --adapter runs/vision2] [--scenes 40] [--json out.json]
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", action="append",
                    help="an adapter .safetensors or a training output folder, or 'shipped' (the one in the package, "
                         "the default); repeat to compare several")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--scenes", type=int, default=40, help="held-out scenes to ask about")
    ap.add_argument("--kinds", default="colour,shape,count,position,word", help="question kinds, comma-separated")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mmchat
    from mmchat.multimodal import ocr
    from mmchat.multimodal import projector as P
    from mmchat.multimodal.train import evaluate
    try:
        from skimage import data
    except ImportError:
        data = None
        print("scikit-image is not installed: no photo descriptions", file=sys.stderr)
    llm = mmchat.load(args.model, progress=False)
    runs = {}
    for name in args.adapter or ["shipped"]:
        if name == "shipped":
            adapter = P.find_adapter(llm.config, llm.name)
        else:
            path = Path(name) / "adapter.safetensors" if Path(name).is_dir() else Path(name)
            adapter = P.Adapter.load(path)
        llm.vision_adapter = adapter
        start = time.perf_counter()
        report = evaluate(llm, args.scenes, kinds=tuple(args.kinds.split(",")))
        photos = {p: llm.chat("Describe the image.", images=[getattr(data, p)()], temperature=0, max_tokens=40)
                  for p in (("chelsea", "coffee", "astronaut", "rocket") if data else ())}
        runs[name] = {"adapter": str(adapter.path), "meta": adapter.meta, "seconds": round(time.perf_counter() - start),
                      "accuracy": {k: v for k, v in report.items() if k != "examples"},
                      "examples": report["examples"], "photos": photos}
    out = {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
           "torch_threads": torch.get_num_threads(),
           "mmchat_kernels": llm.model.fused_blocks is not None,  # the default path: mmchat's own CPU kernels
           "ocr": ocr.available(),  # with the `ocr` extra, the words in scenes are also read by OCR
           "scenes": args.scenes, "runs": runs}
    print(f"{out['machine']}; mmchat's kernels: {out['mmchat_kernels']}; OCR line after images: "
          f"{'yes' if out['ocr'] else 'no (' + ocr.missing() + ')'}")
    names = list(runs)
    print(f"{'kind':10}" + "".join(f" {n[-28:]:>28}" for n in names))
    for kind in runs[names[0]]["accuracy"]:
        cells = []
        for n in names:
            r = runs[n]["accuracy"][kind]
            cells.append(f"{r['correct']}/{r['total']} = {r['accuracy']:.0%}" if r["total"] else "-")
        print(f"{kind:10}" + "".join(f" {c:>28}" for c in cells))
    for n in names:
        for photo, text in runs[n]["photos"].items():
            print(f"{n} {photo}: {text!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
