"""Held-out accuracy of the image adapter: questions about generated scenes of the val split (never trained on),
asked through the real chat path (SmolLM2 as `mmchat chat` loads it, greedy answers), graded against the scenes'
known facts; plus descriptions of scikit-image's real photos.

    python benchmarks/vision_accuracy.py [--adapter PATH] [--scenes 40] [--json out.json]
"""
import argparse
import json
import os
import platform
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", help="an adapter .safetensors (default: the one shipped in the package)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--scenes", type=int, default=40, help="held-out scenes to ask about")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mmchat
    from mmchat.multimodal import projector as P
    from mmchat.multimodal.train import evaluate
    llm = mmchat.load(args.model, progress=False)
    llm.vision_adapter = P.Adapter.load(args.adapter) if args.adapter else P.find_adapter(llm.config, llm.name)
    start = time.perf_counter()
    report = evaluate(llm, args.scenes)
    photos = {}
    try:
        from skimage import data
        for name in ("chelsea", "coffee", "astronaut", "rocket"):
            photos[name] = llm.chat("Describe the image.", images=[getattr(data, name)()], temperature=0,
                                    max_tokens=40)
    except ImportError:
        print("scikit-image is not installed: no photo descriptions", file=sys.stderr)
    from mmchat.multimodal import ocr
    out = {"adapter": str(llm.vision_adapter.path), "adapter_meta": llm.vision_adapter.meta,
           "ocr": ocr.available(),  # with the `ocr` extra, the words in scenes are also read by OCR
           "scenes": args.scenes, "seconds": round(time.perf_counter() - start),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
           "accuracy": {k: v for k, v in report.items() if k != "examples"},
           "examples": report["examples"], "photos": photos}
    print(f"OCR line after images: {'yes' if out['ocr'] else 'no (' + ocr.missing() + ')'}")
    print(f"{'kind':10} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for kind, r in out["accuracy"].items():
        acc = f"{r['accuracy']:9.1%}" if r["total"] else f"{'-':>9}"
        print(f"{kind:10} {r['correct']:8d} {r['total']:6d} {acc}")
    for name, text in photos.items():
        print(f"{name}: {text!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
