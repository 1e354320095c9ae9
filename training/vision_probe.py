"""What each depth of EfficientNet-Lite0 knows about a scene's shapes: a linear probe per layer.

    python -m training.vision_probe [--scenes 1000] [--output reports/vision_probe.md]

For generated training scenes, the feature vector of the 7x7 grid cell holding each shape's centre (deeper
stages are at 7x7 already; earlier ones are average-pooled to 7x7, as a projector would see them) is
standardised and fed to a linear classifier (softmax regression, Adam, 300 full-batch steps) that predicts
the shape's colour (8 classes) and its kind (5 classes); accuracy is measured on a held-out 20% of the
shapes. A layer whose probe cannot read the colour cannot give it to the LLM either: this is how the image
QA model's vision features are chosen (LLaVA takes CLIP's penultimate layer for the same reason): the
default reads blocks 7 and 14, concatenated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mixllm.provenance import atomic_write_text, git_revision, machine_info

TAPS = {"block 3 (40 ch, 28x28)": 3, "block 7 (80 ch, 14x14)": 7, "block 10 (112 ch, 14x14)": 10,
        "block 14 (192 ch, 7x7)": 14, "block 15 (320 ch, 7x7)": 15, "head (1280 ch, 7x7; the first default)": "head"}  # fmt: skip
CONCATENATED = {"blocks 7 + 14 (272 ch; the default's vision_feature_layer)": ("block 7 (80 ch, 14x14)", "block 14 (192 ch, 7x7)")}
"""Rows whose feature is two taps side by side, as ``vision_feature_layer: [7, 14]`` feeds the projector."""


@torch.no_grad()
def layer_features(scenes, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per tap: (N, C, 7, 7) features of the rendered scenes."""
    from mixllm.data.scenes import render_scene
    from mixllm.encoders.efficientnet_lite import efficientnet_lite0
    from mixllm.image_processing import ImageProcessor

    model, processor = efficientnet_lite0(weights="default").eval(), ImageProcessor()
    stages = [-1 if tap == "head" else tap for tap in TAPS.values()]
    out: dict[str, list[torch.Tensor]] = {name: [] for name in TAPS}
    for start in range(0, len(scenes), batch_size):
        x = processor([render_scene(s) for s in scenes[start : start + batch_size]])
        for name, features in zip(TAPS, model.stage_features(x, stages)):
            out[name].append(F.adaptive_avg_pool2d(features, 7))
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def probe(features: torch.Tensor, labels: torch.Tensor, classes: int, train_fraction: float = 0.8, seed: int = 0) -> float:
    """Held-out accuracy of a linear classifier on standardised features."""
    x = features / (features.std(0, keepdim=True) + 1e-3)
    n = int(len(x) * train_fraction)
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        loss = F.cross_entropy(head(x[:n]), labels[:n])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(x[n:]).argmax(1) == labels[n:]).float().mean())


def run(num_scenes: int, seed: int = 0) -> dict:
    from mixllm.data.scenes import COLOURS, SHAPES, generate_split

    scenes = generate_split("train", num_scenes, seed=seed)
    colours, kinds = list(COLOURS), list(SHAPES)
    cells, colour_labels, shape_labels = [], [], []
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            row, col = shape.cell
            cells.append((i, row, col))
            colour_labels.append(colours.index(shape.colour))
            shape_labels.append(kinds.index(shape.shape))
    index = torch.tensor(cells)
    result = {"scenes": num_scenes, "shapes": len(cells), "layers": {}}
    grids = layer_features(scenes)
    grids.update({name: torch.cat([grids[a], grids[b]], dim=1) for name, (a, b) in CONCATENATED.items()})
    for name, grid in grids.items():
        rows = grid[index[:, 0], :, index[:, 1], index[:, 2]]  # (shapes, C)
        result["layers"][name] = {
            "colour": probe(rows, torch.tensor(colour_labels), len(colours)),
            "shape": probe(rows, torch.tensor(shape_labels), len(kinds)),
        }
    return result


def markdown(result: dict) -> str:
    lines = ["# Linear probes of EfficientNet-Lite0's layers on the scenes (`python -m training.vision_probe`)", "",
             f"{result['scenes']} training scenes, {result['shapes']} shapes; the feature of each shape's 7x7 cell, "
             "held-out 20 % of the shapes. Chance: colour 1/8, shape 1/5.", "",
             "| layer | colour accuracy | shape accuracy |", "|---|---|---|"]  # fmt: skip
    for name, row in result["layers"].items():
        lines.append(f"| {name} | {row['colour']:.3f} | {row['shape']:.3f} |")
    machine = result["machine"]
    lines += ["", f"Machine: {machine.get('cpu')}, {machine.get('cpu_count')} cores; revision {result['git_revision']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--output", default="reports/vision_probe.md", help="markdown report (JSON beside it)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {**run(args.scenes), "machine": machine_info(), "git_revision": git_revision()}
    output = Path(args.output)
    atomic_write_text(output, markdown(result))
    atomic_write_text(output.with_suffix(".json"), json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
